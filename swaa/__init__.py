"""swaa: sliding window attention adaptation (arXiv 2512.10411) for transformers models, as a patch.

    import swaa
    swaa.patch_model(model, window=2048, sink=100, interleave=2)
    model.generate(**inputs)
"""

from .config import SWAAConfig
from .patch import describe, get_config, is_patched, patch_model, patched, unpatch_model

__all__ = ["SWAAConfig", "describe", "get_config", "is_patched", "patch_model", "patched", "unpatch_model"]
__version__ = "0.1.0"

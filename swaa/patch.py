"""patch_model / unpatch_model: put the SWAA rule into a transformers model, in place, reversibly.

What a patch does to one model instance, and unpatch undoes:
- its configs' attention implementation becomes "swaa" (registered with transformers' AttentionInterface);
- a forward pre-hook on the decoder builds the call's plan (``plan.plan_forward``) and passes it to every
  layer as a kwarg; a pre-hook on a language-model head passes its token labels down to it;
- the generation methods of ``generation.INSTALLED`` go on the instance: swaa's caches, the prompt boundary,
  and refusals of what would silently drop the patch (switching attention, continuous batching);
- with ``compile_prefill``, the decoder's ``forward`` dispatches forwards of several queries to a compiled
  one (``prefill``);
- ``model.config.swaa`` holds the config, so ``save_pretrained`` keeps it.
Weights are never touched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import warnings

import torch
from transformers import PretrainedConfig, PreTrainedModel

from . import backends, compat
from .attention import ATTENTION_NAME, CONTEXT_KWARG, SWAAContext
from .caches import SWAACache, SWAAStaticCache, check_cache, new_cache, static_key_slots
from .config import SWAAConfig
from .generation import INSTALLED, InstanceMethod
from .plan import GENERATE_KWARG, PROMPT_LEN_KWARG, plan_forward
from .prefill import decoder_forward
from .rules import LayerRule, decodes_differently, describe_rules, layer_rules

logger = logging.getLogger("swaa")

LABELS_KWARG = "swaa_labels"  # token labels handed from the LM head's forward down to the decoder's hook
_STATE = "_swaa_patch"
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}  # swaa replaces all three


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


def _check_supported(model: PreTrainedModel) -> int:
    """Raise if swaa cannot patch ``model`` exactly; return its number of layers."""
    name = type(model).__name__
    config = model.config
    if config.is_encoder_decoder:
        raise ValueError(f"{name} is an encoder-decoder model; swaa patches decoder-only language models")
    if config.get_text_config() is not config:
        raise ValueError(f"{name} is a multimodal model; swaa patches text decoder models only")
    other_layers = sorted(set(getattr(config, "layer_types", None) or []) - ATTENTION_LAYER_TYPES)
    if other_layers:  # first: a hybrid's reason, before transformers' flag that it has no AttentionInterface
        raise ValueError(
            f"{name} has layers of type {other_layers}, which swaa's rules do not cover: linear attention and"
            " convolutions keep a state swaa's caches do not hold, sparse-attention indexers choose keys themselves"
        )
    if not compat.supports_attention_interface(model):
        raise ValueError(
            f"{name} ({config.model_type}) does not compute attention through transformers' AttentionInterface,"
            " so swaa cannot replace it"
        )
    num_layers = getattr(config, "num_hidden_layers", None)
    attention_modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    cross = sorted({m.layer_idx for m in attention_modules if compat.attends_to_other_states(m)})
    if cross:
        raise ValueError(
            f"{name} has cross-attention layers {cross}: their keys are not the text's own tokens (an image's or an"
            " encoder's states), and swaa's rule is defined over the text's positions; swaa cannot patch it"
        )
    attention_layers = {module.layer_idx for module in attention_modules}
    if not num_layers or attention_layers != set(range(num_layers)):
        raise ValueError(
            f"{name}: could not match its attention modules {sorted(attention_layers)} to its"
            f" num_hidden_layers={num_layers}; swaa cannot tell which layer is which"
        )
    layers = [m for m in model.modules() if any(child in attention_modules for child in m.children())]
    dropping = next((type(m).__name__ for m in [*layers, *attention_modules] if compat.drops_kwargs(type(m))), None)
    if dropping:
        raise ValueError(
            f"{name}: {dropping}.forward does not hand its keyword arguments on, so swaa's per-call context"
            " (positions, padding, prompt boundary) cannot reach its attention"
        )
    own_mask = next((type(m).__name__ for m in attention_modules if compat.makes_its_own_mask(type(m))), None)
    if own_mask:
        raise ValueError(
            f"{name}: {own_mask} hands attention a mask it builds itself (a learned bias or a key selection),"
            " which swaa's rules would replace"
        )
    bidirectional = [type(m).__name__ for m in model.modules() if getattr(m, "is_causal", True) is False]
    if bidirectional:
        raise ValueError(f"{name} has bidirectional attention ({bidirectional[0]}); swaa patches causal decoders")
    if compat.drops_queries_before_shared_layers(model):
        raise ValueError(
            f"{name} runs its KV-shared layers (num_kv_shared_layers={config.num_kv_shared_layers}) on the last"
            " tokens' queries only, slicing its masks by query, which swaa's per-forward plan and 2D masks do not"
            " follow; swaa cannot patch it with this transformers version"
        )
    if not compat.supports_default_dynamic_cache(model):
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
    num_layers = _check_supported(target)
    rules = layer_rules(config, num_layers)
    backends.check_available(config.backend, target.device)
    decoder = _decoder(target)
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
            functools.partial(_pass_labels_down, _positional_parameters(target)), with_kwargs=True))
    state.hooks.append(
        decoder.register_forward_pre_hook(
            functools.partial(_before_forward, state, _positional_parameters(decoder)), with_kwargs=True)
    )
    state.hooks.append(decoder.register_forward_hook(functools.partial(_after_forward, state), with_kwargs=True))
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


def _pass_labels_down(parameters: tuple[str, ...], model: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on a language-model head: its token labels (by name or by position) tell the decoder
    where answers start."""
    labels = _forward_kwargs(parameters, args, kwargs).get("labels")
    if labels is not None:
        kwargs[LABELS_KWARG] = labels
    return args, kwargs


def _positional_parameters(module: torch.nn.Module) -> tuple[str, ...]:
    """The names of the parameters ``module``'s forward takes by position, in order; read at patch time, since
    torch.compile cannot trace ``inspect`` in every torch version (a graph break in each compiled step)."""
    parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]  # after self
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _forward_kwargs(parameters: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """A forward's arguments, all by name (``parameters``: from ``_positional_parameters``), refused as Python
    refuses them: the decoder's hook hands them on by name, where extra or repeated ones would vanish."""
    if len(args) > len(parameters):
        raise TypeError(f"forward takes {len(parameters)} positional arguments ({', '.join(parameters)}) but"
                        f" {len(args)} were given")
    named = dict(zip(parameters, args))
    repeated = sorted(named.keys() & kwargs.keys())
    if repeated:
        raise TypeError(f"forward got multiple values for argument {repeated[0]!r}")
    return {**named, **kwargs}


def _padding_mask(attention_mask):
    """The 2D padding mask of a forward, or None; anything else (a prepared 4D mask) cannot be read exactly."""
    if isinstance(attention_mask, dict) and all(m is None or m.dim() == 2 for m in attention_mask.values()):
        # generate's masks per layer type: each is the one 2D padding mask, handed on by swaa's mask function
        attention_mask = next(iter(attention_mask.values()), None)
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
        raise ValueError(
            "swaa builds its own masks from a 2D padding mask (batch, tokens); got a prepared"
            f" {type(attention_mask).__name__} attention_mask"
        )
    return attention_mask


def _check_still_swaa(decoder: torch.nn.Module) -> None:
    implementation = compat.attention_implementation(decoder.config)
    if implementation != ATTENTION_NAME:
        raise ValueError(
            f"{type(decoder).__name__}'s attention implementation was switched to {implementation!r} after swaa"
            " patched it; call swaa.unpatch_model(model) first to change it (or patch the model again)"
        )


def _before_forward(state: PatchState, parameters: tuple[str, ...], decoder: torch.nn.Module, args: tuple,
                    kwargs: dict):
    """Forward pre-hook on the decoder: build this call's plan and hand it to every layer."""
    kwargs = _forward_kwargs(parameters, args, kwargs)
    _check_still_swaa(decoder)
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    batch_size, q_len = tokens.shape[:2]
    past = compat.cache_argument(kwargs)
    use_cache = kwargs.get("use_cache")
    if past is not None:
        check_cache(past, state.rules)
    generate = kwargs.pop(GENERATE_KWARG, None)
    prompt_len, labels = kwargs.pop(PROMPT_LEN_KWARG, None), kwargs.pop(LABELS_KWARG, None)
    if generate is None and (past is not None or use_cache is False) and not torch.compiler.is_compiling() \
            and compat.inside_generation():
        raise ValueError(
            f"{type(decoder).__name__} is patched by swaa but runs inside a generate that swaa does not control (the"
            " generate of a model around the patched one), so swaa cannot tell where the prompt ends: patch the"
            " model whose generate you call"
        )
    attention_mask = _padding_mask(kwargs.get("attention_mask"))
    if kwargs.get("position_ids") is None and any(kwargs.get(name) is not None for name in compat.PACKED_LENGTHS_KWARGS):
        raise ValueError(
            f"{'/'.join(compat.PACKED_LENGTHS_KWARGS)} without position_ids: swaa finds packed sequences from"
            " position_ids that restart at each sequence; pass them too (DataCollatorWithFlattening's default"
            " return_position_ids=True)"
        )
    past_len = past.get_seq_length() if past is not None else 0
    slots = static_key_slots(past, past_len)
    if slots is None and attention_mask is not None and attention_mask.shape[1] > past_len + q_len:
        attention_mask = attention_mask[:, : past_len + q_len]  # a fresh static cache: generate padded the mask
    plan = plan_forward(
        batch_size=batch_size, q_len=q_len, past_len=past_len, device=tokens.device, key_slots=slots,
        attention_mask=attention_mask, position_ids=kwargs.get("position_ids"), generate=generate,
        labels=labels, prompt_len=prompt_len,
        from_embeddings=kwargs.get("input_ids") is None, static_cache=past is not None and past.is_compileable,
    )
    if past is None and not decoder.training and (decoder.config.use_cache if use_cache is None else use_cache):
        if plan.query_seq is not None:
            kwargs["use_cache"] = False  # packed rows: a cache holds one sequence per row
        else:
            past = new_cache(state.rules, state.config.bounded_cache)
            compat.set_cache_argument(kwargs, past, state.cache_kwarg)
    if isinstance(past, (SWAACache, SWAAStaticCache)):
        plan = past.begin_forward(plan)  # its ring layers keep what later queries can see, by position
    _check_training_answers(state, decoder, generate, labels, prompt_len, plan)
    need_weights = bool(kwargs.get("output_attentions") or decoder.config.output_attentions)
    kwargs[CONTEXT_KWARG] = SWAAContext(state.rules, state.config.backend, plan, need_weights)
    return (), kwargs


def _check_training_answers(state: PatchState, decoder, generate, labels, prompt_len, plan) -> None:
    """Training a language model with FA decode needs each answer's start, never a guess: labels or prompt_len
    (else an error); labels whose -100s mark no prompt (a plain language-model collator puts them on padding only,
    or on each packed sequence's first token) make every token an answer, full attention in the FA-decode layers:
    said in a warning."""
    if not (decoder.training and state.generates and generate is None):
        return  # first: a compiled decode step then reads (and guards on) no rule
    decoding = [layer for layer, rule in enumerate(state.rules) if decodes_differently(rule)]
    if not decoding or prompt_len is not None:
        return
    if labels is None:
        raise ValueError(
            f"training with fa_decode (layers {decoding}) needs to know where each answer starts: pass labels"
            " with the prompt masked as -100, or prompt_len=<real prompt tokens per row>"
        )
    if not bool((~plan.query_generated & (plan.query_pos > 0)).any()):
        warnings.warn(
            f"swaa: the labels mask no prompt token (only padding or each sequence's first token is -100), so every"
            f" token is an answer and the FA-decode layers {decoding} attend to every earlier token (full"
            " attention); mask the prompt as -100 to train the SWAA pattern", stacklevel=3,
        )


def _after_forward(state: PatchState, decoder: torch.nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: every layer the decoder ran must have gone through swaa's attention, or the pattern was not
    applied. It runs the first ``config.num_hidden_layers`` (early exit, ``generate(assistant_early_exit=n)``,
    drafts with fewer layers by lowering that count)."""
    ran = min(len(state.rules), getattr(decoder.config, "num_hidden_layers", len(state.rules)))
    missing = set(range(ran)) - kwargs[CONTEXT_KWARG].layers_called
    if missing:
        raise RuntimeError(
            f"layers {sorted(missing)} of {type(decoder).__name__} did not call swaa's attention: this model"
            " computes attention outside transformers' AttentionInterface, so the SWAA rule was not applied"
        )

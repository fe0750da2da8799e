"""What a patched model's forward reads: the hooks that ``patch_model`` installs on the decoder and its head.

``before_forward`` (a pre-hook on the decoder) reads the call's arguments (tokens, padding mask, positions,
cache, labels or prompt length, generate's prompt boundary), refuses what it cannot read exactly, makes swaa's
cache when the call wants one, builds the call's plan (``plan.plan_forward``, the plan's one author) and hands
it to every layer in ``attention.SWAAContext``. ``pass_labels_down`` (a pre-hook on a language-model head)
hands the head's token labels to the decoder; ``after_forward`` checks that every layer went through swaa's
attention.
"""

from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING

import torch

from . import compat
from .attention import ATTENTION_NAME, CONTEXT_KWARG, SWAAContext
from .caches import SWAACache, SWAAStaticCache, check_cache, new_cache, static_key_slots
from .plan import GENERATE_KWARG, PROMPT_LEN_KWARG, Prefill, plan_forward
from .rules import decodes_differently

if TYPE_CHECKING:
    from .patch import PatchState

LABELS_KWARG = "swaa_labels"  # token labels handed from the LM head's forward down to the decoder's hook


def pass_labels_down(parameters: tuple[str, ...], model: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on a language-model head: its token labels (by name or by position) tell the decoder
    where answers start."""
    labels = _forward_kwargs(parameters, args, kwargs).get("labels")
    if labels is not None:
        kwargs[LABELS_KWARG] = labels
    return args, kwargs


def positional_parameters(module: torch.nn.Module) -> tuple[str, ...]:
    """The names of the parameters ``module``'s forward takes by position, in order; read at patch time, since
    torch.compile cannot trace ``inspect`` in every torch version (a graph break in each compiled step)."""
    parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]  # after self
    return tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _forward_kwargs(parameters: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """A forward's arguments, all by name (``parameters``: from ``positional_parameters``), refused as Python
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


def before_forward(state: PatchState, parameters: tuple[str, ...], decoder: torch.nn.Module, args: tuple,
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
    bounded = past if isinstance(past, (SWAACache, SWAAStaticCache)) else None
    plan = plan_forward(
        batch_size=batch_size, q_len=q_len, past_len=past_len, device=tokens.device, key_slots=slots,
        attention_mask=attention_mask, position_ids=kwargs.get("position_ids"), generate=generate,
        labels=labels, prompt_len=prompt_len,
        from_embeddings=kwargs.get("input_ids") is None, static_cache=past is not None and past.is_compileable,
        ring_layers=bounded.ring_layers() if bounded else frozenset(),
        ring_held=bounded.held_positions(q_len) if bounded else None,
    )
    if isinstance(generate, Prefill) and isinstance(past_len, int):  # read back only without a cache
        generate.note_slots(past_len + q_len)
    if past is None and not decoder.training and (decoder.config.use_cache if use_cache is None else use_cache):
        if plan.query_seq is not None:
            kwargs["use_cache"] = False  # packed rows: a cache holds one sequence per row
        else:
            past = new_cache(state.rules, state.config.bounded_cache)
            compat.set_cache_argument(kwargs, past, state.cache_kwarg)
    if isinstance(past, (SWAACache, SWAAStaticCache)):
        past.begin_forward(plan)  # its ring layers keep what later queries can see, by position
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


def after_forward(state: PatchState, decoder: torch.nn.Module, args: tuple, kwargs: dict, output):
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

"""The attention function that every patched layer calls through transformers' ``AttentionInterface``.

It looks up the layer's rule, takes the forward's plan over the keys that layer holds, picks a backend and
runs it. The mask function registered beside it hands on the 2D padding mask and builds no mask: masks
come from the plan, per layer. Both are registered under ``ATTENTION_NAME`` when this module is imported, so
that a patched model unpickled in a new process finds them.
"""

from __future__ import annotations

import torch

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import backends
from .plan import Plan
from .rules import LayerRule

ATTENTION_NAME = "swaa"
CONTEXT_KWARG = "swaa_context"
_UNSUPPORTED_KWARGS = {"softcap": "attention logit soft-capping", "s_aux": "learned attention sinks"}


class SWAAContext:
    """What each layer's attention call needs from one forward call of a patched model.

    Deliberately not a dataclass, list or set: wrappers that map over a layer's forward arguments (FSDP2
    casting inputs to its mixed-precision dtype, DDP moving them) rebuild those, so each layer would get a
    copy (its plan's tensors cast, its calls recorded where the forward's check never looks). A plain
    object is handed on as it is."""

    __slots__ = ("rules", "backend", "plan", "need_weights", "layers_called")

    def __init__(self, rules: tuple[LayerRule, ...], backend: str, plan: Plan, need_weights: bool = False):
        self.rules = rules
        self.backend = backend
        self.plan = plan
        self.need_weights = need_weights
        self.layers_called: set[int] = set()


def swaa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: object,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention signature: query (batch, heads, q_len, d) after RoPE, key/value
    (batch, kv_heads, kv_len, d) after the cache update. Returns (batch, q_len, heads, d) and weights."""
    context: SWAAContext | None = kwargs.get(CONTEXT_KWARG)
    if context is None:
        raise RuntimeError(
            f"{type(module).__name__} called swaa's attention without swaa's context: the model was not patched by"
            " swaa.patch_model (attn_implementation='swaa' alone does not patch a model: load it as usual and call"
            " swaa.patch_model(model), which re-applies a saved config.swaa), or it does not pass keyword arguments"
            " from its forward down to its attention"
        )
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{type(module).__name__} uses {what} ({name}), which swaa does not implement")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
        # swaa's mask function hands layers the 2D padding mask; anything else was made by the model itself
        # (a learned bias, a key selection), which swaa's masks would silently drop
        raise NotImplementedError(
            f"{type(module).__name__} hands its attention a {attention_mask.dim()}D mask of its own making (a bias or"
            " key selection on top of the padding mask), which swaa cannot keep; this model cannot be patched"
        )
    layer = module.layer_idx
    plan = context.plan.keys_of(layer).to(query.device)
    expected = plan.kv_len
    if key.shape[-2] > expected and plan.unwritten_tail:
        # a static cache hands every slot; this forward's plan covers the slots written so far
        key, value = key[:, :, :expected], value[:, :, :expected]
    if key.shape[-2] != expected:
        raise RuntimeError(
            f"layer {layer} got {key.shape[-2]} keys where swaa expected {expected}: swaa needs its own cache or a"
            " DynamicCache / StaticCache holding every token so far"
        )
    rule = context.rules[layer]
    call = backends.Call(query, key, value, rule, plan, dropout, context.need_weights, torch.compiler.is_compiling())
    backend = backends.select(context.backend, call)
    context.layers_called.add(layer)
    return backend.attend(
        query,
        key,
        value,
        rule=rule,
        plan=plan,
        scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
        dropout=dropout,
        need_weights=context.need_weights,
    )


def padding_mask(*, attention_mask: torch.Tensor | None = None, kv_length: int = 0, **kwargs) -> torch.Tensor | None:
    """Mask function registered for swaa: builds no (batch, heads, q, kv) mask (swaa's masks come from the
    plan) and hands on the 2D padding mask, padded with zeros to ``kv_length`` slots: a static cache's fixed
    size, so that ``generate`` gives a compiled decode step a mask of one shape."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    return torch.nn.functional.pad(attention_mask, (0, kv_length - attention_mask.shape[-1]))


AttentionInterface.register(ATTENTION_NAME, swaa_attention)
AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)

"""The attention function that every patched layer calls through transformers' ``AttentionInterface``.

It looks up the layer's rule in the plan, takes the forward's layout, picks a backend and runs it. The
mask function registered beside it returns no mask: masks come from the layout, per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import backends
from .cache import SWAACache
from .layout import Layout
from .rules import LayerRule

ATTENTION_NAME = "swaa"
CONTEXT_KWARG = "swaa_context"
_UNSUPPORTED_KWARGS = {"softcap": "attention logit soft-capping", "s_aux": "learned attention sinks"}


@dataclass
class SWAAContext:
    """What each layer's attention call needs from one forward call of a patched model."""

    rules: tuple[LayerRule, ...]
    backend: str
    layout: Layout
    need_weights: bool = False
    layers_called: set = field(default_factory=set)
    cache: object = None  # the forward's past_key_values: a SWAACache says which keys each layer holds


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
            f"{type(module).__name__} called swaa's attention without swaa's context: this model does not pass"
            " keyword arguments from its forward down to its attention, so swaa cannot patch it"
        )
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{type(module).__name__} uses {what} ({name}), which swaa does not implement")
    layer = module.layer_idx
    layout = context.layout.to(query.device)
    key_pos = context.cache.key_positions(layer) if isinstance(context.cache, SWAACache) else None
    if key_pos is not None:  # a bounded cache layer: its keys are the kept ones + the new ones
        layout = layout.with_keys(key_pos.to(query.device))
    if key.shape[-2] != layout.key_pos.shape[1]:
        raise RuntimeError(
            f"layer {layer} got {key.shape[-2]} keys where swaa expected {layout.key_pos.shape[1]}: swaa needs its"
            " own cache or a DynamicCache holding every token so far (static and offloaded caches are not supported)"
        )
    rule = context.rules[layer]
    attend = backends.select(context.backend, query, rule, layout, context.need_weights)
    context.layers_called.add(layer)
    return attend(
        query,
        key,
        value,
        rule=rule,
        layout=layout,
        scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
        dropout=dropout,
        need_weights=context.need_weights,
    )


def no_mask(*args, **kwargs) -> None:
    """Mask function registered for swaa: transformers builds no mask (swaa's come from the layout)."""
    return None

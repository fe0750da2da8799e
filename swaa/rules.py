"""The SWAA rule, written once: which layers keep full attention, and which key a query may see.

``visible`` is the rule itself, element by element; the dense reference mask and FlexAttention's mask_mod
are that predicate. The coarser questions the fast paths and the caches ask are answered here too, from
the same two quantities (``window_start`` and ``rule.sink``): does a query see its whole prefix
(``sees_whole_prefix``; for a whole forward, ``Plan.sees_every_key``), does a generated token see more than a
prompt token (``decodes_differently``; for a whole forward, ``Plan.generated_matters``), does a span of keys
lie wholly in reach (``keys_in_reach``), may a layer forget old keys (``forgets_old_keys``), which keys must
it keep (``kept_keys``, ``still_visible``, ``ring_slot``), how many pairs a prompt keeps (``visible_pairs``). No other module does window or sink arithmetic. See
``docs/rules.md`` for the rule table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import SWAAConfig

logger = logging.getLogger("swaa")


@dataclass(frozen=True)
class LayerRule:
    """How one layer attends.

    window: keys a query sees, itself included; ``None`` for a full-attention layer.
    sink: the first ``sink`` real tokens of the sequence stay visible (SWA layers only).
    fa_decode: generated tokens see every earlier token (SWA layers only).
    """

    window: int | None
    sink: int = 0
    fa_decode: bool = False

    @property
    def is_full(self) -> bool:
        return self.window is None

    def key(self) -> tuple:
        """The rule as plain values, for memo keys that a compiled step can hash without tracing a dataclass
        (``dataclasses.astuple`` deep-copies: a compiled step then guards on every field's descriptor)."""
        return (self.window, self.sink, self.fa_decode)

    def describe(self) -> str:
        if self.is_full:
            return "full attention"
        decode = "full" if self.fa_decode else "SWA"
        return f"SWA window={self.window} sink={self.sink}, decode {decode}"


FULL_ATTENTION = LayerRule(window=None)


def _checked_layers(name: str, layers: tuple[int, ...], num_layers: int, drop_beyond: bool) -> set[int]:
    beyond = sorted(layer for layer in layers if layer >= num_layers)
    if beyond and not drop_beyond:
        raise ValueError(
            f"{name}={list(layers)!r}: layer(s) {beyond} do not exist; this model has layers 0..{num_layers - 1}"
        )
    if beyond:
        logger.warning("%s lists layers %s beyond this model's %d layers; ignored", name, beyond, num_layers)
    return {layer for layer in layers if layer < num_layers}


def full_attention_layers(config: SWAAConfig, num_layers: int) -> list[int]:
    """Indices of the layers that keep full attention in a model of ``num_layers`` layers."""
    if config.interleave is not None:
        if config.interleave_offset >= num_layers:
            raise ValueError(
                f"interleave_offset={config.interleave_offset}: no layer would keep full attention; this model has"
                f" layers 0..{num_layers - 1}"
            )
        return list(range(config.interleave_offset, num_layers, config.interleave))
    listed = config.full_attention_layers or ()
    return sorted(_checked_layers("full_attention_layers", listed, num_layers, config.drop_layers_beyond_depth))


def layer_rules(config: SWAAConfig, num_layers: int) -> tuple[LayerRule, ...]:
    """One rule per layer: the plan that the attention call follows."""
    full = set(full_attention_layers(config, num_layers))
    if isinstance(config.fa_decode, bool):
        decode = set(range(num_layers)) if config.fa_decode else set()
    else:
        decode = _checked_layers("fa_decode", config.fa_decode, num_layers, config.drop_layers_beyond_depth)
        both = sorted(decode & full)
        if both:
            raise ValueError(
                f"fa_decode={list(config.fa_decode)!r}: layer(s) {both} are full-attention layers here;"
                " fa_decode lists SWA layers only"
            )
    return tuple(
        FULL_ATTENTION if layer in full else LayerRule(config.window, config.sink, layer in decode)
        for layer in range(num_layers)
    )


def describe_rules(rules: tuple[LayerRule, ...]) -> str:
    """One line per distinct rule, listing its layers: what the demo and the patch log print."""
    groups: dict[LayerRule, list[int]] = {}
    for layer, rule in enumerate(rules):
        groups.setdefault(rule, []).append(layer)
    return "\n".join(f"  layers {layers}: {rule.describe()}" for rule, layers in groups.items())


# ------------------------------------------------------------------------------------------- the rule


def window_start(rule: LayerRule, query_pos):
    """First key position inside the window of a query at ``query_pos`` (an int or a tensor): an SWA query
    sees the keys at ``window_start(rule, i) <= j <= i`` and the sinks ``j < rule.sink``, nothing else.
    May be negative (the window then holds every key up to the query)."""
    return query_pos - (rule.window - 1)


def visible(
    rule: LayerRule,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    query_generated: torch.Tensor,
    same_sequence: torch.Tensor | bool = True,
) -> torch.Tensor:
    """Whether a query may see a key under ``rule``; tensors broadcast against each other.

    Positions count the real tokens of one sequence from 0; -1 marks padding, which is never seen
    and sees nothing. ``query_generated`` says whether the query is a generated (decode) token.
    ``same_sequence`` separates packed sequences.
    """
    seen = (key_pos >= 0) & (key_pos <= query_pos) & same_sequence
    if rule.is_full:
        return seen
    near = (key_pos >= window_start(rule, query_pos)) | (key_pos < rule.sink)
    if rule.fa_decode:
        near = near | query_generated
    return seen & near


# ------------------------------------------------------------------- coarse questions about the rule


def sees_whole_prefix(rule: LayerRule, query_pos, query_generated):
    """Whether a query (ints and bools, or tensors) sees every earlier key of its sequence: in a full layer,
    as a generated token under FA decode, or when its window reaches back to the sinks (window and sinks are
    then the whole prefix)."""
    if rule.is_full:
        return True
    reaches = window_start(rule, query_pos) <= rule.sink
    return reaches | query_generated if rule.fa_decode else reaches


def decodes_differently(rule: LayerRule) -> bool:
    """Whether a generated token sees more than a prompt token at the same position in this layer (FA decode
    in an SWA layer): where it does, which queries are generated matters."""
    return rule.fa_decode and not rule.is_full


def sink_end(rule: LayerRule) -> int:
    """Keys at positions ``[0, sink_end)`` are sinks: visible to every query of an SWA layer."""
    return 0 if rule.is_full else rule.sink


def kernel_window_left(rule: LayerRule, key_count: int) -> int:
    """flash-attn's ``window_size`` left part for ``rule`` (``window - 1`` earlier keys and the query itself),
    capped at ``key_count``: a window longer than every sequence is the same window, and fits a C int."""
    return min(rule.window - 1, key_count)


def keys_in_reach(rule: LayerRule, key_lo, key_hi, query_hi):
    """Whether keys at positions ``key_lo..key_hi`` lie wholly inside the window of every SWA query up to position
    ``query_hi``, or wholly among the sinks (not counting causality); tensors broadcast. A span that straddles
    both is not in reach by this test, though every query may see it: callers only skip a mask with it."""
    return (key_lo >= window_start(rule, query_hi)) | (key_hi < rule.sink)


def forgets_old_keys(rule: LayerRule) -> bool:
    """A layer whose every query (prompt or generated) uses the window: its cache may drop keys no later query
    can see."""
    return rule.window is not None and not rule.fa_decode


def kept_keys(rule: LayerRule) -> int:
    """Keys such a layer must keep for its next query: the sinks and the window of that query but itself."""
    return rule.sink + rule.window - 1


def still_visible(rule: LayerRule, key_pos, next_query_pos):
    """Whether a query at ``next_query_pos`` or later may still see the key at ``key_pos`` (a sink, or inside
    that query's window); tensors broadcast."""
    return (key_pos < rule.sink) | (key_pos >= window_start(rule, next_query_pos))


def ring_slot(rule: LayerRule, key_pos: torch.Tensor, slots: int) -> torch.Tensor:
    """Slot of a key in a cache layer of ``slots`` slots: sink ``p`` in slot ``p``, a later key in a ring of the
    slots after the sinks (as many consecutive positions as the ring has slots never share one)."""
    ring = max(slots - rule.sink, 1)
    return torch.where(key_pos < rule.sink, key_pos, rule.sink + (key_pos - rule.sink) % ring)


def visible_pairs(rule: LayerRule, length: int) -> int:
    """(query, key) pairs a causal prompt of ``length`` tokens keeps under ``rule``: its attention's work."""
    if rule.is_full:
        return length * (length + 1) // 2
    starts = (max(window_start(rule, i), 0) for i in range(length))
    return sum(i - start + 1 + min(rule.sink, start) for i, start in enumerate(starts))  # window + sinks before it

"""The SWAA rule, written once: which layers keep full attention, and which key a query may see.

Every backend derives its mask from ``visible``: the dense reference mask, FlexAttention's mask_mod, the
split of a batch into windowed and full FA2 calls, the keys a bounded cache keeps. ``window_start`` is the one
place that says where a window begins. See ``docs/rules.md`` for the rule table.
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
        logger.warning("swaa: %s lists layers %s beyond this model's %d layers; ignored", name, beyond, num_layers)
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

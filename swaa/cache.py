"""KV caches for patched models.

A patched model gets a cache that keeps every token in full-attention layers and FA-decode layers, whatever
sliding window its own config declares (Mistral-style configs would otherwise drop keys that FA decode
still needs). A layer that uses SWA for every token (``rule.window`` set, ``rule.fa_decode`` off) never
looks at a key older than its window again, except the sinks: with ``bounded_cache`` on (the default) its
cache layer keeps only the sinks and the last ``window - 1`` keys, what the next query can still see.

Which keys a bounded layer keeps depends on positions (sinks are the first ``sink`` *real* tokens of each
row, so under left padding they sit at different cache indices per row). A bounded layer therefore records
the position of every key it holds: ``positions`` (batch, kept) int64, ``-1`` for an empty slot. Before each
forward the patch hands the cache the positions of the incoming tokens (``begin_forward``); each bounded
layer appends them, returns every key the forward's queries need (kept + incoming) and keeps only what a
later query can see. The attention call then builds that layer's layout from ``key_positions(layer)``.

Kept keys stay in order; empty slots (rows that hold fewer keys than others) come first in the row, like
left padding. ``get_seq_length`` keeps counting every token seen, so RoPE positions stay absolute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .layout import Layout
from .rules import LayerRule


def is_bounded(rule: LayerRule) -> bool:
    """A layer whose every query (prompt or generated) uses the window: it may forget old keys."""
    return rule.window is not None and not rule.fa_decode


def new_cache(rules: tuple[LayerRule, ...], bounded: bool = True) -> DynamicCache:
    """An empty cache for a model patched with ``rules``: a ``SWAACache`` when ``bounded`` and some layer
    is bounded (see ``is_bounded``), else a plain ``DynamicCache`` that keeps every token."""
    if bounded and any(is_bounded(rule) for rule in rules):
        return SWAACache(rules)
    return DynamicCache()


class _Shared:
    """State shared by the bounded layers of one cache: the incoming tokens' positions for the current
    forward, and a memo so that layers in the same state derive the same position tensors once (and the
    layouts built from them are shared too)."""

    def __init__(self):
        self.incoming: torch.Tensor | None = None  # (batch, q_len) int64, -1 for padding
        self.packed = False
        self.forward = 0  # counts begin_forward calls
        self.memo: dict = {}

    def derive(self, op: tuple, inputs: tuple, compute: Callable):
        """``compute()`` memoized on ``op`` and the identity of the tensors in ``inputs``."""
        key = op + tuple(id(t) for t in inputs)
        hit = self.memo.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], inputs)):
            return hit[1]
        result = compute()
        self.memo[key] = (inputs, result)  # holds the inputs, so their ids cannot be reused meanwhile
        return result


def _trim(kept: torch.Tensor, incoming: torch.Tensor, window: int, sink: int):
    """Positions of a forward's keys (kept + incoming) and what to keep of them for later queries.

    Returns ``(positions, kept_positions, index, dropped)``: positions (batch, n) of the keys the forward
    sees; ``index`` (batch, width) selects the keys to keep (``None``: keep all) and ``kept_positions``
    their positions, ``-1`` in empty slots (first in the row); ``dropped``: a real key was dropped.
    A later query of a row sits past the row's last position ``last``, so it sees ``j`` only when
    ``j >= last - window + 2`` (the last ``window - 1`` positions) or ``j < sink``.
    """
    positions = torch.cat([kept, incoming.to(kept.device)], dim=-1)
    last = positions.max(-1, keepdim=True).values
    keep = (positions >= 0) & ((positions < sink) | (positions > last - window + 1))
    n = positions.shape[-1]
    if n == 0:
        return positions, positions, None, False
    width, dropped = torch.stack([keep.sum(-1).max(), ((positions >= 0) & ~keep).any()]).tolist()  # one sync
    if width == n:
        return positions, positions, None, False
    order = torch.sort(keep.to(torch.uint8), dim=-1, stable=True).indices  # dropped first, kept last, in order
    index = order[:, n - width :]
    kept_positions = positions.gather(-1, index).masked_fill(~keep.gather(-1, index), -1)
    return positions, kept_positions, index, bool(dropped)


class BoundedLayer(DynamicLayer):
    """Cache layer of an SWA layer without FA decode: keeps the sinks and the last ``window - 1`` keys.

    keys, values: (batch, kv_heads, kept, head_dim); positions: (batch, kept) int64, the real-token position
    of each kept key, ``-1`` for an empty slot. Modelled on transformers' ``DynamicSlidingWindowLayer``.
    """

    is_sliding = True
    is_croppable = False  # once keys are dropped, a rollback cannot bring them back

    def __init__(self, window: int, sink: int = 0, shared: _Shared | None = None):
        super().__init__()
        self.window, self.sink = window, sink
        self.shared = shared if shared is not None else _Shared()
        self.cumulative_length = 0
        self.positions: torch.Tensor | None = None
        self.forward_positions: torch.Tensor | None = None  # (batch, n): keys handed out by the last update
        self.dropped = False  # a real key was dropped: crop can no longer be exact
        self.broken: str | None = None  # why this layer cannot be extended any more
        self._forward = -1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.positions = torch.empty(key_states.shape[0], 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new keys/values; return every key the forward's queries need (kept + new), and keep
        only those a later query can see. Needs ``begin_forward`` first (the patched model calls it)."""
        if self.broken:
            raise RuntimeError(self.broken)
        shared = self.shared
        if shared.incoming is None or self._forward == shared.forward:
            raise RuntimeError(
                "swaa's bounded KV cache was updated without the incoming tokens' positions: use it only with"
                " the model patched by swaa that created it (or patch with bounded_cache=False)"
            )
        new = (key_states.shape[0], key_states.shape[-2])
        if tuple(shared.incoming.shape) != new:
            raise RuntimeError(
                f"swaa's bounded KV cache got {new} (batch, new tokens) but the forward announced"
                f" {tuple(shared.incoming.shape)}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._forward = shared.forward
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        if shared.packed:  # packed sequences restart positions: keep everything, use the forward's layout
            self.keys, self.values, self.forward_positions = keys, values, None
            self.broken = "this swaa cache was filled by a forward over packed sequences and cannot be extended"
            return keys, values
        positions, kept, index, dropped = shared.derive(
            ("update", self.window, self.sink), (self.positions, shared.incoming),
            lambda: _trim(self.positions, shared.incoming, self.window, self.sink),
        )
        self.forward_positions = positions
        if index is None:
            self.keys, self.values, self.positions = keys, values, positions
        else:
            gather = index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
            self.keys, self.values, self.positions = keys.gather(-2, gather), values.gather(-2, gather), kept
            self.dropped = self.dropped or dropped
        return keys, values

    def get_seq_length(self) -> int:
        """Tokens seen so far (not the number kept): what RoPE positions and generate count from."""
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = 0 if self.keys is None else self.keys.shape[-2]
        return kept + query_length, max(self.cumulative_length - kept, 0)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.positions = self.forward_positions = None
        self.is_initialized = self.dropped = False
        self.broken = None
        self.cumulative_length = 0
        self._forward = -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            super().reorder_cache(beam_idx)
            self.positions = self._select("reorder", beam_idx, lambda: self.positions.index_select(0, beam_idx.to(self.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.positions = self.shared.derive(
                ("repeat", repeats), (self.positions,), lambda: self.positions.repeat_interleave(repeats, dim=0)
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices, ...], self.values[indices, ...]
            self.positions = self._select("select", indices, lambda: self.positions[indices])

    def _select(self, op: str, indices, compute):
        inputs = (self.positions, indices) if isinstance(indices, torch.Tensor) else (self.positions,)
        extra = () if isinstance(indices, torch.Tensor) else (tuple(indices),)
        return self.shared.derive((op, *extra), inputs, compute)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens. Exact only while this layer has dropped no key;
        after that the keys a rollback would need again are gone, and the next update raises."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number, the tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self.dropped:
            self.broken = (
                f"the cache was cropped by {-tokens_to_remove} tokens (assisted decoding or a rollback) after"
                f" its SWA layers dropped keys older than window={self.window}; the keys the rolled-back"
                " positions need again are gone. Patch with bounded_cache=False to roll back exactly"
            )
            self.cumulative_length = max(self.cumulative_length + tokens_to_remove, 0)
            return
        self.keys = self.keys[..., :tokens_to_remove, :]
        self.values = self.values[..., :tokens_to_remove, :]
        self.positions = self.shared.derive(("crop", tokens_to_remove), (self.positions,),
                                            lambda: self.positions[:, :tokens_to_remove])
        self.cumulative_length = max(self.cumulative_length + tokens_to_remove, 0)


class SWAACache(DynamicCache):
    """``DynamicCache`` whose bounded layers (SWA for every token) keep only their sinks and window.

    Full-attention and FA-decode layers are plain ``DynamicLayer``s. Before each forward the patched
    model calls ``begin_forward(layout)``; the attention call reads ``key_positions(layer)``.
    """

    def __init__(self, rules: tuple[LayerRule, ...]):
        self.rules = tuple(rules)
        self.shared = _Shared()
        layers = [BoundedLayer(rule.window, rule.sink, self.shared) if is_bounded(rule) else DynamicLayer()
                  for rule in self.rules]
        Cache.__init__(self, layers=layers)

    def begin_forward(self, layout: Layout) -> None:
        """Record the positions of the tokens this forward adds: ``layout.query_pos`` (batch, q_len)."""
        self.shared.incoming = layout.query_pos
        self.shared.packed = layout.query_seq is not None
        self.shared.forward += 1
        self.shared.memo.clear()

    def key_positions(self, layer_idx: int) -> torch.Tensor | None:
        """(batch, n) positions of the keys that layer ``layer_idx`` handed to this forward's attention,
        or ``None`` when they are the forward layout's own (a layer that keeps every token)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, BoundedLayer) and layer._forward == self.shared.forward:
            return layer.forward_positions
        return None

    def stored_lengths(self) -> list[int]:
        """Keys each layer holds now (per row, the widest row): what the memory test and benchmark read."""
        return [0 if layer.keys is None or not layer.is_initialized else layer.keys.shape[-2] for layer in self.layers]

    def reset(self) -> None:
        super().reset()
        self.shared.incoming = None
        self.shared.memo.clear()

    def __iter__(self):
        raise NotImplementedError("swaa's bounded KV cache cannot be flattened into per-layer tensors (DDP)")

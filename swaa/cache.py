"""KV caches for patched models: dynamic (grows) and static (fixed size, for compiled decoding).

A patched model's cache keeps every token in full-attention layers and FA-decode layers, whatever sliding
window its own config declares (Mistral-style configs would otherwise drop keys that FA decode still
needs). A layer that uses SWA for every token (``rule.window`` set, ``rule.fa_decode`` off) never looks at
a key older than its window again, except the sinks: with ``bounded_cache`` on (the default) such a layer
is a ``RingLayer`` of fixed size, ``sink`` slots for the sinks plus a ring of ``window - 1`` slots for the
latest keys, whatever the context length.

Sinks are the first ``sink`` *real* tokens of each row, so under left padding the slots a token goes to
depend on its position: ``RingSlots`` keeps the position held by every slot (``-1``: empty), shared by the
cache's ring layers (they all have the config's one window and sink). Before each forward the patch hands
the cache the layout of the incoming tokens (``begin_forward``); the ring works out, with tensor operations
only (no host sync, fixed shapes), which slot each incoming key goes to, and each ring layer hands its
attention the held keys followed by the incoming ones. ``layout_for`` gives the attention call the
positions of exactly those keys.

Per-call state lives on the cache, never on the model: the cache index where ``generate``'s generated
tokens start (``set_prompt_end``) is a tensor on the cache, so two threads or a copied model each keep
their own, and a compiled decode step reads it without recompiling for every prompt length.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from transformers import DynamicCache, GenerationMixin, StaticCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, StaticLayer

from .backends.reference import in_place_slots
from .layout import Layout
from .rules import LayerRule, window_start

PROMPT_END = "swaa_prompt_end"  # attribute of a cache inside generate: cache index where generated tokens start

# transformers 5.24 renamed the cache argument of forward and generate (and the outputs' field) from
# `past_key_values` to `cache`, still accepting the old name; swaa reads either and writes the name the
# receiver takes: generate's (the installed version's) or, for a forward, that forward's own.
_CACHE_NAMES = ("cache", "past_key_values")


def cache_kwarg(function) -> str:
    """The name under which ``function`` (a forward, or generate's input preparation) takes its cache."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


CACHE_KWARG = cache_kwarg(GenerationMixin.prepare_inputs_for_generation)


def cache_argument(kwargs: Mapping) -> Cache | None:
    """The cache handed to a forward or ``generate`` (or held by an output), under either name."""
    return next((kwargs[name] for name in _CACHE_NAMES if kwargs.get(name) is not None), None)


def set_cache_argument(kwargs: dict, cache: Cache, name: str = CACHE_KWARG) -> None:
    for other in _CACHE_NAMES:
        kwargs.pop(other, None)
    kwargs[name] = cache


def is_bounded(rule: LayerRule) -> bool:
    """A layer whose every query (prompt or generated) uses the window: it may forget old keys."""
    return rule.window is not None and not rule.fa_decode


def new_cache(rules: tuple[LayerRule, ...], bounded: bool = True) -> DynamicCache:
    """An empty dynamic cache for a model patched with ``rules``: a ``SWAACache`` when ``bounded`` and some
    layer is bounded (see ``is_bounded``), else a plain ``DynamicCache`` that keeps every token."""
    if bounded and any(is_bounded(rule) for rule in rules):
        return SWAACache(rules)
    return DynamicCache()


def set_prompt_end(cache: Cache, prompt_end: int, device: torch.device) -> None:
    """Record, on ``cache``, where ``generate``'s generated tokens start (in place where one is recorded
    already, so a compiled step that read it keeps reading the same tensor)."""
    held = getattr(cache, PROMPT_END, None)
    if isinstance(held, torch.Tensor) and held.device == torch.device(device):
        held.fill_(prompt_end)
        return
    value = torch.tensor(prompt_end, device=device)
    if cache.is_compileable:
        torch._dynamo.mark_static_address(value)
    setattr(cache, PROMPT_END, value)


def clear_prompt_end(cache: Cache) -> None:
    """After ``generate``: bare forwards on the cache follow the bare-forward rule again."""
    if getattr(cache, PROMPT_END, None) is not None:
        setattr(cache, PROMPT_END, None)


def prompt_end(cache: Cache | None) -> torch.Tensor | None:
    return getattr(cache, PROMPT_END, None)


def check_cache(cache: object) -> None:
    """Raise unless swaa can run exactly on ``cache``: its own caches, or a transformers ``DynamicCache`` /
    ``StaticCache`` whose layers keep every token (no sliding-window, offloaded or quantized layers)."""
    if isinstance(cache, (SWAACache, SWAAStaticCache)):
        return
    if not isinstance(cache, Cache):
        raise TypeError(f"{CACHE_KWARG} must be a transformers Cache, got {type(cache).__name__}")
    kinds = {type(layer) for layer in cache.layers}
    if type(cache) in (DynamicCache, StaticCache) and kinds <= {DynamicLayer, StaticLayer} and not cache.offloading:
        return
    names = sorted({kind.__name__ for kind in kinds})
    raise ValueError(
        f"{CACHE_KWARG}={type(cache).__name__} with layers {names}: swaa runs on its own caches or on a"
        f" DynamicCache / StaticCache whose layers keep every token; drop {CACHE_KWARG} (generate then makes"
        " swaa's cache) or pass cache_implementation='static'"
    )


def key_slots(cache: Cache | None, past_len) -> int | None:
    """Key slots a full layer of ``cache`` hands to attention when it is a static cache whose length so far
    is a tensor (its fixed size); ``None`` when that is the tokens seen plus the new ones."""
    if cache is None or not cache.is_compileable or not isinstance(past_len, torch.Tensor):
        return None
    return cache.get_max_length()


class RingSlots:
    """Which position each slot of the cache's ring layers holds, shared by those layers.

    Slots ``[0, sink)`` hold the sinks (position ``p < sink`` in slot ``p``); slots ``[sink, sink + window - 1)``
    are a ring holding the latest ``window - 1`` positions (position ``p`` in slot ``sink + (p - sink) %
    (window - 1)``); one more slot at the end takes the incoming keys no later query can see, and is never
    read. positions: (batch, slots + 1) int64, ``-1`` for an empty slot.
    """

    def __init__(self, rule: LayerRule, static: bool):
        self.rule, self.static = rule, static
        self.slots = rule.sink + rule.window - 1  # the sinks, and the window of the next query but itself
        self.positions: torch.Tensor | None = None
        self.write_index: torch.Tensor | None = None  # (batch, q_len): slot of each incoming key, this forward
        self.layout: Layout | None = None  # this forward's queries against the held + incoming keys
        self.pending: set[int] = set()  # ring layers that have not stored this forward's keys yet

    def allocate(self, batch_size: int, device: torch.device) -> None:
        self.positions = torch.full((batch_size, self.slots + 1), -1, dtype=torch.long, device=device)
        if self.static and not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.positions)

    def begin_forward(self, layout: Layout, layers: set[int]) -> None:
        """Work out where each incoming key goes, and the layout over held + incoming keys."""
        if layout.query_seq is not None:
            raise ValueError(
                "swaa's bounded KV cache cannot hold packed sequences (positions restart inside a row); run packed"
                " batches without a cache (use_cache=False) or patch with bounded_cache=False"
            )
        incoming = layout.query_pos
        if self.positions is None:
            self.allocate(incoming.shape[0], incoming.device)
        held = self.positions[:, : self.slots]
        self.layout = layout.with_keys(torch.cat([held, incoming], dim=-1))
        # the row's latest position (the scratch slot only ever holds positions seen before, never later ones)
        last = torch.maximum(self.positions.amax(-1, keepdim=True), incoming.amax(-1, keepdim=True))
        rule, ring = self.rule, self.slots - self.rule.sink
        later = (incoming >= 0) & ((incoming < rule.sink) | (incoming >= window_start(rule, last + 1)))
        slot = torch.where(incoming < rule.sink, incoming, rule.sink + (incoming - rule.sink) % max(ring, 1))
        self.write_index = torch.where(later, slot, self.slots)
        self.positions.scatter_(1, self.write_index, incoming)
        self.pending = set(layers)

    def reorder(self, index: torch.Tensor) -> None:
        if self.positions is not None:
            self.positions.copy_(self.positions.index_select(0, index.to(self.positions.device)))

    def select(self, indices) -> None:
        if self.positions is not None:
            self.positions = self.positions[indices]

    def repeat(self, repeats: int) -> None:
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)


class RingLayer(CacheLayerMixin):
    """Cache layer of an SWA layer without FA decode: keeps the sinks and the last ``window - 1`` keys in
    fixed slots (see ``RingSlots``). keys, values: (batch, kv_heads, slots + 1, head_dim); their last slot is
    scratch. Hands attention the held keys followed by the incoming ones: (batch, kv_heads, slots + q_len, d).
    """

    is_sliding = True
    is_croppable = False  # the ring overwrites old keys: a rollback cannot bring them back

    def __init__(self, ring: RingSlots, layer_idx: int, max_cache_len: int | None = None):
        super().__init__()
        self.ring, self.layer_idx = ring, layer_idx
        self.max_cache_len = max_cache_len
        self.is_compileable = ring.static
        self.cumulative_length = torch.tensor(0) if ring.static else 0  # tokens seen: what RoPE counts from

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        size = self.ring.slots + 1
        self.keys = torch.zeros(batch, heads, size, key_states.shape[-1], dtype=self.dtype, device=self.device)
        self.values = torch.zeros(batch, heads, size, value_states.shape[-1], dtype=self.dtype, device=self.device)
        if self.ring.static:
            self.cumulative_length = self.cumulative_length.to(self.device)
            if not torch.compiler.is_compiling():
                for tensor in (self.keys, self.values, self.cumulative_length):
                    torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Return the held keys/values followed by the new ones; store the new ones a later query can see."""
        if self.layer_idx not in self.ring.pending:
            raise RuntimeError(
                "swaa's bounded KV cache was updated without the incoming tokens' positions: use it only with"
                " the model patched by swaa that created it (or patch with bounded_cache=False)"
            )
        self.ring.pending.discard(self.layer_idx)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.ring.slots
        keys = torch.cat([self.keys[:, :, :slots], key_states], dim=-2)
        values = torch.cat([self.values[:, :, :slots], value_states], dim=-2)
        index = self.ring.write_index.to(self.device)[:, None, :, None]
        self.keys.scatter_(2, index.expand(-1, key_states.shape[1], -1, key_states.shape[-1]), key_states)
        self.values.scatter_(2, index.expand(-1, value_states.shape[1], -1, value_states.shape[-1]), value_states)
        if self.ring.static:
            self.cumulative_length.add_(key_states.shape[-2])
        else:
            self.cumulative_length += key_states.shape[-2]
        return keys, values

    def get_seq_length(self):
        """Tokens seen so far (not the number held): what RoPE positions and generate count from."""
        return self.cumulative_length if self.is_initialized or not self.ring.static else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The padding mask covers what a full layer of the same cache covers."""
        if self.ring.static:
            return self.max_cache_len, 0
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len if self.ring.static else -1

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
        if self.ring.static:
            self.cumulative_length.zero_()
        else:
            self.keys = self.values = None
            self.is_initialized = False
            self.cumulative_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            index = beam_idx.to(self.device)
            self.keys.copy_(self.keys.index_select(0, index))
            self.values.copy_(self.values.index_select(0, index))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices, ...], self.values[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(
                f"crop({tokens_to_remove}): swaa's bounded KV cache overwrites keys older than the window, so it"
                " cannot roll back; patch with bounded_cache=False to roll back exactly"
            )


class _SWAACacheMixin:
    """What swaa's two caches share: the ring of their bounded layers and the per-forward hand-off."""

    rules: tuple[LayerRule, ...]
    ring: RingSlots | None

    def _layers(self, rules, bounded: bool, static: bool, max_cache_len: int | None, other) -> list:
        self.rules = tuple(rules)
        windows = {(rule.window, rule.sink) for rule in self.rules if is_bounded(rule)}
        if len(windows) > 1:
            raise ValueError(f"swaa's cache holds one window and sink for its bounded layers, got {sorted(windows)}")
        rule = next((rule for rule in self.rules if is_bounded(rule)), None)
        ring = RingSlots(rule, static) if bounded and rule is not None else None
        # a ring no smaller than the cache itself would save nothing: those layers keep every token then
        self.ring = ring if ring is not None and (max_cache_len is None or ring.slots < max_cache_len) else None
        return [RingLayer(self.ring, index, max_cache_len) if self.ring and is_bounded(r) else other()
                for index, r in enumerate(self.rules)]

    def begin_forward(self, layout: Layout) -> None:
        """Before each forward of the patched model: where the incoming tokens sit (``layout.query_pos``)."""
        if self.ring is not None:
            rings = {layer.layer_idx for layer in self.layers if isinstance(layer, RingLayer)}
            self.ring.begin_forward(layout, rings)

    def layout_for(self, layer_idx: int) -> Layout | None:
        """The layout of the keys layer ``layer_idx`` hands to this forward's attention when it is not the
        forward's own (a ring layer: held + incoming keys); ``None`` otherwise."""
        if self.ring is not None and isinstance(self.layers[layer_idx], RingLayer):
            return self.ring.layout
        return None

    def stored_lengths(self) -> list[int]:
        """Key slots each layer holds (ring layers: sinks + window - 1): what the memory benchmark reads."""
        return [self.ring.slots if isinstance(layer, RingLayer) else
                (0 if layer.keys is None or not layer.is_initialized else layer.keys.shape[-2])
                for layer in self.layers]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.ring is not None:
            self.ring.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.ring is not None:
            self.ring.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.ring is not None:
            self.ring.repeat(repeats)

    def reset(self) -> None:
        super().reset()
        if self.ring is not None and self.ring.positions is not None:
            self.ring.positions.fill_(-1)


class SWAACache(_SWAACacheMixin, DynamicCache):
    """Dynamic cache of a patched model: full-attention and FA-decode layers grow (``DynamicLayer``), bounded
    layers are fixed rings (``RingLayer``)."""

    def __init__(self, rules: tuple[LayerRule, ...]):
        Cache.__init__(self, layers=self._layers(rules, True, False, None, DynamicLayer))

    def __iter__(self):
        raise NotImplementedError("swaa's bounded KV cache cannot be flattened into per-layer tensors (DDP)")


class SWAAStaticCache(_SWAACacheMixin, StaticCache):
    """Static cache of a patched model, for ``generate(cache_implementation="static")`` and compiled decoding:
    full-attention and FA-decode layers are fixed layers of ``max_cache_len`` slots (``StaticLayer``; a long
    cache rounded up to whole chunks, which the decode step reads in place: ``in_place_slots``), bounded
    layers (with ``bounded``) fixed rings of ``sink + window - 1`` slots; every shape is fixed and every
    update in place, so a decode step can be captured in a CUDA graph."""

    def __init__(self, rules: tuple[LayerRule, ...], max_cache_len: int, bounded: bool = True):
        max_cache_len = in_place_slots(max_cache_len)
        Cache.__init__(self, layers=self._layers(
            rules, bounded, True, max_cache_len, lambda: StaticLayer(max_cache_len=max_cache_len)))

    def early_initialization(self, batch_size: int, num_heads, head_dim, dtype: torch.dtype,
                             device: torch.device) -> None:
        super().early_initialization(batch_size, num_heads, head_dim, dtype, device)
        if self.ring is not None:
            self.ring.allocate(batch_size, torch.device(device))

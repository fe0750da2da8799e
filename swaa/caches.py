"""KV caches for patched models: dynamic (grows) and static (fixed size, for compiled decoding).

A patched model's cache keeps every token in full-attention layers and FA-decode layers, whatever sliding
window its own config declares (Mistral-style configs would otherwise drop keys that FA decode still
needs). A layer that uses SWA for every token (``rules.forgets_old_keys``) never looks at a key older than
its window again, except the sinks: with ``bounded_cache`` on (the default) such a layer is a ``RingLayer``
that keeps only ``rules.kept_keys`` keys, or fewer while the context is shorter than that.

Sizing, in one place (``SizingPlan``): a dynamic ring grows with the context (doubling, never past
``kept_keys``); a static ring holds ``min(kept_keys, max_cache_len)`` slots, and a static layer that keeps
every key holds ``max_cache_len`` slots.

Sinks are the first ``sink`` *real* tokens of each row, so under left padding the slot a token goes to
depends on its position: ``RingSlots`` keeps the position held by every slot (``-1``: empty), shared by the
cache's ring layers (they all have the config's one window and sink). Each forward, in this order:
``plan_forward`` reads what the ring will hand its layers before the incoming keys (``held_positions``,
which changes nothing) and builds the plan; then the cache reads the finished plan (``begin_forward``) and
works out, with tensor operations only (no host sync, fixed shapes), which slot each incoming key goes to.
The cache never writes into a plan. One forward per cache at a time: between ``held_positions`` and the
layers' updates the ring holds this forward's state (``write_index``, ``handed``, ``pending``).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, StaticLayer

from . import compat
from .compat import CACHE_KWARG
from .plan import Plan
from .rules import LayerRule, describe_rules, forgets_old_keys, kept_keys, ring_slot, still_visible


def new_cache(rules: tuple[LayerRule, ...], bounded: bool = True) -> DynamicCache:
    """An empty dynamic cache for a model patched with ``rules``: a ``SWAACache`` when ``bounded`` and some
    layer may forget old keys, else a plain ``DynamicCache`` that keeps every token, with its layers made up front
    as transformers makes them from a config (Dory's recurrent loops read one layer per decoder layer)."""
    if bounded and any(forgets_old_keys(rule) for rule in rules):
        return SWAACache(rules)
    return DynamicCache(ddp_cache_data=[(None, None)] * len(rules))  # one empty full layer per decoder layer


def check_cache(cache: object, rules: tuple[LayerRule, ...], needed: int | None = None) -> None:
    """Raise unless swaa can run exactly on ``cache`` under ``rules``: its own caches (one that drops keys only
    under the rules it was made for: another rule may need them), or a transformers ``DynamicCache`` /
    ``StaticCache`` whose layers keep every token (no sliding-window, offloaded or quantized layers). ``needed``:
    the tokens a ``generate`` call writes into it, which a static cache must have room for (past its end
    torch's index check fails with no word of the cache)."""
    if needed is not None and isinstance(cache, Cache) and cache.is_compileable and needed > cache.get_max_length():
        raise ValueError(
            f"{CACHE_KWARG}: this static cache has room for {cache.get_max_length()} tokens and this generate writes"
            f" {needed} (its input_ids and max_new_tokens, less one); pass a cache of max_cache_len >= {needed}: for a"
            " chat, one StaticCache(config=model.config, max_cache_len=...) sized for every turn, passed to each"
        )
    if isinstance(cache, (SWAACache, SWAAStaticCache)):
        if cache.ring is not None and cache.rules != rules:
            raise ValueError(
                f"{CACHE_KWARG}: this bounded swaa cache has dropped keys that the model's rules may need: it was"
                f" made under\n{describe_rules(cache.rules)}\nand the model now runs\n{describe_rules(rules)}\nstart a"
                " new cache, or patch with bounded_cache=False to keep every key across configs"
            )
        return
    if not isinstance(cache, Cache):
        raise TypeError(f"{CACHE_KWARG} must be a transformers Cache, got {type(cache).__name__}")
    if type(cache) in (DynamicCache, StaticCache) and all(map(_keeps_every_token, cache.layers)) and not cache.offloading:
        return
    names = sorted({type(layer).__name__ for layer in cache.layers})
    raise ValueError(
        f"{CACHE_KWARG}={type(cache).__name__} with layers {names}: swaa runs on its own caches or on a"
        f" DynamicCache / StaticCache whose layers keep every token; drop {CACHE_KWARG} (generate then makes"
        " swaa's cache) or pass cache_implementation='static'"
    )


def _keeps_every_token(layer) -> bool:
    """transformers' full cache layers, and layers that store nothing of their own (``compat.stores_nothing``)
    over such a layer or none."""
    if compat.stores_nothing(layer):
        return (inner := compat.layer_read(layer)) is None or _keeps_every_token(inner)
    return type(layer) in (DynamicLayer, StaticLayer)


def static_key_slots(cache: Cache | None, past_len) -> int | None:
    """Key slots a full layer of ``cache`` hands to attention when it is a static cache whose length so far
    is a tensor (its fixed size); ``None`` when that is the tokens seen plus the new ones."""
    if cache is None or not cache.is_compileable or not isinstance(past_len, torch.Tensor):
        return None
    return cache.get_max_length()


# what a static layer's first update marks as a fixed address (transformers' StaticLayer, and RingLayer)
FIXED_ADDRESS_TENSORS = ("keys", "values", "cumulative_length")


def mark_fixed_addresses(cache: Cache | None) -> None:
    """Mark a static cache's tensors as fixed addresses, as its layers' first update does when it runs eagerly.
    Run inside a compiled graph (the compiled prefill on a fresh cache), that update cannot mark them (dynamo
    does not mark while tracing), and the compiled decode step then mutates inputs it takes for new ones:
    inductor skips its CUDA graphs (on an H200, 16.5 ms a token instead of 8.7)."""
    if cache is None or not cache.is_compileable:
        return
    for layer in cache.layers:
        if layer.is_initialized:
            _mark_fixed_addresses_of(layer)


def _mark_fixed_addresses_of(layer: CacheLayerMixin) -> None:
    for name in FIXED_ADDRESS_TENSORS:
        if isinstance(tensor := getattr(layer, name, None), torch.Tensor):
            torch._dynamo.mark_static_address(tensor)


def _held_then_incoming(held: torch.Tensor, incoming: torch.Tensor, dim: int) -> torch.Tensor:
    """What a ring hands attention: the held slots, then the incoming ones (no copy when it hands none)."""
    return torch.cat([held, incoming], dim=dim) if held.shape[dim] else incoming


class RingSlots:
    """Which position each slot of the cache's ring layers holds, shared by those layers.

    Slots ``[0, sink)`` hold the sinks; the others a ring of the latest positions (``rules.ring_slot``); one
    more slot at the end takes the incoming keys no later query can see, and is never read. A static ring
    has ``capacity`` slots from the start; a dynamic one starts empty and grows with the context up to
    ``capacity``: until it reaches it, every position sits in the slot of its own index, so growing is a copy.
    positions: (batch, slots + 1) int64, ``-1`` for an empty slot.
    """

    def __init__(self, rule: LayerRule, capacity: int, static: bool):
        self.rule, self.capacity, self.static = rule, capacity, static
        self.slots = capacity if static else 0
        self.seen = 0  # dynamic: slots of tokens seen so far (a bound on every position + 1)
        self.positions: torch.Tensor | None = None
        self.write_index: torch.Tensor | None = None  # (batch, q_len): slot of each incoming key, this forward
        self.handed = 0  # held slots the ring layers hand attention this forward, before the incoming keys
        self.fresh = True  # no forward since the ring was made or reset
        self.pending: set[int] = set()  # ring layers that have not stored this forward's keys yet

    def allocate(self, batch_size: int, device: torch.device) -> None:
        self.positions = torch.full((batch_size, self.slots + 1), -1, dtype=torch.long, device=device)
        if self.static and not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.positions)

    def held_positions(self, q_len: int) -> torch.Tensor | None:
        """Before a forward of ``q_len`` new tokens per row, read by ``plan_forward``: the positions
        (batch, slots) of the held keys the ring layers hand attention before the incoming ones (empty slots
        -1; a dynamic ring that grows for this forward hands its new empty slots too), or None from a fresh
        ring, which hands only the incoming keys (its empty slots would shift every key off FlexAttention's
        128-key blocks and cost a copy of every key; a compiled decode step never sees a fresh ring, so its
        shapes stay fixed). Changes nothing."""
        if self.fresh:
            return None
        held, slots = self.positions[:, : self.slots], self._slots_after(q_len)
        return torch.nn.functional.pad(held, (0, slots - self.slots), value=-1) if slots > self.slots else held

    def begin_forward(self, plan: Plan, layers: set[int]) -> None:
        """After the forward's plan is built (from ``held_positions``): work out where each incoming key goes
        and note the incoming positions. Reads the plan, writes nothing into it."""
        if plan.query_seq is not None:
            raise ValueError(
                "swaa's bounded KV cache cannot hold packed sequences (positions restart inside a row); run packed"
                " batches without a cache (use_cache=False) or patch with bounded_cache=False"
            )
        incoming = plan.query_pos
        if not self.static:
            self._grow(incoming.shape[1], incoming)
        self.handed = 0 if self.fresh else self.slots
        self.fresh = False
        if self.positions is None:
            self.allocate(incoming.shape[0], incoming.device)
        # the row's latest position (the scratch slot only ever holds positions seen before, never later ones)
        last = torch.maximum(self.positions.amax(-1, keepdim=True), incoming.amax(-1, keepdim=True))
        later = (incoming >= 0) & still_visible(self.rule, incoming, last + 1)
        slot = ring_slot(self.rule, incoming, self.slots)
        self.write_index = torch.where(later, slot, self.slots)
        self.positions.scatter_(1, self.write_index, incoming)
        self.pending = set(layers)

    def _slots_after(self, q_len: int) -> int:
        """Slots once ``q_len`` more tokens come: a dynamic ring doubles (never past ``capacity``) while the
        context is shorter than the capacity."""
        needed = min(self.capacity, self.seen + q_len)
        if self.static or needed <= self.slots:
            return self.slots
        return min(self.capacity, max(needed, 2 * self.slots))

    def _grow(self, q_len: int, incoming: torch.Tensor) -> None:
        """A dynamic ring: make room for ``q_len`` more tokens while the context is shorter than the capacity."""
        slots = self._slots_after(q_len)
        self.seen += q_len
        if slots == self.slots:
            return
        if self.positions is not None:
            grown = torch.full((self.positions.shape[0], slots + 1), -1, dtype=torch.long, device=incoming.device)
            grown[:, : self.slots] = self.positions[:, : self.slots]
            self.positions = grown
        self.slots = slots

    def reorder(self, index: torch.Tensor) -> None:
        if self.positions is not None:
            self.positions.copy_(self.positions.index_select(0, index.to(self.positions.device)))

    def select(self, indices) -> None:
        if self.positions is not None:
            self.positions = self.positions[indices]

    def repeat(self, repeats: int) -> None:
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def reset(self) -> None:
        self.fresh = True
        if self.positions is not None:
            self.positions.fill_(-1)
        if not self.static:
            self.positions, self.slots, self.seen = None, 0, 0


class RingLayer(CacheLayerMixin):
    """Cache layer of an SWA layer without FA decode: keeps the sinks and the latest keys in the slots of
    ``RingSlots``. keys, values: (batch, kv_heads, slots + 1, head_dim); their last slot is scratch. Hands
    attention the held keys followed by the incoming ones: (batch, kv_heads, ring.handed + q_len, d).
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
        self.keys = self._empty(key_states)
        self.values = self._empty(value_states)
        if self.ring.static:
            self.cumulative_length = self.cumulative_length.to(self.device)
            if not torch.compiler.is_compiling():  # else the compiled prefill marks them after its graph
                _mark_fixed_addresses_of(self)
        self.is_initialized = True

    def _empty(self, states: torch.Tensor) -> torch.Tensor:
        batch, heads, _, dim = states.shape
        return torch.zeros(batch, heads, self.ring.slots + 1, dim, dtype=states.dtype, device=states.device)

    def _grown(self, held: torch.Tensor) -> torch.Tensor:
        """``held`` in a ring that grew (dynamic): every key stays in the slot of its own index."""
        grown = self._empty(held)
        grown[:, :, : held.shape[2] - 1] = held[:, :, :-1]
        return grown

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
        if self.keys.shape[2] != slots + 1:
            self.keys, self.values = self._grown(self.keys), self._grown(self.values)
        handed = self.ring.handed
        keys = _held_then_incoming(self.keys[:, :, :handed], key_states, dim=-2)
        values = _held_then_incoming(self.values[:, :, :handed], value_states, dim=-2)
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
        if self.ring.static:
            if self.is_initialized:
                self.keys.zero_()
                self.values.zero_()
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

    def _layers(self, rules, bounded: bool, max_cache_len: int | None, other) -> list:
        """The cache's layers: ring layers for the layers that may forget old keys (when ``bounded`` and the ring
        would be smaller than the cache), ``other()`` for the rest. ``max_cache_len``: static, else None."""
        self.rules = tuple(rules)
        windows = {(rule.window, rule.sink) for rule in self.rules if forgets_old_keys(rule)}
        if len(windows) > 1:
            raise ValueError(f"swaa's cache holds one window and sink for its bounded layers, got {sorted(windows)}")
        rule = next((rule for rule in self.rules if forgets_old_keys(rule)), None)
        static = max_cache_len is not None
        # a static ring no smaller than the cache would save nothing: those layers keep every token then
        use_ring = bounded and rule is not None and (not static or kept_keys(rule) < max_cache_len)
        self.ring = RingSlots(rule, kept_keys(rule), static) if use_ring else None
        return [RingLayer(self.ring, index, max_cache_len) if self.ring and forgets_old_keys(r) else other()
                for index, r in enumerate(self.rules)]

    def ring_layers(self) -> frozenset:
        """The layers whose keys a ring holds (none without a ring)."""
        return frozenset(layer.layer_idx for layer in self.layers if isinstance(layer, RingLayer))

    def held_positions(self, q_len: int) -> torch.Tensor | None:
        """What ``plan_forward`` reads of the ring before a forward: ``RingSlots.held_positions``."""
        return None if self.ring is None else self.ring.held_positions(q_len)

    def begin_forward(self, plan: Plan) -> None:
        """After the forward's plan is built: the ring notes where this forward's keys go."""
        if self.ring is not None:
            self.ring.begin_forward(plan, self.ring_layers())

    def stored_lengths(self) -> list[int]:
        """Key slots each layer holds (ring layers: at most sinks + window - 1): what the memory benchmark reads."""
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
        if self.ring is not None:
            self.ring.reset()


class SWAACache(_SWAACacheMixin, DynamicCache):
    """Dynamic cache of a patched model: full-attention and FA-decode layers grow (``DynamicLayer``), bounded
    layers are rings (``RingLayer``) that grow with the context up to the keys they must keep."""

    def __init__(self, rules: tuple[LayerRule, ...]):
        Cache.__init__(self, layers=self._layers(rules, True, None, DynamicLayer))

    def __iter__(self):
        raise NotImplementedError("swaa's bounded KV cache cannot be flattened into per-layer tensors (DDP)")


class SWAAStaticCache(_SWAACacheMixin, StaticCache):
    """Static cache of a patched model, for ``generate(cache_implementation="static")`` and compiled decoding:
    full-attention and FA-decode layers are fixed layers of ``max_cache_len`` slots (``StaticLayer``), bounded
    layers (with ``bounded``) fixed rings; every shape is fixed and every update in place, so a decode step
    can be captured in a CUDA graph."""

    def __init__(self, rules: tuple[LayerRule, ...], max_cache_len: int, bounded: bool = True):
        Cache.__init__(self, layers=self._layers(
            rules, bounded, max_cache_len, lambda: StaticLayer(max_cache_len=max_cache_len)))

    def early_initialization(self, batch_size: int, num_heads, head_dim, dtype: torch.dtype,
                             device: torch.device) -> None:
        super().early_initialization(batch_size, num_heads, head_dim, dtype, device)
        if self.ring is not None:
            self.ring.allocate(batch_size, torch.device(device))

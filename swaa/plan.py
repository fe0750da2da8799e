"""The per-forward plan: for every token of one forward, which sequence it belongs to, its position in that
sequence and whether it is a prompt or a generated token; the same for every key a layer will see.

``plan_forward`` builds it once per forward (the patch's hook on the decoder calls it, before any layer runs)
from explicit inputs, and every backend and every cache reads only the plan. Positions count the real tokens
of a sequence from its first one (``docs/rules.md``); they come from the 2D padding mask over the cache's
slots, or from ``position_ids`` that start new sequences inside a row (packed rows, no cache), else from the
slot index. Whether a query is generated comes from exactly one entry path:

- inside ``generate``: swaa's generate wrappers hand the decoder ``GENERATE_KWARG``, the cache index where
  generated tokens start (or ``Prefill`` while the prompt is read: everything is prompt);
- teacher forcing: ``labels`` (each sequence's answer starts at its first label that is not -100) or
  ``prompt_len`` (real prompt tokens per row);
- a bare forward with neither: one query onto a non-empty cache is generated, anything else is prompt.

An input from which the plan cannot be told exactly raises ``ValueError`` saying what to pass instead.

Invariants (one author):

- ``plan_forward`` alone builds a forward's plan, from explicit inputs; what the cache knows is one of them
  (a bounded cache's ring layers and the positions of the keys they hold: ``caches.RingSlots.held_positions``,
  read before the forward and changing nothing).
- It writes into none of its inputs, and nothing writes into a plan once it is built: the cache
  (``begin_forward``), the attention call and the backends only read it. The one exception is ``Plan.memo``,
  a per-forward store of values derived from the plan alone (a block mask, FA2's call lists, the answers of
  ``plain`` and ``any_generated``), filled on first use.
- One forward per cache at a time: from planning to the last layer's update, a bounded cache's ring holds
  that forward's state (which slot each incoming key goes to).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .rules import LayerRule, decodes_differently, sees_whole_prefix, visible

GENERATE_KWARG = "swaa_prompt_end"  # from swaa's generate wrappers to the decoder: see Prefill and plan_forward
PROMPT_LEN_KWARG = "prompt_len"


class Prefill:
    """``GENERATE_KWARG`` while ``generate`` reads its prompt: every token of these forwards is a prompt token
    (chunks, a reused prefix and extra leading tokens such as peft's virtual tokens included). ``plan_forward``
    only asks whether it is one. ``slots``: a forward without a cache notes there, through ``note_slots``
    (the patch's hook, after planning), how many slots it read: where generated tokens start once the prefill
    ends (``generate`` reads it back; the decoder alone sees leading tokens added on the way)."""

    __slots__ = ("slots",)

    def __init__(self):
        self.slots = 0

    def note_slots(self, slots: int) -> None:
        self.slots = slots


@dataclass
class Plan:
    """Positions of one forward call; ``-1`` marks padding and cache slots not written yet.

    query_pos: (batch, q_len) int64, the position of each query in its sequence.
    key_pos: (batch, kv_len) int64, the same for each key slot a layer that keeps every key gets (queries
        included); ``keys_of`` gives the keys of a layer whose cache dropped old ones.
    query_generated: (batch, q_len) bool, True for generated (decode) tokens.
    query_seq, key_seq: (batch, q_len), (batch, kv_len) int64 packed-sequence ids, or None when each row
        holds one sequence.
    positions_are_indices: True when known without looking at the tensors that every key sits at its index
        (no padding mask, packing or unwritten slots), False when known otherwise, None when unknown.
    may_be_generated: False when known that no query is a generated token, None when unknown.
    unwritten_tail: the layers' keys may run past ``kv_len`` into slots never written (a static cache
        hands every slot); attention then reads the first ``kv_len``.
    ring_layers, ring: the layers whose cache keeps only the keys a later query can see, and this forward's
        queries against exactly the keys those layers hand attention (held + incoming).

    Everything is built with tensor operations only, so that a decode step can be compiled and captured in
    a CUDA graph: the questions that need a look at values (``plain``, ``any_generated``) are asked only
    where an answer is worth a host sync (eager prefill), and answered conservatively under compilation.
    """

    query_pos: torch.Tensor
    key_pos: torch.Tensor
    query_generated: torch.Tensor
    query_seq: torch.Tensor | None = None
    key_seq: torch.Tensor | None = None
    positions_are_indices: bool | None = False
    may_be_generated: bool | None = None
    unwritten_tail: bool = False
    ring_layers: frozenset = frozenset()
    ring: Plan | None = None
    memo: dict = field(default_factory=dict, repr=False)

    @property
    def kv_len(self) -> int:
        return self.key_pos.shape[1]

    def keys_of(self, layer: int) -> Plan:
        """The plan over the keys layer ``layer`` hands its attention."""
        return self.ring if layer in self.ring_layers else self

    def with_keys(self, key_pos: torch.Tensor) -> Plan:
        """This forward's queries against other keys: ``key_pos`` (batch, n) int64, the positions of the keys
        a layer really holds (a bounded cache layer's slots + the new keys; -1 marks an empty slot)."""
        if self.query_seq is not None:
            raise ValueError("with_keys: a plan of packed sequences keeps its own keys")
        return Plan(self.query_pos, key_pos, self.query_generated, may_be_generated=self.may_be_generated)

    def with_ring(self, key_pos: torch.Tensor, layers: frozenset) -> Plan:
        """This plan, and for ``layers`` the keys of ``key_pos`` (see ``with_keys``)."""
        return replace(self, ring_layers=frozenset(layers), ring=self.with_keys(key_pos), memo={})

    def to(self, device: torch.device) -> Plan:
        """This plan on ``device`` (layers spread over GPUs); the copy is kept for the other layers."""
        if self.query_pos.device == device:
            return self
        key = ("device", device)
        if key not in self.memo:
            move = lambda t: None if t is None else t.to(device)  # noqa: E731
            self.memo[key] = replace(
                self, query_pos=move(self.query_pos), key_pos=move(self.key_pos),
                query_generated=move(self.query_generated), query_seq=move(self.query_seq),
                key_seq=move(self.key_seq), ring=None if self.ring is None else self.ring.to(device), memo={},
            )
        return self.memo[key]

    def plain(self) -> bool:
        """Every row is one sequence with no padding and all its keys, so position == index: the case
        where fused kernels need no position tensors."""
        def look():
            index = torch.arange(self.kv_len, device=self.key_pos.device)
            return self.query_seq is None and bool((self.key_pos == index).all())

        return self._answer("plain", self.positions_are_indices, False, look)

    def any_generated(self) -> bool:
        """Whether some query is a generated token."""
        return self._answer("any_generated", self.may_be_generated, True, lambda: bool(self.query_generated.any()))

    def all_generated(self) -> bool:
        """Whether every query is a generated token."""
        known = False if self.may_be_generated is False else None
        return self._answer("all_generated", known, False, lambda: bool(self.query_generated.all()))

    def generated_matters(self, rule: LayerRule) -> bool:
        """Whether ``rule`` treats some query of this forward as a generated token (FA decode, a generated
        query): else positions alone decide what each query sees."""
        return decodes_differently(rule) and self.any_generated()

    def sees_every_key(self, rule: LayerRule) -> bool:
        """Whether every query sees every key up to its own position, each key at its index (``plain``): a
        causal kernel then needs no mask. Told from the rule before any look at the tensors: a full layer, FA
        decode with every query generated, or a window from the last slot (on plain rows, no query sits later)
        that reaches the sinks."""
        last = self.kv_len - 1
        whole = rule.is_full or (rule.fa_decode and self.all_generated()) or sees_whole_prefix(rule, last, False)
        return whole and self.plain()

    def _answer(self, name: str, known: bool | None, compiling: bool, look) -> bool:
        """``known`` when the build could tell; while compiling, the answer that is always exact to assume
        (no host sync in a compiled step); else ``look()`` at the tensors once per plan (one host sync)."""
        if known is not None:
            return known
        if name in self.memo:  # looked at before a compiled forward (swaa.prefill): a constant of its graph
            return self.memo[name]
        if torch.compiler.is_compiling():
            return compiling
        self.memo[name] = look()
        return self.memo[name]

    def mask(self, rule: LayerRule) -> torch.Tensor:
        """Dense (batch, q_len, kv_len) bool mask of what each query sees under ``rule``; O(L^2) memory."""
        key = ("mask", *rule.key())
        if key not in self.memo:
            same_sequence = True
            if self.query_seq is not None:
                same_sequence = self.query_seq[:, :, None] == self.key_seq[:, None, :]
            self.memo[key] = visible(
                rule,
                self.query_pos[:, :, None],
                self.key_pos[:, None, :],
                self.query_generated[:, :, None],
                same_sequence,
            )
        return self.memo[key]


@dataclass
class _Keys:
    """Where every key slot of the forward sits: (batch, kv_len) positions and sequence ids (or None)."""

    pos: torch.Tensor
    seq: torch.Tensor | None
    positions_are_indices: bool | None


def plan_forward(
    *,
    batch_size: int,
    q_len: int,
    past_len: int | torch.Tensor,
    device: torch.device,
    key_slots: int | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    generate: Prefill | torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    prompt_len: torch.Tensor | int | None = None,
    from_embeddings: bool = False,
    static_cache: bool = False,
    ring_layers: frozenset = frozenset(),
    ring_held: torch.Tensor | None = None,
) -> Plan:
    """The plan of one forward of ``q_len`` new tokens per row onto ``past_len`` cached ones.

    ``key_slots``: for a static cache whose length so far is a tensor, its fixed size (slots past the written
    ones hold no key yet); else the keys are ``past_len + q_len``. ``generate``: what swaa's generate wrappers
    handed down (see ``GENERATE_KWARG``); ``prompt_len``, else ``labels``: teacher forcing (``prompt_len`` wins,
    and labels may then cover only the answer, for the loss); none of them: the bare-forward rule. ``from_embeddings``: the tokens came as ``inputs_embeds``, which may hold leading tokens
    the caller never saw (peft's virtual tokens), so a ``prompt_len`` counted by the caller cannot be trusted.
    ``static_cache``: the layers get every slot of a static cache, written or not (``Plan.unwritten_tail``).
    ``ring_layers``, ``ring_held``: what a bounded cache knows before the forward: its ring layers, and the
    positions (batch, n) of the held keys they hand attention before the incoming ones (None from a fresh ring,
    which hands only the incoming keys; ``caches.RingSlots.held_positions``).
    """
    if generate is not None and prompt_len is not None:
        raise ValueError("prompt_len inside generate: generate itself says where the prompt ends; drop prompt_len")
    keys = _key_positions(batch_size, q_len, past_len, device, key_slots, attention_mask, position_ids)
    cache_index = torch.arange(q_len, device=device) + past_len  # (q_len,): cache slot of each query
    query_pos = keys.pos.index_select(1, cache_index)
    query_seq = None if keys.seq is None else keys.seq.index_select(1, cache_index)
    if attention_mask is not None and position_ids is not None and q_len > 1 and not isinstance(generate, Prefill):
        check_one_sequence_per_row(position_ids, query_pos >= 0)  # generate's prompt: checked once, before it

    may_be_generated = None
    if isinstance(generate, Prefill):
        generated, may_be_generated = torch.zeros_like(query_pos, dtype=torch.bool), False
    elif generate is not None:
        generated = cache_index >= torch.as_tensor(generate, device=device).reshape(-1, 1)
    elif prompt_len is None and labels is not None:
        generated = _after_first_answer_label(_checked_labels(labels, batch_size, q_len), query_pos,
                                              keys.seq is not None)
    elif prompt_len is not None:
        if from_embeddings:
            raise ValueError(
                "prompt_len with inputs_embeds: the embeddings may hold leading tokens the caller did not count"
                " (peft's virtual tokens), so swaa cannot place the answer; pass labels with the prompt as -100"
            )
        if keys.seq is not None:
            raise ValueError(
                "prompt_len with packed rows (position_ids restart inside a row): one length per row cannot place"
                " each packed sequence's answer; pass labels with each prompt masked as -100"
            )
        generated = query_pos >= _checked_prompt_len(prompt_len, batch_size, device)
    elif q_len == 1:  # the bare-forward rule: one query onto a non-empty cache
        generated = (cache_index > 0).expand(batch_size, -1)
    else:
        generated, may_be_generated = torch.zeros_like(query_pos, dtype=torch.bool), False
    plan = Plan(query_pos, keys.pos, generated & (query_pos >= 0), query_seq, keys.seq, keys.positions_are_indices,
                may_be_generated, unwritten_tail=static_cache)
    if not ring_layers or (ring_held is None and plan.kv_len == q_len):
        return plan  # a fresh ring hands the forward's own keys: its layers attend as the others
    ring_keys = query_pos if ring_held is None else torch.cat([ring_held, query_pos], dim=-1)
    return plan.with_ring(ring_keys, ring_layers)


def _key_positions(batch_size, q_len, past_len, device, key_slots, attention_mask, position_ids) -> _Keys:
    """Positions from the 2D padding mask over the cache's slots, or from ``position_ids`` that start new
    sequences inside a row (packed rows), else 0, 1, 2, ... along the slots written so far."""
    static = key_slots is not None
    if key_slots is None:
        key_slots = past_len + q_len
    slot = torch.arange(key_slots, device=device)
    packed = (attention_mask is None and position_ids is not None and q_len > 1 and not static
              and _starts_sequences(position_ids))
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or (
            attention_mask.shape[1] != key_slots if not static else attention_mask.shape[1] > key_slots
        ):
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)}: swaa needs a 2D padding mask of shape"
                f" (batch, cached + new tokens) = ({batch_size}, {key_slots}); the cache holds {past_len} tokens"
                f" and the input {q_len}"
            )
        real = attention_mask.to(device=device, dtype=torch.bool)
        if real.shape[1] != key_slots:  # static: the slots past the mask are unwritten
            real = torch.nn.functional.pad(real, (0, key_slots - real.shape[1]))
        if static:
            real = real & (slot < past_len + q_len)
        return _Keys(torch.where(real, real.long().cumsum(-1) - 1, -1), None, None)
    if packed:
        if not (isinstance(past_len, int) and past_len == 0):
            raise ValueError(
                "position_ids start new sequences inside a row (packed rows) of a forward onto a non-empty cache:"
                " a cache holds one sequence per row; run packed rows without a cache (use_cache=False)"
            )
        ids = position_ids.to(device=device, dtype=torch.long).expand(batch_size, -1)
        starts = _sequence_starts(ids)
        seq = starts.long().cumsum(-1)
        first_slot = torch.where(starts, slot, 0).cummax(-1).values  # slot where each token's sequence starts
        return _Keys(slot - first_slot, seq, False)
    key_pos = torch.where(slot < past_len + q_len, slot, -1) if static else slot
    return _Keys(key_pos.expand(batch_size, -1), None, not static)


def _sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, n) bool: a token starts a sequence when it is the row's first, or its position id is not one
    more than the previous token's (a packed row restarting at 0, or a chunk of a document at its offset)."""
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    return step != 1


# The two looks at position ids' values below run eagerly also in a compiled forward (a graph break there): an
# answer assumed without looking would silently merge packed sequences. A compiled decode step (one query) never
# gets here.
@torch.compiler.disable
def _starts_sequences(position_ids: torch.Tensor) -> bool:
    """True when ``position_ids`` (batch or 1, n) start a new sequence inside some row: packed rows."""
    if position_ids.dim() != 2:
        raise ValueError(
            f"position_ids of shape {tuple(position_ids.shape)}: swaa reads 2D position ids (batch, tokens); models"
            " with several position streams (multimodal RoPE) are not supported"
        )
    return bool(_sequence_starts(position_ids)[:, 1:].any())


PACKED_ROWS_ADVICE = ("while an attention_mask is given: swaa cannot tell packed sequences from one padded sequence;"
                      " pass packed rows without attention_mask (as DataCollatorWithFlattening does) or one sequence"
                      " per row with its padding mask")
GENERATE_ADVICE = ("in generate, where each row is one sequence (a cache holds one per row): pass position ids that"
                   " count up by one over each row's real tokens, or none")


@torch.compiler.disable
def check_one_sequence_per_row(position_ids: torch.Tensor, real: torch.Tensor, advice: str = PACKED_ROWS_ADVICE):
    """Where each row is one sequence (a padding mask, generate), its real tokens' position ids must count up by
    one; ``advice`` says what to pass instead."""
    if position_ids.dim() != 2 or position_ids.shape[-1] != real.shape[-1]:
        return  # not per-token positions of this forward (e.g. multimodal streams): the mask alone decides
    ids = position_ids.to(real.device).expand(real.shape[0], -1)
    previous = torch.where(real, ids, torch.iinfo(ids.dtype).min).cummax(-1).values  # last real id so far
    breaks = real[:, 1:] & (previous[:, :-1] != torch.iinfo(ids.dtype).min) & (ids[:, 1:] != previous[:, :-1] + 1)
    if bool(breaks.any()):
        row = int(breaks.any(-1).nonzero()[0])
        raise ValueError(f"position_ids restart inside row {row} {advice}")


def _checked_labels(labels, batch_size: int, q_len: int) -> torch.Tensor:
    """Token labels of this forward's tokens (one per token), or a clear error. Cached tokens (a reused prompt,
    peft's prefix) come before them: prompt."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or tuple(labels.shape) != (batch_size, q_len):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"labels of shape {shape}: swaa reads token labels (batch, tokens) = ({batch_size}, {q_len}), the prompt"
            " masked as -100, to find where each answer starts; pass prompt_len=<real prompt tokens per row> instead"
        )
    return labels


def _checked_prompt_len(prompt_len, batch_size: int, device: torch.device) -> torch.Tensor:
    """``prompt_len`` (real prompt tokens: one int, or one per row) as a (batch, 1) tensor, or a clear error."""
    error = ValueError(
        f"prompt_len={prompt_len!r}: must be an int >= 0 (real prompt tokens of every row) or {batch_size} such"
        " ints, one per row (a list, or a tensor of shape (batch,) or (batch, 1)), each below 2**63"
    )
    try:  # torch's own errors for a string, a None or an int past int64 name no field
        values = torch.as_tensor(prompt_len)
    except (TypeError, RuntimeError, ValueError):
        raise error from None
    if values.dim() == 2 and values.shape[1] == 1:  # one per row, as a column
        values = values[:, 0]
    if values.dtype == torch.bool or values.is_floating_point() or values.is_complex() or values.dim() > 1 or (
            values.dim() == 1 and values.shape[0] != batch_size) or bool((values < 0).any()):
        raise error
    return values.to(device).reshape(-1, 1)


def _after_first_answer_label(labels: torch.Tensor, query_pos: torch.Tensor, packed: bool) -> torch.Tensor:
    """(batch, q_len) bool: the token is at or after the first non -100 label of its sequence."""
    answer = (labels != -100).long().to(query_pos.device)
    answers_so_far = answer.cumsum(-1)
    if not packed:
        return answers_so_far > 0
    index = torch.arange(labels.shape[1], device=query_pos.device)
    sequence_start = index - query_pos.clamp(min=0)  # positions count from each sequence's first token
    before_sequence = (answers_so_far - answer).gather(-1, sequence_start)
    return answers_so_far - before_sequence > 0

"""Where each query and key of one forward call sits: position in its sequence, which packed sequence,
and whether the query is a prompt or a generated token.

Built once per forward (by the patch's hook on the decoder) and shared by every layer; backends read it
and memoize what they derive from it in ``memo``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .rules import LayerRule, visible


@dataclass
class Layout:
    """Positions of one forward call; ``-1`` marks padding and cache slots not written yet.

    query_pos: (batch, q_len) int64, the real-token position of each query.
    key_pos: (batch, kv_len) int64, the same for each key slot the layer's attention gets (queries included).
    query_generated: (batch, q_len) bool, True for generated (decode) tokens.
    query_seq, key_seq: (batch, q_len), (batch, kv_len) int64 packed-sequence ids, or None when each
        row holds one sequence.
    positions_are_indices: True when known without looking at the tensors that every key sits at its index
        (no padding mask, packing or unwritten slots), False when known otherwise, None when unknown.
    may_be_generated: False when known that no query is a generated token, None when unknown.

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
    memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        *,
        batch_size: int,
        q_len: int,
        past_len: int | torch.Tensor,
        device: torch.device,
        key_slots: int | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prompt_end: int | torch.Tensor | None = None,
        prompt_len: torch.Tensor | int | None = None,
        labels: torch.Tensor | None = None,
    ) -> Layout:
        """Positions from the 2D padding mask over the cache's slots, or from restarting ``position_ids``
        (packed sequences, no cache), else 0, 1, 2, ... along the slots written so far.

        ``past_len``: tokens already in the cache, an int or (static caches) a 0-d tensor. ``key_slots``: the
        number of key slots a full layer hands to attention: ``past_len + q_len`` (default) or, for a static
        cache, its fixed size, whose slots past the written ones hold no key yet (position -1).

        Prompt or generated, in this order: ``prompt_end`` (inside ``generate``: cache index where
        generated tokens start), ``prompt_len`` (teacher forcing: real prompt tokens per row), ``labels``
        (teacher forcing: each sequence's answer starts at its first label that is not -100), else the
        bare-forward rule: one query onto a non-empty cache is generated.
        """
        static = key_slots is not None
        if key_slots is None:
            key_slots = past_len + q_len
        cache_index = torch.arange(q_len, device=device) + past_len  # (q_len,): cache slot of each query
        query_seq = key_seq = None
        slot = torch.arange(key_slots, device=device)
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
            key_pos = torch.where(real, real.long().cumsum(-1) - 1, -1)
            positions_are_indices = None
        elif position_ids is not None and not static and past_len == 0 and _restarts(position_ids):
            key_pos = position_ids.to(device=device, dtype=torch.long).expand(batch_size, -1)
            step = torch.diff(key_pos, dim=-1, prepend=key_pos[:, :1] - 1)
            key_seq = (step != 1).long().cumsum(-1)
            query_seq = key_seq
            positions_are_indices = False
        else:
            key_pos = torch.where(slot < past_len + q_len, slot, -1) if static else slot
            key_pos = key_pos.expand(batch_size, -1)
            positions_are_indices = not static
        query_pos = key_pos.index_select(1, cache_index)

        may_be_generated = None
        if prompt_end is not None:
            generated = (cache_index >= prompt_end).expand(batch_size, -1)
        elif prompt_len is not None:
            generated = query_pos >= _checked_prompt_len(prompt_len, batch_size, device)
        elif labels is not None:
            generated = _after_first_answer_label(labels.to(device), query_pos)
        elif q_len == 1:  # the bare-forward rule: one query onto a non-empty cache
            generated = (cache_index > 0).expand(batch_size, -1)
        else:
            generated = torch.zeros(batch_size, q_len, dtype=torch.bool, device=device)
            may_be_generated = False
        return cls(query_pos, key_pos, generated & (query_pos >= 0), query_seq, key_seq, positions_are_indices,
                   may_be_generated)

    def to(self, device: torch.device) -> Layout:
        """This layout on ``device`` (layers spread over GPUs); the copy is kept for the other layers."""
        if self.query_pos.device == device:
            return self
        key = ("device", device)
        if key not in self.memo:
            move = lambda t: None if t is None else t.to(device)  # noqa: E731
            self.memo[key] = Layout(
                *(move(t) for t in (self.query_pos, self.key_pos, self.query_generated, self.query_seq, self.key_seq)),
                self.positions_are_indices, self.may_be_generated,
            )
        return self.memo[key]

    def with_keys(self, key_pos: torch.Tensor) -> Layout:
        """This forward's queries against other keys: ``key_pos`` (batch, n) int64, the positions of the keys
        a layer really holds (a bounded cache layer's slots + the new keys; -1 marks an empty slot)."""
        if self.query_seq is not None:
            raise ValueError("with_keys: a layout of packed sequences keeps its own keys")
        return Layout(self.query_pos, key_pos, self.query_generated, may_be_generated=self.may_be_generated)

    def plain(self) -> bool:
        """Every row is one sequence with no padding and all its keys, so position == index: the case
        where fused kernels need no position tensors."""
        def look():
            index = torch.arange(self.key_pos.shape[1], device=self.key_pos.device)
            return self.query_seq is None and bool((self.key_pos == index).all())

        return self._answer("plain", self.positions_are_indices, False, look)

    def any_generated(self) -> bool:
        """Whether some query is a generated token."""
        return self._answer("any_generated", self.may_be_generated, True, lambda: bool(self.query_generated.any()))

    def all_generated(self) -> bool:
        """Whether every query is a generated token."""
        known = False if self.may_be_generated is False else None
        return self._answer("all_generated", known, False, lambda: bool(self.query_generated.all()))

    def _answer(self, name: str, known: bool | None, compiling: bool, look) -> bool:
        """``known`` when the build could tell; while compiling, the answer that is always exact to assume
        (no host sync in a compiled step); else ``look()`` at the tensors once per layout (one host sync)."""
        if known is not None:
            return known
        if torch.compiler.is_compiling():
            return compiling
        if name not in self.memo:
            self.memo[name] = look()
        return self.memo[name]

    def mask(self, rule: LayerRule) -> torch.Tensor:
        """Dense (batch, q_len, kv_len) bool mask of what each query sees under ``rule``; O(L^2) memory."""
        key = ("mask", *rule_key(rule))
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


def rule_key(rule: LayerRule) -> tuple:
    """A rule as plain values, for memo keys that a compiled step can hash without tracing a dataclass."""
    return (rule.window, rule.sink, rule.fa_decode)


def _checked_prompt_len(prompt_len, batch_size: int, device: torch.device) -> torch.Tensor:
    """``prompt_len`` (real prompt tokens: one int, or one per row) as a (batch, 1) tensor, or a clear error."""
    values = torch.as_tensor(prompt_len)
    if values.dtype == torch.bool or values.is_floating_point() or values.is_complex() or values.dim() > 1 or (
            values.dim() == 1 and values.shape[0] != batch_size) or bool((values < 0).any()):
        raise ValueError(
            f"prompt_len={prompt_len!r}: must be an int >= 0 (real prompt tokens of every row) or {batch_size} such"
            " ints, one per row"
        )
    return values.to(device).reshape(-1, 1)


def _after_first_answer_label(labels: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """(batch, q_len) bool: the token is at or after the first non -100 label of its sequence."""
    answer = (labels != -100).long()
    answers_so_far = answer.cumsum(-1)
    index = torch.arange(labels.shape[1], device=labels.device)
    sequence_start = index - query_pos.clamp(min=0)  # positions count from each sequence's first token
    before_sequence = (answers_so_far - answer).gather(-1, sequence_start)
    return answers_so_far - before_sequence > 0


def _restarts(position_ids: torch.Tensor) -> bool:
    """True when positions restart inside a row: several sequences packed into one row."""
    return bool((torch.diff(position_ids, dim=-1) != 1).any())

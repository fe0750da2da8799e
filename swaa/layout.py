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
    """Positions of one forward call; ``-1`` marks padding.

    query_pos: (batch, q_len) int64, the real-token position of each query.
    key_pos: (batch, kv_len) int64, the same for each key in the cache (queries included, last).
    query_generated: (batch, q_len) bool, True for generated (decode) tokens.
    query_seq, key_seq: (batch, q_len), (batch, kv_len) int64 packed-sequence ids, or None when each
        row holds one sequence.
    """

    query_pos: torch.Tensor
    key_pos: torch.Tensor
    query_generated: torch.Tensor
    query_seq: torch.Tensor | None = None
    key_seq: torch.Tensor | None = None
    memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        *,
        batch_size: int,
        q_len: int,
        past_len: int,
        device: torch.device,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        prompt_end: int | None = None,
        prompt_len: torch.Tensor | int | None = None,
        labels: torch.Tensor | None = None,
    ) -> Layout:
        """Positions from the 2D padding mask over cache + input, or from restarting ``position_ids``
        (packed sequences, no cache), else 0, 1, 2, ... along the cache.

        Prompt or generated, in this order: ``prompt_end`` (inside ``generate``: cache index where
        generated tokens start), ``prompt_len`` (teacher forcing: real prompt tokens per row),
        ``labels`` (teacher forcing: each sequence's answer starts at its first label that is not
        -100), else the bare-forward rule: one query onto a non-empty cache is generated.
        """
        kv_len = past_len + q_len
        query_seq = key_seq = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (batch_size, kv_len):
                raise ValueError(
                    f"attention_mask of shape {tuple(attention_mask.shape)}: swaa needs a 2D padding mask of shape"
                    f" (batch, cached + new tokens) = ({batch_size}, {kv_len}); the cache holds {past_len} tokens"
                    f" and the input {q_len}"
                )
            real = attention_mask.to(device=device, dtype=torch.bool)
            key_pos = torch.where(real, real.long().cumsum(-1) - 1, -1)
        elif position_ids is not None and past_len == 0 and _restarts(position_ids):
            key_pos = position_ids.to(device=device, dtype=torch.long).expand(batch_size, -1)
            step = torch.diff(key_pos, dim=-1, prepend=key_pos[:, :1] - 1)
            key_seq = (step != 1).long().cumsum(-1)
            query_seq = key_seq
        else:
            key_pos = torch.arange(kv_len, device=device).expand(batch_size, -1)
        query_pos = key_pos[:, past_len:]

        if prompt_end is not None:
            cache_index = torch.arange(past_len, kv_len, device=device)
            generated = (cache_index >= prompt_end).expand(batch_size, -1)
        elif prompt_len is not None:
            prompt_len = torch.as_tensor(prompt_len, device=device).reshape(-1, 1)
            generated = query_pos >= prompt_len
        elif labels is not None:
            generated = _after_first_answer_label(labels.to(device), query_pos)
        else:
            generated = torch.full((batch_size, q_len), q_len == 1 and past_len > 0, device=device)
        return cls(query_pos, key_pos, generated & (query_pos >= 0), query_seq, key_seq)

    def to(self, device: torch.device) -> Layout:
        """This layout on ``device`` (layers spread over GPUs); the copy is kept for the other layers."""
        if self.query_pos.device == device:
            return self
        key = ("device", device)
        if key not in self.memo:
            move = lambda t: None if t is None else t.to(device)  # noqa: E731
            self.memo[key] = Layout(
                *(move(t) for t in (self.query_pos, self.key_pos, self.query_generated, self.query_seq, self.key_seq))
            )
        return self.memo[key]

    def with_keys(self, key_pos: torch.Tensor) -> Layout:
        """This forward's queries against other keys: ``key_pos`` (batch, n) int64, the positions of the keys
        a layer really holds (a bounded cache layer's kept keys + the new ones; -1 marks an empty slot).
        Memoized on the tensor's identity, so layers handed the same tensor share one layout and its memo."""
        if self.query_seq is not None:
            raise ValueError("with_keys: a layout of packed sequences keeps its own keys")
        key = ("keys", id(key_pos))
        hit = self.memo.get(key)
        if hit is None or hit[0] is not key_pos:
            hit = self.memo[key] = (key_pos, Layout(self.query_pos, key_pos, self.query_generated))
        return hit[1]

    def plain(self) -> bool:
        """Every row is one sequence with no padding and all its keys, so position == index: the case
        where fused kernels need no position tensors. Checked once per layout (one GPU sync)."""
        if "plain" not in self.memo:
            index = torch.arange(self.key_pos.shape[1], device=self.key_pos.device)
            self.memo["plain"] = self.query_seq is None and bool((self.key_pos == index).all())
        return self.memo["plain"]

    def mask(self, rule: LayerRule) -> torch.Tensor:
        """Dense (batch, q_len, kv_len) bool mask of what each query sees under ``rule``; O(L^2) memory."""
        key = ("mask", rule)
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

"""Kernel-level cases shared by the CPU and GPU backend tests: random q/k/v and plans, compared with the
float64 reference of tests/reference.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from reference import attention, positions, sees

from swaa.plan import plan_forward
from swaa.rules import LayerRule


@dataclass(frozen=True)
class Case:
    """One attention call: rows' real lengths (left padded to the longest), how many of the last tokens
    are queries (the rest is cache), where generated tokens start (cache index), and the layer rule."""

    lengths: tuple[int, ...]
    q_len: int | None  # None: every token is a query (prefill)
    rule: LayerRule
    prompt_end: int | None = None
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    packed: tuple[int, ...] | None = None  # one row holding sequences of these lengths, no cache
    keys_shuffled: bool = False  # keys held out of position order, as a bounded cache's ring holds them

    def __str__(self):
        rule = "full" if self.rule.is_full else f"w{self.rule.window}s{self.rule.sink}{'d' if self.rule.fa_decode else ''}"
        packed = f"-packed{list(self.packed)}" if self.packed else ""
        shuffled = "-shuffled" if self.keys_shuffled else ""
        return (f"{rule}-len{list(self.lengths)}-q{self.q_len}-gen{self.prompt_end}-gqa{self.heads // self.kv_heads}"
                f"{packed}{shuffled}")


def make_inputs(case: Case, device="cpu", dtype=torch.float64, seed=0):
    """(query, key, value, plan, expected mask (batch, q, kv) bool) for ``case``."""
    generator = torch.Generator().manual_seed(seed)
    if case.packed:
        total = sum(case.packed)
        mask2d = torch.ones(1, total, dtype=torch.long)
        position_rows = [[p for length in case.packed for p in range(length)]]
        seq_rows = [[i for i, length in enumerate(case.packed) for _ in range(length)]]
        q_len, past = total, 0
    else:
        total = max(case.lengths)
        mask2d = torch.zeros(len(case.lengths), total, dtype=torch.long)
        for row, length in enumerate(case.lengths):
            mask2d[row, total - length :] = 1
        position_rows = [positions(row.tolist()) for row in mask2d]
        seq_rows = None
        q_len = case.q_len or total
        past = total - q_len
    batch = mask2d.shape[0]
    query = torch.randn(batch, case.heads, q_len, case.head_dim, generator=generator, dtype=torch.float64)
    key = torch.randn(batch, case.kv_heads, total, case.head_dim, generator=generator, dtype=torch.float64)
    value = torch.randn(batch, case.kv_heads, total, case.head_dim, generator=generator, dtype=torch.float64)
    plan = plan_forward(
        batch_size=batch, q_len=q_len, past_len=past, device=torch.device(device),
        attention_mask=None if case.packed else mask2d.to(device),
        position_ids=torch.tensor(position_rows, device=device) if case.packed else None,
        generate=case.prompt_end,
    )
    expected = torch.zeros(batch, q_len, total, dtype=torch.bool)
    rule = case.rule
    for b in range(batch):
        pos = position_rows[b]
        for qi in range(q_len):
            i = past + qi
            generated = case.prompt_end is not None and i >= case.prompt_end
            for j in range(total):
                if pos[i] is None or pos[j] is None or j > i:
                    continue
                if seq_rows is not None and seq_rows[b][i] != seq_rows[b][j]:
                    continue
                expected[b, qi, j] = sees(pos[i], pos[j], generated=generated, full=rule.is_full,
                                          window=rule.window, sink=rule.sink, fa_decode=rule.fa_decode)
    if case.keys_shuffled:
        order = torch.randperm(total, generator=generator)
        key, value, expected = key[:, :, order], value[:, :, order], expected[..., order]
        plan = plan.with_keys(plan.key_pos[:, order.to(device)])
    move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return move(query), move(key), move(value), plan, expected


def reference_output(query, key, value, expected, scaling):
    """(batch, q, heads, d) float64 output of the plain reference."""
    output, _ = attention(query.cpu(), key.cpu(), value.cpu(), expected, scaling)
    return output.transpose(1, 2)


def output_and_gradients(attend, query, key, value, upstream):
    """``attend(query, key, value)`` -> (batch, q, heads, d), and dq, dk, dv for the gradient ``upstream``
    of that output: (output, dq, dk, dv), detached."""
    inputs = [t.detach().requires_grad_() for t in (query, key, value)]
    output = attend(*inputs)
    return output.detach(), *torch.autograd.grad(output, inputs, upstream.to(output))


W = LayerRule
CASES = [
    Case((9, 6, 3), None, W(3)),
    Case((9, 6, 3), None, W(3, sink=2)),
    Case((9, 6, 3), None, W(None)),
    Case((9, 6, 3), None, W(1)),
    Case((11, 11), None, W(20, sink=30)),  # window and sink longer than the sequence
    Case((13, 8), 5, W(4, sink=1)),  # a later prefill chunk onto a cache
    Case((13, 8), 5, W(4, sink=1, fa_decode=True), prompt_end=10),  # chunk crossing into generated tokens
    Case((13, 8), 1, W(4, sink=2, fa_decode=True), prompt_end=12),  # decode, FA decode on
    Case((13, 8), 1, W(4, sink=2, fa_decode=False), prompt_end=12),  # decode, FA decode off
    Case((13, 8), 3, W(3, sink=1, fa_decode=True), prompt_end=11),  # several generated tokens at once
    Case((13,), 1, W(4, sink=2, fa_decode=True), prompt_end=12),  # decode without padding
    Case((13,), 1, W(4, sink=2), prompt_end=12),
    Case((13,), 1, W(4, sink=9), prompt_end=12),  # sinks and window cover the whole cache
    Case((11,), None, W(None)),  # full-attention prefill without padding
    Case((7,), None, W(3, sink=1), heads=4, kv_heads=4),
    Case((7,), None, W(3, sink=1), heads=8, kv_heads=1),
    Case((1,), None, W(3, sink=1), packed=(5, 1, 7, 3)),
    Case((1,), None, W(2, sink=2), packed=(6, 6)),
    Case((13, 8), 5, W(4, sink=1), keys_shuffled=True),  # a prefill chunk onto a ring's slots
    Case((13, 8), 1, W(4, sink=2), prompt_end=12, keys_shuffled=True),  # decode from a ring
    # decode over long caches and odd lengths, padded rows among them
    Case((33 * 256 + 5, 5000), 1, W(64, sink=4, fa_decode=True), prompt_end=33 * 256 + 4),
    Case((33 * 256,), 1, W(64, sink=4), prompt_end=33 * 256 - 1),
    # rows of very different lengths, left-padded: the shortest sees few of the cache's keys
    Case((300, 40, 200), 1, W(8, sink=2, fa_decode=True), prompt_end=299),
    Case((256 + 3, 100), 1, W(16, sink=3), prompt_end=256 + 2),
]

# Training calls (several queries each) for the gradient tests: CASES without decode steps, and larger ones
# where windowed queries of several lengths merge sinks, with GQA, padding and packing.
GRADIENT_CASES = [c for c in CASES if c.q_len != 1] + [
    Case((29, 17, 5), None, W(6, sink=3), heads=8, kv_heads=2),
    Case((23, 23), None, W(5, sink=0), heads=4, kv_heads=1),
    Case((21, 14), None, W(4, sink=2, fa_decode=True), prompt_end=15),  # answers see every key (FA decode)
    Case((1,), None, W(4, sink=2), packed=(12, 3, 9), heads=6, kv_heads=3),
]


def takes(backend, case: Case, expected: torch.Tensor) -> bool:
    """Whether ``backend`` (a ``swaa.backends.Backend``) should take ``case`` (float64, no weights, no dropout),
    judged from the case and its expected mask alone: sdpa, the calls that need no mask (keys at their indices,
    each query seeing every key up to its own), of one query per row or of a full-attention layer's prompt with
    no cache (a windowed layer's prompt is refused even where its window covers it); every other backend, every
    kernel case, but windowed its packed ones (it takes one sequence per row)."""
    if backend.name == "windowed":
        return not case.packed
    if backend.name != "sdpa":
        return True
    q_len, kv_len = expected.shape[-2:]
    at_index = len(set(case.lengths)) == 1 and not case.packed and not case.keys_shuffled
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    shape = q_len == 1 or (case.rule.is_full and q_len == kv_len)
    return at_index and shape and bool((expected == causal).all())

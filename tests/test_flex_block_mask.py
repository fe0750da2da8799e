"""The flex backend's block mask (CPU-checkable): it lists every block holding a visible pair, its full
blocks hold only visible pairs, and it stays sparse for SWA layers."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CASES, make_inputs

from swaa.backends import flex
from swaa.plan import plan_forward
from swaa.rules import LayerRule


def dense_blocks(mask_blocks, n_q, n_k):
    """(batch, nq, nk) bool of listed blocks from (num, indices)."""
    num, indices = mask_blocks
    batch = num.shape[0]
    dense = torch.zeros(batch, n_q, n_k, dtype=torch.bool)
    for b in range(batch):
        for q in range(n_q):
            for i in range(int(num[b, 0, q])):
                dense[b, q, int(indices[b, 0, q, i])] = True
    return dense


def check_block_mask(rule, plan):
    expected = plan.mask(rule)  # (batch, q, kv)
    block_mask = flex.block_mask(rule, plan)
    batch, q_len, kv_len = expected.shape
    n_q, n_k = -(-q_len // flex.BLOCK), -(-kv_len // flex.BLOCK)
    partial = dense_blocks((block_mask.kv_num_blocks, block_mask.kv_indices), n_q, n_k)
    full = dense_blocks((block_mask.full_kv_num_blocks, block_mask.full_kv_indices), n_q, n_k)
    assert not (partial & full).any()
    padded = torch.nn.functional.pad(expected, (0, n_k * flex.BLOCK - kv_len, 0, n_q * flex.BLOCK - q_len))
    per_block = padded.view(batch, n_q, flex.BLOCK, n_k, flex.BLOCK)
    any_visible = per_block.any(4).any(2)
    assert not (any_visible & ~(partial | full)).any(), "a block with visible pairs is missing"
    real_q = torch.nn.functional.pad(torch.ones(q_len, dtype=torch.bool), (0, n_q * flex.BLOCK - q_len)).view(n_q, flex.BLOCK)
    real_k = torch.nn.functional.pad(torch.ones(kv_len, dtype=torch.bool), (0, n_k * flex.BLOCK - kv_len)).view(n_k, flex.BLOCK)
    all_visible = (per_block | ~(real_q[:, :, None, None] & real_k[None, None]).unsqueeze(0)).all(4).all(2)
    assert not (full & ~all_visible).any(), "a block marked full hides an invisible pair"
    return partial, full


def long_plan(lengths, q_len=None, prompt_end=None, packed=None):
    total = max(lengths)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, total - length :] = 1
    q_len = q_len or total
    position_ids = None
    if packed:
        mask = None
        position_ids = torch.tensor([[p for length in packed for p in range(length)]])
        total = q_len = sum(packed)
    return plan_forward(batch_size=len(lengths), q_len=q_len, past_len=total - q_len, device=torch.device("cpu"),
                        attention_mask=mask, position_ids=position_ids, generate=prompt_end)


@pytest.mark.parametrize(
    "rule, plan",
    [
        (LayerRule(300, 100), long_plan([2000, 1500])),
        (LayerRule(300, 0), long_plan([2000, 1999, 7])),
        (LayerRule(128, 128), long_plan([1024])),
        (LayerRule(257, 3, True), long_plan([2000, 1200], q_len=700, prompt_end=1700)),
        (LayerRule(None), long_plan([1000, 600])),
        (LayerRule(200, 50), long_plan([1], packed=(700, 90, 1000))),
        (LayerRule(5000, 5000), long_plan([1300])),
    ],
    ids=["sinks_padded", "no_sinks_padded", "block_aligned", "chunk_into_generated", "full", "packed", "window_past_end"],
)
def test_block_mask_covers_exactly_the_rule(rule, plan):
    partial, full = check_block_mask(rule, plan)
    if rule.window is not None and rule.window < 500 and not rule.fa_decode and plan.query_seq is None:
        per_query_block = (partial | full).sum(-1).max()
        assert per_query_block <= (rule.window + rule.sink) // flex.BLOCK + 4  # sparse: O(window + sink)
        assert full.any()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_block_mask_of_every_kernel_case(case):
    """The kernel cases' block masks (their outputs: tests/test_backends.py)."""
    check_block_mask(case.rule, make_inputs(case)[3])

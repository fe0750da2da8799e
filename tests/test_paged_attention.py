"""``swaa.paged.paged_attention`` on the CPU against the float64 rule: mixed batches of prefilling, decoding and
recomputing requests over shuffled cache blocks, every rule kind, block sizes 16-64 (tests/paged_cases.py; the same
grid runs on CUDA in bf16 in tests/gpu/test_paged_attention_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from paged_cases import CASES, PagedCase, Request, make_inputs

from swaa.paged import paged_attention
from swaa.rules import LayerRule


def error(output, expected):
    return ((output.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_paged_attention_equals_the_rule(case):
    inputs, expected, plain = make_inputs(case, dtype=torch.float32)
    output = paged_attention(**inputs, rule=case.rule, scaling=case.head_dim**-0.5)
    assert error(output, expected) <= 2 * error(plain, expected) + 1e-7


def test_small_tiles_read_only_the_window_and_sinks(monkeypatch):
    """Tiles of 4 queries over a 200-token prompt in blocks of 4 (window 6, sink 2): each tile reads the sinks'
    block and the blocks of its window, never more than 5 of the prompt's 50, and the result is still the rule's."""
    from swaa import paged

    reads = []
    attend = paged._attend_groups
    monkeypatch.setattr(paged, "_attend_groups", lambda *a: reads.extend(len(g[4]) for g in a[1]) or attend(*a))
    case = PagedCase((Request(200, 200, 200),), LayerRule(6, 2, True), block_size=4)
    inputs, expected, plain = make_inputs(case)
    output = paged_attention(**inputs, rule=case.rule, scaling=case.head_dim**-0.5, tile=4)
    assert error(output, expected) <= 2 * error(plain, expected) + 1e-7
    assert len(reads) == 50 and reads[0] == 1 and max(reads) <= 5


@pytest.mark.parametrize("run, descending, max_runs", [(1000, False, 8), (1000, True, 8), (3, False, 8),
                                                     (3, False, 1)])
def test_decode_steps_seeing_every_key_read_the_cache_in_place(monkeypatch, run, descending, max_runs):
    """A decode step that sees every key reads its request's runs of consecutive cache blocks (in any order) as
    views of the cache, one kernel call per run; a table broken into more runs than MAX_RUNS is copied once.
    Request: 300 tokens in 19 blocks of 16, the last one partly written (masked)."""
    from swaa import paged

    calls = []
    flash = paged._cpu_flash
    monkeypatch.setattr(paged, "_cpu_flash", lambda q, k, v, **kw: calls.append(k) or flash(q, k, v, **kw))
    monkeypatch.setattr(paged, "MAX_RUNS", max_runs)
    case = PagedCase((Request(300, 1, 200),), LayerRule(16, 4, True), run=run, descending=descending)
    inputs, expected, plain = make_inputs(case)
    output = paged_attention(**inputs, rule=case.rule, scaling=case.head_dim**-0.5)
    assert error(output, expected) <= 2 * error(plain, expected) + 1e-7
    table = sorted(inputs["block_table"][0, :19].tolist())
    runs = 1 + sum(b != a + 1 for a, b in zip(table, table[1:]))
    in_place = [k.untyped_storage().data_ptr() == inputs["key_cache"].untyped_storage().data_ptr() for k in calls]
    assert sum(len(k) for k in calls) == 19
    assert in_place == ([True] * runs if runs <= max_runs else [False])
    assert (runs == 1) == (run == 1000) and (runs <= max_runs) == (max_runs > 1)

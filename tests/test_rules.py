"""The coarse questions of rules.py (whole prefix, keys in reach, what a cache may forget, ring slots, pairs
kept) agree with the plain rule table of tests/reference.py on every small case."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import sees

from swaa.rules import (
    FULL_ATTENTION,
    LayerRule,
    forgets_old_keys,
    kept_keys,
    kernel_window_left,
    keys_in_reach,
    ring_slot,
    sees_whole_prefix,
    sink_end,
    still_visible,
    visible_pairs,
)

RULES = [FULL_ATTENTION] + [LayerRule(window, sink, fa_decode) for window, sink, fa_decode in
                            itertools.product([1, 2, 3, 5, 40], [0, 1, 3, 40], [False, True])]
LENGTH = 12


def reference_sees(rule, i, j, generated):
    return sees(i, j, generated=generated, full=rule.is_full, window=rule.window, sink=rule.sink,
                fa_decode=rule.fa_decode)


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_sees_whole_prefix_is_every_earlier_key_seen(rule):
    for i, generated in itertools.product(range(LENGTH), [False, True]):
        whole = all(reference_sees(rule, i, j, generated) for j in range(i + 1))
        assert bool(sees_whole_prefix(rule, i, generated)) == whole, (i, generated)
        as_tensor = sees_whole_prefix(rule, torch.tensor(i), torch.tensor(generated))
        assert bool(as_tensor) == whole


@pytest.mark.parametrize("rule", [r for r in RULES if not r.is_full], ids=str)
def test_keys_in_reach_means_every_query_up_to_the_last_sees_them(rule):
    """Exact for spans on one side of the sinks' end; never claims a span some query cannot see."""
    for lo, hi, last in itertools.product(range(LENGTH), range(LENGTH), range(LENGTH)):
        if lo > hi or hi > last:
            continue
        every = all(reference_sees(rule, i, j, False) for i in range(hi, last + 1) for j in range(lo, hi + 1))
        in_reach = bool(keys_in_reach(rule, lo, hi, last))
        assert every or not in_reach, (lo, hi, last)
        if not lo < rule.sink <= hi:
            assert in_reach == every, (lo, hi, last)


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_a_cache_forgets_only_keys_no_later_query_sees(rule):
    assert forgets_old_keys(rule) == (not rule.is_full and not rule.fa_decode)
    if not forgets_old_keys(rule):
        return
    for j, next_query in itertools.product(range(LENGTH), range(LENGTH)):
        later = any(reference_sees(rule, i, j, generated) for i in range(next_query, 3 * LENGTH)
                    for generated in (False, True))
        assert bool(still_visible(rule, j, next_query)) == later or j >= next_query, (j, next_query)
    # the keys a next query needs (itself aside) fit in kept_keys, and ring slots never collide among them
    for next_query in range(3 * LENGTH):
        needed = [j for j in range(next_query) if still_visible(rule, j, next_query)]
        assert len(needed) <= kept_keys(rule)
        slots = ring_slot(rule, torch.tensor(needed, dtype=torch.long), kept_keys(rule))
        assert len(set(slots.tolist())) == len(needed) and all(0 <= s < kept_keys(rule) for s in slots.tolist())


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_visible_pairs_counts_the_reference_pairs(rule):
    for length in (0, 1, 5, LENGTH):
        expected = sum(reference_sees(rule, i, j, False) for i in range(length) for j in range(i + 1))
        assert visible_pairs(rule, length) == expected


def test_sinks_and_the_kernel_window_follow_the_conventions():
    assert sink_end(FULL_ATTENTION) == 0 and sink_end(LayerRule(4, 3)) == 3
    assert kernel_window_left(LayerRule(4), 100) == 3  # flash-attn's window_size=(W - 1, 0)
    assert kernel_window_left(LayerRule(2**63 - 1), 100) == 100  # capped: fits a C int, same keys

"""The reference backend's weights, and the plan's mask it applies."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CASES, make_inputs, reference_output

from swaa.backends import reference


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_weights_are_the_rule(case):
    """The only backend that returns weights (its output without them: tests/test_backends.py)."""
    query, key, value, plan, expected = make_inputs(case)
    scaling = case.head_dim**-0.5
    output, weights = reference.attend(query, key, value, rule=case.rule, plan=plan, scaling=scaling, need_weights=True)
    torch.testing.assert_close(output, reference_output(query, key, value, expected, scaling), rtol=1e-12, atol=1e-12)
    assert torch.equal(weights[:, 0] > 0, expected)


def test_plan_mask_is_the_rule_and_nothing_else():
    """A one-off window is caught: the expected masks of neighbouring rules differ from this one's."""
    case = CASES[1]
    _, _, _, plan, expected = make_inputs(case)
    assert torch.equal(plan.mask(case.rule), expected)
    for other in (type(case.rule)(case.rule.window + 1, case.rule.sink), type(case.rule)(case.rule.window, case.rule.sink - 1)):
        assert not torch.equal(plan.mask(other), expected)

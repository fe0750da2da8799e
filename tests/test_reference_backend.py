"""The reference backend equals the plain float64 reference on random inputs and plans."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CASES, make_inputs, reference_output

from swaa import backends
from swaa.backends import flex, reference, sdpa
from swaa.plan import plan_forward
from swaa.rules import LayerRule


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_backend_equals_plain_reference(case):
    query, key, value, plan, expected = make_inputs(case)
    scaling = case.head_dim**-0.5
    output, _ = reference.attend(query, key, value, rule=case.rule, plan=plan, scaling=scaling)
    torch.testing.assert_close(output, reference_output(query, key, value, expected, scaling), rtol=1e-12, atol=1e-12)
    weights_output, weights = reference.attend(
        query, key, value, rule=case.rule, plan=plan, scaling=scaling, need_weights=True
    )
    torch.testing.assert_close(weights_output, output, rtol=1e-12, atol=1e-12)
    assert torch.equal(weights[:, 0] > 0, expected)


def test_plan_mask_is_the_rule_and_nothing_else():
    """A one-off window is caught: the expected masks of neighbouring rules differ from this one's."""
    case = CASES[1]
    _, _, _, plan, expected = make_inputs(case)
    assert torch.equal(plan.mask(case.rule), expected)
    for other in (type(case.rule)(case.rule.window + 1, case.rule.sink), type(case.rule)(case.rule.window, case.rule.sink - 1)):
        assert not torch.equal(plan.mask(other), expected)


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
def test_flex_runs_several_queries_in_flexattention_and_a_decode_step_on_autos_path(monkeypatch, padded):
    """backend='flex': FlexAttention for a prompt; for one query per row the fused kernel over a plain cache,
    the reference's masked fused call over a masked one (never FlexAttention's decoding kernel, slower and not
    compilable in a decode step on torch 2.11). The device check is CUDA's; the choice is what is tested here."""
    monkeypatch.setattr(backends, "check_available", lambda name, device: None)
    rule = LayerRule(3, 1, True)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]]) if padded else None
    cpu = torch.device("cpu")
    for q_len, past, expected in ((1, 5, reference.attend if padded else sdpa.attend), (6, 0, flex.attend)):
        plan = plan_forward(batch_size=1, q_len=q_len, past_len=past, device=cpu, generate=5,
                              attention_mask=mask)
        query, value = torch.randn(1, 4, q_len, 16), torch.randn(1, 2, 6, 16)
        assert backends.select("flex", query, value, rule, plan, need_weights=False) is expected

"""The FA2 backend's split into full, windowed and sink calls, checked on the CPU: the FA2 kernel is
replaced by the plain stand-in of tests/fa2_stand_in.py; the GPU tests check the real kernel. Gradients are in
tests/test_backend_gradients.py."""

from __future__ import annotations

import fa2_stand_in
import pytest
import torch
from kernel_cases import CASES, make_inputs, reference_output

from swaa.backends import flash


@pytest.mark.parametrize("case", CASES, ids=str)
def test_flash_split_equals_reference(case, monkeypatch):
    fa2_stand_in.install(monkeypatch)
    query, key, value, plan, expected = make_inputs(case)
    scaling = case.head_dim**-0.5
    output, _ = flash.attend(query, key, value, rule=case.rule, plan=plan, scaling=scaling)
    torch.testing.assert_close(output, reference_output(query, key, value, expected, scaling), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if c.q_len == 1] + [c for c in CASES if c.rule.is_full], ids=str)
def test_sdpa_paths_equal_reference_where_they_apply(case):
    """The sdpa backend, where it claims a call (decode; full prefill without padding), is exact."""
    from swaa.backends import sdpa

    query, key, value, plan, expected = make_inputs(case)
    scaling = case.head_dim**-0.5
    if not sdpa.handles(query, case.rule, plan):
        pytest.skip("padding: not an sdpa case")
    output, _ = sdpa.attend(query, key, value, rule=case.rule, plan=plan, scaling=scaling)
    torch.testing.assert_close(output, reference_output(query, key, value, expected, scaling), rtol=1e-10, atol=1e-10)


def test_flash_refuses_attention_dropout(monkeypatch):
    fa2_stand_in.install(monkeypatch)
    case = CASES[1]
    query, key, value, plan, _ = make_inputs(case)
    with pytest.raises(ValueError, match="backend='flash' has no attention dropout"):
        flash.attend(query, key, value, rule=case.rule, plan=plan, scaling=1.0, dropout=0.1)

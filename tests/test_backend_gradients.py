"""dq, dk, dv of every backend that trains on the CPU, against the float64 reference of the rules.

The flash backend runs its own code with the FA2 stand-in of tests/fa2_stand_in.py, whose log-sum-exp has
no gradient, as the real kernel's has none: merging the window and sink calls through autograd would drop
the gradient through the merge weights, and these tests would fail. FlexAttention has no backward on the
CPU; tests/gpu checks it (and every backend at low precision)."""

from __future__ import annotations

import fa2_stand_in
import pytest
import torch
from kernel_cases import GRADIENT_CASES, make_inputs, output_and_gradients, reference_output, takes

from swaa import backends
from swaa.backends import flash


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=str)
@pytest.mark.parametrize("backend", backends.RECORDS, ids=lambda record: record.name)
def test_gradients_equal_the_float64_reference(backend, case, monkeypatch):
    if backend.name == "flex":
        pytest.skip("needs a CUDA GPU: FlexAttention has no backward on the CPU (tests/gpu checks it)")
    fa2_stand_in.install(monkeypatch)
    query, key, value, plan, expected = make_inputs(case)
    reason = backend.refuses(backends.Call(query, key, value, case.rule, plan))
    assert (reason is None) == takes(backend, case, expected), reason
    if reason:
        return  # refused, as it should be: nothing to run
    scaling = case.head_dim**-0.5
    upstream = torch.randn(query.shape[0], query.shape[2], query.shape[1], query.shape[3],
                           generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = output_and_gradients(
        lambda q, k, v: backend.attend(q, k, v, rule=case.rule, plan=plan, scaling=scaling)[0],
        query, key, value, upstream)
    want = output_and_gradients(lambda q, k, v: reference_output(q, k, v, expected, scaling), query, key, value,
                                upstream)
    for name, actual, wanted in zip(["output", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_gradient_cases_merge_sinks_into_windows():
    """The cases above exercise the sink merge: several of them give the flash backend a group of two calls
    (window, sinks) over the same queries."""
    merging = [case for case in GRADIENT_CASES
               if any(len(calls) == 2 for calls in flash._calls(case.rule, make_inputs(case)[3]))]
    assert len(merging) >= 6, [str(case) for case in merging]

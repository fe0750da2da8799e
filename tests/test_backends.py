"""Every registered backend on every kernel case: exact where it takes the call, refused (with its reason) where
it should not take it; and how ``select`` walks the records.

Each backend's own kernel runs here on the CPU, whatever its record says about the device: flash through the
FA2 stand-in of tests/fa2_stand_in.py, flex through FlexAttention's unfused CPU path. A new backend is picked
up from the registry; ``kernel_cases.takes`` says which cases it should take."""

from __future__ import annotations

import re
from dataclasses import replace

import fa2_stand_in
import pytest
import torch
from kernel_cases import CASES, make_inputs, reference_output, takes

from swaa import backends
from swaa.backends import Call, flex, reference, sdpa
from swaa.plan import plan_forward
from swaa.rules import LayerRule

RECORDS = pytest.mark.parametrize("backend", backends.RECORDS, ids=lambda record: record.name)


@pytest.fixture(autouse=True)
def _fa2_stand_in(monkeypatch):
    fa2_stand_in.install(monkeypatch)


@pytest.mark.parametrize("case", CASES, ids=str)
@RECORDS
def test_every_backend_equals_the_float64_reference_where_it_takes_the_call(backend, case):
    query, key, value, plan, expected = make_inputs(case)
    reason = backend.refuses(Call(query, key, value, case.rule, plan))
    assert (reason is None) == takes(backend, case, expected), reason
    if reason:
        return  # refused, as it should be
    scaling = case.head_dim**-0.5
    output, _ = backend.attend(query, key, value, rule=case.rule, plan=plan, scaling=scaling)
    torch.testing.assert_close(output, reference_output(query, key, value, expected, scaling), rtol=1e-10, atol=1e-10)


@RECORDS
def test_weights_are_exact_or_refused(backend):
    """A backend that takes ``need_weights`` returns the rule's weights; the others refuse, saying so."""
    case = next(c for c in CASES if takes(backend, c, make_inputs(c)[4]))
    query, key, value, plan, expected = make_inputs(case)
    reason = backend.refuses(Call(query, key, value, case.rule, plan, need_weights=True))
    if reason is not None:
        assert reason == "it returns no attention weights"
        return
    output, weights = backend.attend(query, key, value, rule=case.rule, plan=plan, scaling=1.0, need_weights=True)
    assert torch.equal(weights[:, 0] > 0, expected)
    torch.testing.assert_close(output, reference_output(query, key, value, expected, 1.0), rtol=1e-12, atol=1e-12)


@RECORDS
def test_dropout_is_applied_or_refused(backend):
    """A backend that takes attention dropout applies it (its output changes); the others refuse, saying so."""
    case = next(c for c in CASES if takes(backend, c, make_inputs(c)[4]))
    query, key, value, plan, _ = make_inputs(case)
    reason = backend.refuses(Call(query, key, value, case.rule, plan, dropout=0.5))
    if reason is not None:
        assert reason == "it has no attention dropout (dropout=0.5)"
        return
    run = lambda dropout: backend.attend(query, key, value, rule=case.rule, plan=plan, scaling=1.0,  # noqa: E731
                                         dropout=dropout)[0]
    assert not torch.allclose(run(0.5), run(0.0))


def test_backend_names_come_from_the_registry():
    assert backends.NAMES == ("auto", "flex", "flash", "windowed", "reference")
    assert [record.name for record in backends.RECORDS] == ["sdpa", "flex", "flash", "windowed", "reference"]
    assert all(a.order < b.order for a, b in zip(backends.RECORDS, backends.RECORDS[1:]))


@pytest.fixture
def cuda_here(monkeypatch):
    """Every record runs on this device but the CPU's windowed one, as on a GPU: ``select``'s walk is tested, not
    the device."""
    def on_gpu(record):
        return (lambda device: "the CPU's path") if record.name == "windowed" else (lambda device: None)

    monkeypatch.setattr(backends, "RECORDS", tuple(replace(r, unavailable=on_gpu(r)) for r in backends.RECORDS))


def _call(q_len, past, mask=None, head_dim=16, **fields):
    plan = plan_forward(batch_size=1, q_len=q_len, past_len=past, device=torch.device("cpu"), generate=5,
                        attention_mask=mask)
    query, value = torch.randn(1, 4, q_len, head_dim), torch.randn(1, 2, q_len + past, head_dim)
    return Call(query, value, value, LayerRule(3, 1, True), plan, **fields)


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
def test_flex_runs_several_queries_in_flexattention_and_a_decode_step_on_autos_path(cuda_here, padded):
    """backend='flex': FlexAttention for a prompt; for one query per row the fused kernel over a plain cache,
    the reference's masked fused call over a masked one (never FlexAttention's decoding kernel, slower and not
    compilable in a decode step on torch 2.11)."""
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]]) if padded else None
    assert backends.select("flex", _call(1, 5, mask)).attend is (reference.attend if padded else sdpa.attend)
    assert backends.select("flex", _call(6, 0, mask)).attend is flex.attend


def test_auto_takes_the_first_record_that_takes_the_call(cuda_here):
    assert backends.select("auto", _call(6, 0)).name == "flex"
    assert backends.select("auto", _call(6, 0, head_dim=8)).name == "reference"  # below FlexAttention's minimum
    assert backends.select("auto", _call(6, 0, dropout=0.1)).name == "reference"
    assert backends.select("auto", _call(6, 0, need_weights=True)).name == "reference"
    assert backends.select("auto", _call(1, 5)).name == "sdpa"


@pytest.mark.parametrize("name, fields, reason", [
    ("flex", dict(head_dim=8), "head_dim 8 (values 8) is below FlexAttention's minimum of 16"),
    ("flex", dict(need_weights=True), "it returns no attention weights"),
    ("flash", dict(dropout=0.1), "it has no attention dropout (dropout=0.1)"),
    ("flash", dict(compiling=True), "it plans its FA2 calls on the host, which a compiled forward cannot do"),
])
def test_a_named_backend_refuses_a_call_with_its_reason_never_switching(cuda_here, name, fields, reason):
    with pytest.raises(ValueError, match=re.escape(f"backend='{name}' does not take this call: {reason}")):
        backends.select(name, _call(6, 0, **fields))


def test_a_named_backend_that_cannot_run_here_says_why_at_once():
    with pytest.raises(RuntimeError, match="backend='flex' cannot run on cpu: it needs a CUDA GPU; use backend='auto'"):
        backends.select("flex", _call(6, 0))
    assert backends.select("auto", _call(6, 0)).name == "windowed"  # the CPU: the GPU's records are unavailable

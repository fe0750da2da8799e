"""The FA2 backend's split into full, windowed and sink calls, checked on the CPU: the FA2 kernel is
replaced by a plain implementation of its documented varlen semantics (causal aligned bottom-right,
window_size=(left, 0)); the GPU tests check the real kernel."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CASES, make_inputs, reference_output

from swaa.backends import flash


def plain_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, window_left, scaling, dropout):
    outputs, lses = [], []
    groups = q.shape[1] // k.shape[1]
    for (qa, qb), (ka, kb) in zip(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()), zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        qs, ks = q[qa:qb].transpose(0, 1), k[ka:kb].repeat_interleave(groups, 1).transpose(0, 1)
        vs = v[ka:kb].repeat_interleave(groups, 1).transpose(0, 1)
        scores = (qs @ ks.transpose(-1, -2)) * scaling
        i = torch.arange(qb - qa)[:, None] + (kb - ka) - (qb - qa)  # bottom-right alignment
        j = torch.arange(kb - ka)[None]
        allowed = torch.ones_like(i - j, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if window_left >= 0:
            allowed &= i - j <= window_left
        scores = scores.masked_fill(~allowed, float("-inf"))
        lses.append(scores.logsumexp(-1).detach())  # FA2's log-sum-exp carries no gradient either
        outputs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outputs), torch.cat(lses, dim=-1).transpose(0, 1)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_flash_split_equals_reference(case, monkeypatch):
    monkeypatch.setattr(flash, "_flash_varlen", plain_varlen)
    query, key, value, layout, expected = make_inputs(case)
    scaling = case.head_dim**-0.5
    output, _ = flash.attend(query, key, value, rule=case.rule, layout=layout, scaling=scaling)
    torch.testing.assert_close(output, reference_output(query, key, value, expected, scaling), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if c.q_len == 1] + [c for c in CASES if c.rule.is_full], ids=str)
def test_sdpa_paths_equal_reference_where_they_apply(case):
    """The sdpa backend, where it claims a call (decode; full prefill without padding), is exact."""
    from swaa.backends import sdpa

    query, key, value, layout, expected = make_inputs(case)
    scaling = case.head_dim**-0.5
    if not sdpa.handles(query, case.rule, layout):
        pytest.skip("padding: not an sdpa case")
    output, _ = sdpa.attend(query, key, value, rule=case.rule, layout=layout, scaling=scaling)
    torch.testing.assert_close(output, reference_output(query, key, value, expected, scaling), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [c for c in CASES if not c.rule.is_full and c.q_len is None], ids=str)
def test_flash_gradients_are_exact_or_refused(case, monkeypatch):
    """With sinks merged in, no gradient may come back silently wrong (the merge weights come from the
    non-differentiable log-sum-exp): training is refused. Without a merge, dq, dk, dv equal the reference's."""
    monkeypatch.setattr(flash, "_flash_varlen", plain_varlen)
    query, key, value, layout, expected = make_inputs(case)
    inputs = [t.detach().requires_grad_() for t in (query, key, value)]
    scaling = case.head_dim**-0.5
    merges = flash._plan(case.rule, layout)[2] is not None
    if merges:
        with pytest.raises(NotImplementedError, match="cannot train yet"):
            flash.attend(*inputs, rule=case.rule, layout=layout, scaling=scaling)
        return
    output, _ = flash.attend(*inputs, rule=case.rule, layout=layout, scaling=scaling)
    upstream = torch.randn_like(output)
    grads = torch.autograd.grad(output, inputs, upstream)
    reference_inputs = [t.detach().requires_grad_() for t in (query, key, value)]
    expected_grads = torch.autograd.grad(reference_output(*reference_inputs, expected, scaling), reference_inputs,
                                         upstream)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)

"""A plain stand-in for the FA2 varlen kernels, so that the CPU runs the flash backend's own code: the same
documented semantics (causal aligned bottom-right, ``window_size=(window_left, 0)``, GQA) and the same
contract as the real kernels: the forward returns tensors without autograd history (the log-sum-exp has no
gradient), and the backward is a separate function that recomputes the probabilities from the output and
log-sum-exp it is handed, as FA2's does (P = exp(score - lse), D = rowsum(dout * out))."""

from __future__ import annotations

import torch

from swaa.backends import flash


def _sequences(call):
    """(query slice, key slice) of each packed sequence of ``call``."""
    cu_q, cu_k = call.cu_q.tolist(), call.cu_k.tolist()
    return [(slice(qa, qb), slice(ka, kb)) for qa, qb, ka, kb in zip(cu_q, cu_q[1:], cu_k, cu_k[1:])]


def _scores(q, k, call, scaling):
    """q (n_q, heads, d), k (n_k, kv_heads, d) of one sequence -> masked scores (heads, n_q, n_k)."""
    groups = q.shape[1] // k.shape[1]
    scores = (q.transpose(0, 1) @ k.repeat_interleave(groups, 1).permute(1, 2, 0)) * scaling
    n_q, n_k = q.shape[0], k.shape[0]
    i = torch.arange(n_q)[:, None] + n_k - n_q  # bottom-right alignment
    j = torch.arange(n_k)[None]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool)
    if call.causal:
        allowed &= j <= i
    if call.window_left >= 0:
        allowed &= i - j <= call.window_left
    return scores.masked_fill(~allowed, float("-inf"))


@torch.no_grad()
def forward(q, k, v, call, scaling):
    groups = q.shape[1] // k.shape[1]
    outputs, lses = [], []
    for qs, ks in _sequences(call):
        scores = _scores(q[qs], k[ks], call, scaling)
        lses.append(scores.logsumexp(-1))
        outputs.append((scores.softmax(-1) @ v[ks].repeat_interleave(groups, 1).transpose(0, 1)).transpose(0, 1))
    return torch.cat(outputs), torch.cat(lses, dim=-1), ()


@torch.no_grad()
def backward(grad_output, q, k, v, output, lse, rng_state, call, scaling):
    groups = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qs, ks in _sequences(call):
        probs = (_scores(q[qs], k[ks], call, scaling) - lse[:, qs, None]).exp()  # (heads, n_q, n_k)
        dout, out = grad_output[qs].transpose(0, 1), output[qs].transpose(0, 1)  # (heads, n_q, d)
        keys, values = (t[ks].repeat_interleave(groups, 1).transpose(0, 1) for t in (k, v))  # (heads, n_k, d)
        d = (dout * out).sum(-1, keepdim=True)
        dscores = probs * (dout @ values.transpose(-1, -2) - d) * scaling
        dq[qs] = (dscores @ keys).transpose(0, 1)
        per_head = lambda grad: grad.unflatten(0, (k.shape[1], groups)).sum(1).transpose(0, 1)  # noqa: E731
        dk[ks] = per_head(dscores.transpose(-1, -2) @ q[qs].transpose(0, 1))
        dv[ks] = per_head(probs.transpose(-1, -2) @ dout)
    return dq, dk, dv


def install(monkeypatch):
    """Run the flash backend's FA2 calls through this stand-in for the rest of the test."""
    monkeypatch.setattr(flash, "_varlen_forward", forward)
    monkeypatch.setattr(flash, "_varlen_backward", backward)

"""FA2 backend: flash-attention's windowed kernel, with the sinks merged in exactly.

Uses ``flash_attn``'s varlen forward and backward when the package is installed, else the FA2 kernels inside
PyTorch (``aten._flash_attention_forward`` / ``_backward``, which take window sizes and return the
log-sum-exp). Padded and packed batches are unpadded into variable-length sequences.

Each sequence's queries fall into runs of one kind, in position order:
- full: the query sees every earlier key. Full layers, generated tokens under FA decode, and prompt
  tokens whose window already reaches the sinks (window and sinks together are then the whole prefix);
- windowed: the query sees its window and, separately, the ``sink`` first keys, which lie wholly before
  the window. FA2 with ``window_size=(window - 1, 0)`` gives the first part, a small non-causal FA2 call
  over the sinks the second, and the two are merged through their log-sum-exp; nothing is counted twice.
  Gradients are exact: ``_Attention`` drives each call's FA2 backward with the merged output and
  log-sum-exp.
Every run is one causal FA2 sequence aligned bottom-right: its queries are the last of its keys. Keys are
found by position, so a bounded cache (sinks, then the window) works as well as a full one.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
from dataclasses import dataclass

import torch

from ..plan import Plan
from ..rules import LayerRule, kernel_window_left, sees_whole_prefix, sink_end, window_start
from .base import Backend, Call


def _unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"FA2 needs a CUDA GPU, not {device.type}"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"FA2 needs compute capability 8.0 or newer (Ampere+), this GPU has {major}.x"
    return None


def refuses(call: Call) -> str | None:
    """Takes every call without weights or dropout."""
    if call.need_weights:
        return "it returns no attention weights"
    if call.dropout:
        return f"it has no attention dropout (dropout={call.dropout})"
    return None


@dataclass
class _Call:
    """One FA2 call over packed runs: which query and key slots (flattened batch x length) it takes."""

    query_index: torch.Tensor
    key_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool
    window_left: int


def _has_package() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _varlen_forward(q, k, v, call: _Call, scaling: float):
    """FA2 forward of one call over packed runs: q (total_q, heads, d), k/v (total_k, kv_heads, d).
    Returns the output (total_q, heads, d), the log-sum-exp (heads, total_q) float32 and the kernel's RNG
    state for its backward. Like every FA2 kernel, nothing it returns carries a gradient."""
    window_right = 0 if call.causal else -1
    if _has_package():
        from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

        output, lse, _, rng_state = _flash_attn_varlen_forward(
            q, k, v, call.cu_q, call.cu_k, call.max_q, call.max_k, 0.0, scaling, call.causal,
            call.window_left, window_right,
        )
        return output, lse, (rng_state,)
    output, lse, philox_seed, philox_offset, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, call.cu_q, call.cu_k, call.max_q, call.max_k, 0.0, call.causal, False, scale=scaling,
        window_size_left=call.window_left, window_size_right=window_right,
    )
    return output, lse, (philox_seed, philox_offset)


def _varlen_backward(grad_output, q, k, v, output, lse, rng_state, call: _Call, scaling: float):
    """FA2 backward of one call: (dq, dk, dv) shaped like (q, k, v). ``output`` and ``lse`` may be those of
    a softmax over more keys than this call's: the kernel recomputes the probabilities as exp(score - lse)
    and takes D = rowsum(grad_output * output), so it then gives this call's share of that softmax's
    gradient."""
    window_right = 0 if call.causal else -1
    grad_output = grad_output.contiguous()
    if _has_package():
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_varlen_backward(
            grad_output, q, k, v, output, lse, dq, dk, dv, call.cu_q, call.cu_k, call.max_q, call.max_k, 0.0,
            scaling, call.causal, call.window_left, window_right, 0.0, None, False, *rng_state,
        )
        return dq, dk, dv
    return torch.ops.aten._flash_attention_backward(
        grad_output, q, k, v, output, lse, call.cu_q, call.cu_k, call.max_q, call.max_k, 0.0, call.causal,
        *rng_state, scale=scaling, window_size_left=call.window_left, window_size_right=window_right,
    )


def _merge(near, near_lse, far, far_lse):
    """Softmax over the union of two disjoint key sets, from each part's output (total_q, heads, d) and
    log-sum-exp (heads, total_q): the union's output and log-sum-exp."""
    far_share = torch.sigmoid(far_lse - near_lse).transpose(0, 1)[..., None]  # exp(far) / (exp(near) + exp(far))
    wide = torch.promote_types(near.dtype, torch.float32)
    output = torch.lerp(near.to(wide), far.to(wide), far_share.to(wide)).to(near.dtype)
    return output, torch.logaddexp(near_lse, far_lse)


@functools.cache
def _compiled_merge():
    return torch.compile(_merge)  # one fused kernel instead of several passes over float32 temporaries


class _Attention(torch.autograd.Function):
    """Softmax attention of one set of queries over the union of disjoint key sets, one FA2 call per set
    (``calls``, all over the same queries), merged through the log-sum-exp.

    Backward, the identity ring attention uses: each call's FA2 backward, handed the merged output and
    log-sum-exp instead of its own, gives exactly that call's keys' share of dq, dk and dv (its
    probabilities exp(score - lse) are then the merged softmax's, and so is D = rowsum(dout * out)); dq
    is their sum. FA2's log-sum-exp has no gradient, so autograd through the merge would drop the terms
    that flow through the merge weights."""

    @staticmethod
    def forward(ctx, query, scaling, calls, *keys_values):
        output, lse, rng_states = None, None, []
        for call, key, value in zip(calls, keys_values[::2], keys_values[1::2]):
            part, part_lse, rng_state = _varlen_forward(query, key, value, call, scaling)
            rng_states.append(rng_state)
            if output is None:
                output, lse = part, part_lse
            else:
                output, lse = (_compiled_merge() if part.is_cuda else _merge)(output, lse, part, part_lse)
        ctx.save_for_backward(query, output, lse, *keys_values)
        ctx.scaling, ctx.calls, ctx.rng_states = scaling, calls, rng_states
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, output, lse, *keys_values = ctx.saved_tensors
        grad_query, grad_keys_values = 0, []
        for call, key, value, rng_state in zip(ctx.calls, keys_values[::2], keys_values[1::2], ctx.rng_states):
            dq, dk, dv = _varlen_backward(grad_output, query, key, value, output, lse, rng_state, call, ctx.scaling)
            grad_query = grad_query + dq.to(torch.promote_types(dq.dtype, torch.float32))
            grad_keys_values += [dk, dv]
        return grad_query.to(query.dtype), None, None, *grad_keys_values


def _calls(rule: LayerRule, plan: Plan) -> tuple[tuple[_Call, ...], ...]:
    """The calls for this rule and plan, grouped by the queries they serve: (full,) and (windowed, sinks),
    or fewer where no query needs them; computed once per forward."""
    query_pos = plan.query_pos.tolist()
    key_pos = plan.key_pos.tolist()
    generated = plan.query_generated.tolist()
    query_seq = plan.query_seq.tolist() if plan.query_seq is not None else None
    key_seq = plan.key_seq.tolist() if plan.key_seq is not None else None
    q_len, kv_len = len(query_pos[0]), len(key_pos[0])
    runs = {"full": [], "window": [], "sink": []}
    for b, (q_row, k_row) in enumerate(zip(query_pos, key_pos)):
        keys = {}  # sequence id -> (positions, slots) of its keys, in position order
        for j, pos in sorted(enumerate(k_row), key=lambda slot_pos: slot_pos[1]):  # a ring holds them out of order
            if pos >= 0:
                positions, slots = keys.setdefault(key_seq[b][j] if key_seq else 0, ([], []))
                positions.append(pos)
                slots.append(b * kv_len + j)
        run = None
        for t, pos in enumerate(q_row):
            if pos < 0:
                run = None
                continue
            seq = query_seq[b][t] if query_seq else 0
            kind = "full" if sees_whole_prefix(rule, pos, generated[b][t]) else "window"
            if run is None or run["kind"] != kind or run["seq"] != seq:
                run = {"kind": kind, "seq": seq, "keys": keys[seq], "queries": [], "first": pos}
                runs[kind].append(run)
            run["queries"].append(b * q_len + t)
            run["last"] = pos
    device = plan.query_pos.device

    def call(kind: str, key_span) -> _Call | None:
        chosen = runs["window" if kind == "sink" else kind]
        if not chosen or (kind == "sink" and sink_end(rule) == 0):
            return None
        query_index, key_index, cu_q, cu_k = [], [], [0], [0]
        for run in chosen:
            first_key, end_key = key_span(run)
            positions, slots = run["keys"]
            lo, hi = bisect.bisect_left(positions, first_key), bisect.bisect_left(positions, end_key)
            if hi - lo != end_key - first_key:
                raise NotImplementedError(
                    f"backend='flash': keys at positions {first_key}..{end_key - 1} are not all in the cache"
                )
            query_index += run["queries"]
            key_index += slots[lo:hi]
            cu_q.append(len(query_index))
            cu_k.append(len(key_index))
        as_tensor = lambda values: torch.tensor(values, device=device)  # noqa: E731
        return _Call(
            as_tensor(query_index), as_tensor(key_index), as_tensor(cu_q).int(), as_tensor(cu_k).int(),
            max(b - a for a, b in zip(cu_q, cu_q[1:])), max(b - a for a, b in zip(cu_k, cu_k[1:])),
            causal=kind != "sink", window_left=kernel_window_left(rule, plan.kv_len) if kind == "window" else -1,
        )

    groups = (
        (call("full", lambda run: (0, run["last"] + 1)),),
        (call("window", lambda run: (max(window_start(rule, run["first"]), 0), run["last"] + 1)),
         call("sink", lambda run: (0, sink_end(rule)))),
    )
    return tuple(calls for calls in (tuple(c for c in group if c is not None) for group in groups) if calls)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    rule: LayerRule,
    plan: Plan,
    scaling: float,
    dropout: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, None]:
    """query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim), in a call
    that ``refuses`` took. Returns (batch, q_len, heads, head_dim); padding queries give 0."""
    memo_key = ("flash", *rule.key())
    if memo_key not in plan.memo:
        plan.memo[memo_key] = _calls(rule, plan)
    batch, heads, q_len, head_dim = query.shape
    queries = query.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
    keys = key.transpose(1, 2).reshape(-1, key.shape[1], head_dim)
    values = value.transpose(1, 2).reshape(-1, key.shape[1], head_dim)
    output = queries.new_zeros(queries.shape)
    for calls in plan.memo[memo_key]:
        query_index = calls[0].query_index  # every call of a group serves the same queries
        keys_values = [t[call.key_index] for call in calls for t in (keys, values)]
        output = output.index_copy(0, query_index, _Attention.apply(queries[query_index], scaling, calls, *keys_values))
    return output.view(batch, q_len, heads, head_dim), None


# auto=False: FlexAttention ran a 128k prompt in 16.2 ms where FA2 and its sink merge took 27.5 (H100,
# docs/performance.md), so flash runs only when named
BACKEND = Backend(
    name="flash", order=30, attend=attend, unavailable=_unavailable, refuses=refuses, auto=False,
    uncompilable="it plans its FA2 calls on the host, which a compiled forward cannot do",
    about="FA2's windowed kernel, sinks merged through the log-sum-exp",
)

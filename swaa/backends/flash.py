"""FA2 backend: flash-attention's windowed kernel, with the sinks merged in exactly.

Uses ``flash_attn``'s varlen function when the package is installed, else the FA2 kernel inside PyTorch
(``aten._flash_attention_forward``, which takes window sizes and returns the log-sum-exp). Padded and
packed batches are unpadded into variable-length sequences.

Each sequence's queries fall into runs of one kind, in position order:
- full: the query sees every earlier key. Full layers, generated tokens under FA decode, and prompt
  tokens whose window already reaches the sinks (window and sinks together are then the whole prefix);
- windowed: the query sees its window and, separately, the ``sink`` first keys, which lie wholly before
  the window. FA2 with ``window_size=(window - 1, 0)`` gives the first part, a small non-causal FA2 call
  over the sinks the second, and the two are merged through their log-sum-exp; nothing is counted twice.
Every run is one causal FA2 sequence aligned bottom-right: its queries are the last of its keys. Keys are
found by position, so a bounded cache (sinks, then the window) works as well as a full one.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
from dataclasses import dataclass

import torch

from ..layout import Layout
from ..rules import LayerRule, window_start


def available(device: torch.device) -> str | None:
    """Why FA2 cannot run on ``device``, or None when it can."""
    if device.type != "cuda":
        return f"FA2 needs a CUDA GPU, not {device.type}"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"FA2 needs compute capability 8.0 or newer (Ampere+), this GPU has {major}.x"
    return None


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, window_left, scaling, dropout):
    """FA2 over packed sequences: q (total_q, heads, d), k/v (total_k, kv_heads, d).
    Returns output (total_q, heads, d) and log-sum-exp (total_q, heads), float32."""
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_varlen_func

        output, lse, _ = flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=causal,
            window_size=(window_left, 0 if causal else -1), return_attn_probs=True,
        )
    else:
        output, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, False, scale=scaling,
            window_size_left=window_left, window_size_right=0 if causal else -1,
        )
    return output, lse.transpose(0, 1)  # FA2 gives the log-sum-exp as (heads, total_q)


def _merge(near, near_lse, far, far_lse):
    """Softmax over the union of two disjoint key sets, from each part's output and log-sum-exp."""
    far_share = torch.sigmoid(far_lse - near_lse)[..., None]  # exp(far) / (exp(near) + exp(far))
    wide = torch.promote_types(near.dtype, torch.float32)
    return torch.lerp(near.to(wide), far.to(wide), far_share.to(wide)).to(near.dtype)


@functools.cache
def _compiled_merge():
    return torch.compile(_merge)  # one fused kernel instead of several passes over float32 temporaries


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


def _plan(rule: LayerRule, layout: Layout) -> tuple[_Call | None, _Call | None, _Call | None]:
    """The (full, windowed, sinks) calls for this rule and layout; computed once per forward."""
    query_pos = layout.query_pos.tolist()
    key_pos = layout.key_pos.tolist()
    generated = layout.query_generated.tolist()
    query_seq = layout.query_seq.tolist() if layout.query_seq is not None else None
    key_seq = layout.key_seq.tolist() if layout.key_seq is not None else None
    q_len, kv_len = len(query_pos[0]), len(key_pos[0])
    runs = {"full": [], "window": [], "sink": []}
    for b, (q_row, k_row) in enumerate(zip(query_pos, key_pos)):
        keys = {}  # sequence id -> (positions, slots) of its keys, in position order
        for j, pos in enumerate(k_row):
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
            full = rule.is_full or (rule.fa_decode and generated[b][t]) or window_start(rule, pos) <= rule.sink
            kind = "full" if full else "window"
            if run is None or run["kind"] != kind or run["seq"] != seq:
                run = {"kind": kind, "seq": seq, "keys": keys[seq], "queries": [], "first": pos}
                runs[kind].append(run)
            run["queries"].append(b * q_len + t)
            run["last"] = pos
    device = layout.query_pos.device

    def call(kind: str, key_span) -> _Call | None:
        chosen = runs["window" if kind == "sink" else kind]
        if not chosen or (kind == "sink" and rule.sink == 0):
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
            causal=kind != "sink", window_left=rule.window - 1 if kind == "window" else -1,
        )

    return (
        call("full", lambda run: (0, run["last"] + 1)),
        call("window", lambda run: (max(window_start(rule, run["first"]), 0), run["last"] + 1)),
        call("sink", lambda run: (0, rule.sink)),
    )


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    rule: LayerRule,
    layout: Layout,
    scaling: float,
    dropout: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, None]:
    """query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim).
    Returns (batch, q_len, heads, head_dim); padding queries give 0."""
    memo_key = ("flash", rule)
    if memo_key not in layout.memo:
        layout.memo[memo_key] = _plan(rule, layout)
    full, window, sinks = layout.memo[memo_key]
    if window is not None and sinks is not None and torch.is_grad_enabled() and any(
            t.requires_grad for t in (query, key, value)):
        raise NotImplementedError(
            f"backend='flash' with sink={rule.sink} cannot train yet: FA2 returns its log-sum-exp without a"
            " gradient, so merging the window and sink calls would silently drop gradient terms; train with"
            " backend='flex' (or 'auto' on a GPU), or with sink=0"
        )
    batch, heads, q_len, head_dim = query.shape
    queries = query.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
    keys = key.transpose(1, 2).reshape(-1, key.shape[1], head_dim)
    values = value.transpose(1, 2).reshape(-1, key.shape[1], head_dim)

    def run(call: _Call):
        return _flash_varlen(
            queries[call.query_index], keys[call.key_index], values[call.key_index], call.cu_q, call.cu_k,
            call.max_q, call.max_k, call.causal, call.window_left, scaling, dropout,
        )

    output = queries.new_zeros(queries.shape)
    if full is not None:
        output = output.index_copy(0, full.query_index, run(full)[0])
    if window is not None:
        near, near_lse = run(window)
        if sinks is not None:
            near = (_compiled_merge() if near.is_cuda else _merge)(near, near_lse, *run(sinks))
        output = output.index_copy(0, window.query_index, near.to(output.dtype))
    return output.view(batch, q_len, heads, head_dim), None

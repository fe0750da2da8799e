"""PyTorch's fused attention for the calls that need no mask: rows whose every key sits at its index (no
padding, packing or unwritten cache slots), where each query sees every earlier key.

- Decode, one new query that sees the whole cache (a full-attention layer, a generated token in an FA-decode
  layer, a window that reaches the sinks): a one-token query needs no causal mask, so the bandwidth-bound
  flash kernel runs.
- Prefill of a full-attention layer with no cache: plain causal attention (cuDNN on Hopper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..plan import Plan
from ..rules import LayerRule
from .base import Backend, Call


def refuses(call: Call) -> str | None:
    """Takes one query per row that sees its whole prefix, and a full-attention prompt with no cache, on
    plain rows (every key at its index): the calls where no mask is needed."""
    if call.need_weights:
        return "it returns no attention weights"
    rule, plan = call.rule, call.plan
    if call.q_len > 1 and not rule.is_full:
        return "several queries of a windowed layer: sdpa takes the prompts of full-attention layers only"
    if call.q_len > 1 and call.q_len != plan.kv_len:
        return "several queries onto cached keys need a causal mask offset by the cache"
    if not plan.sees_every_key(rule):
        return "a mask is needed: a query does not see every key up to its own, or keys are not at their indices"
    return None


def _unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "on the CPU auto's path is 'windowed', which makes this call itself where no mask is needed"
    return None


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
    """query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim), in a case
    that ``refuses`` took. Returns (batch, q_len, heads, head_dim)."""
    # a Python bool: under a compiled prefill's dynamic lengths a SymBool would break the graph
    causal = True if query.shape[2] > 1 else False  # noqa: SIM210
    output = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


BACKEND = Backend(
    name="sdpa", order=10, attend=attend, unavailable=_unavailable, refuses=refuses, nameable=False,
    about="the query sees every key, no mask needed",
)

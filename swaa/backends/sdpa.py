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
from ..rules import LayerRule, sees_whole_prefix


def handles(query: torch.Tensor, rule: LayerRule, plan: Plan) -> bool:
    """True on plain rows for one query per row that sees its whole prefix, and for a full-attention prompt
    with no cache."""
    q_len = query.shape[2]
    if q_len == 1:
        if rule.is_full or (rule.fa_decode and plan.all_generated()):
            return plan.plain()
        # plain rows: the query sits at the last slot, its position is the cache length - 1
        return plan.plain() and sees_whole_prefix(rule, plan.kv_len - 1, False)
    return rule.is_full and q_len == plan.kv_len and plan.plain()


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
    that ``handles`` accepted. Returns (batch, q_len, heads, head_dim)."""
    # a Python bool: under a compiled prefill's dynamic lengths a SymBool would break the graph
    causal = True if query.shape[2] > 1 else False  # noqa: SIM210
    output = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None

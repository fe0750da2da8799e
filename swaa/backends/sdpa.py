"""PyTorch's fused attention for the calls that need no mask: rows whose every key sits at its index (no
padding, packing or unwritten cache slots), where each query sees every earlier key.

- Decode, one new query against the whole cache in a full-attention layer, or a generated token in an
  FA-decode layer: a one-token query needs no causal mask, so the bandwidth-bound flash kernel runs.
- Prefill of a full-attention layer with no cache: plain causal attention (cuDNN on Hopper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import Layout
from ..rules import LayerRule


def handles(query: torch.Tensor, rule: LayerRule, layout: Layout) -> bool:
    """True on plain rows for one query that sees the whole cache (a full-attention layer, or a generated
    token in an FA-decode layer) and for a full-attention prompt with no cache."""
    q_len, kv_len = query.shape[2], layout.key_pos.shape[1]
    if q_len == 1:
        sees_all = rule.is_full or (rule.fa_decode and layout.all_generated())
        return sees_all and layout.plain()
    return rule.is_full and q_len == kv_len and layout.plain()


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
    """query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim), in a case
    that ``handles`` accepted. Returns (batch, q_len, heads, head_dim)."""
    causal = query.shape[2] > 1
    output = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None

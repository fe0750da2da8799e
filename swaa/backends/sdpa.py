"""PyTorch's fused attention for the calls that need no custom mask, on rows without padding or packing.

- Decode, one new query against a long cache: a full or FA-decode layer reads the whole cache with no mask
  (a one-token query needs no causal mask), so the bandwidth-bound flash kernel runs; an SWA layer reads
  only its sinks and its window, sliced out of the cache, so its cost stays flat as the context grows.
- Prefill of a full-attention layer with no cache: plain causal attention (cuDNN on Hopper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import Layout
from ..rules import LayerRule


def handles(query: torch.Tensor, rule: LayerRule, layout: Layout) -> bool:
    """True for one-token calls (``_decode_keys`` finds their keys), and for full-attention prefill with
    no cache on plain rows (every key at position = its index: no padding or packing)."""
    q_len, kv_len = query.shape[2], layout.key_pos.shape[1]
    if layout.query_seq is not None:
        return False
    if q_len == 1:
        return _decode_keys(rule, layout) is not None
    return rule.is_full and q_len == kv_len and layout.plain()


def _decode_keys(rule: LayerRule, layout: Layout) -> str | None:
    """For a one-token call: "all" when the query sees every key it is given (full and FA-decode layers
    without padding, a bounded cache's SWA layers), "slice" when it sees the sinks and window of a plain
    cache, None otherwise."""
    key = ("sdpa-decode", rule)
    if key not in layout.memo:
        if bool(layout.mask(rule).all()):
            layout.memo[key] = "all"
        else:
            layout.memo[key] = "slice" if not rule.is_full and layout.plain() else None
    return layout.memo[key]


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
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len > 1:  # full-attention prefill, no cache
        output = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=True
        )
        return output.transpose(1, 2).contiguous(), None
    if _decode_keys(rule, layout) == "slice":
        window_start = kv_len - rule.window  # > sink, or the query would see every key
        key = torch.cat([key[:, :, : rule.sink], key[:, :, window_start:]], dim=2)
        value = torch.cat([value[:, :, : rule.sink], value[:, :, window_start:]], dim=2)
    output = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None

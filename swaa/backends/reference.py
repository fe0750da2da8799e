"""Dense-mask attention: exact on any device and obviously right; O(q_len * kv_len) memory.

The runtime path on the CPU, and what every faster backend is compared with. Without weights it is PyTorch's
``scaled_dot_product_attention`` with the plan's boolean mask and grouped heads, which is also the GPU's path
for a decode step that needs a mask (padding, a bounded cache's ring, a static cache's unwritten slots):
there it runs cuDNN's kernel, one launch with no repeated keys, no host sync and fixed shapes, so it compiles
into a CUDA graph (H200, 4k keys: 12 us and 3 kernels, where two grouped products and a softmax took 23 us
and 10; 128k keys: 129 against 171 us; docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..plan import Plan
from ..rules import LayerRule
from .base import Backend


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``query`` over ``key``/``value`` under ``rule``.

    query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim), heads a
    multiple of kv_heads (GQA). Returns the output as (batch, q_len, heads, head_dim) and, when
    ``need_weights``, the weights (batch, heads, q_len, kv_len). A query that sees no key (padding)
    gets a zero output.
    """
    mask = plan.mask(rule)[:, None]  # (batch, 1, q_len, kv_len)
    sees_a_key = mask.any(-1, keepdim=True)
    mask = mask | ~sees_a_key  # keeps softmax finite on padding rows; their output is zeroed below
    weights = None
    if need_weights:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = (query @ key.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype) * sees_a_key
        output = F.dropout(weights, p=dropout) @ value
    else:
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        output = output * sees_a_key
    return output.transpose(1, 2).contiguous(), weights


BACKEND = Backend(name="reference", order=100, attend=attend, about="exact dense path")

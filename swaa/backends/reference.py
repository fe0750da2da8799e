"""Dense-mask attention: exact on any device and obviously right; O(q_len * kv_len) memory.

The runtime path on the CPU, and what every faster backend is compared with. A decode call (one query per
row) runs as two grouped matrix products and a softmax: no repeated keys for GQA, no host sync and fixed
shapes, so it is also the GPU's path for a decode step that needs a mask (padding, a bounded cache's ring,
a static cache's unwritten slots), eager or compiled into a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..caches import DECODE_CHUNK, SPLIT_FROM_CHUNKS
from ..plan import Plan
from ..rules import LayerRule


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
    if query.shape[2] == 1 and not need_weights and not dropout:
        return _one_query(query, key, value, plan.mask(rule), scaling), None
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


def _one_query(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
               scaling: float) -> torch.Tensor:
    """query: (batch, heads, 1, head_dim); key, value: (batch, kv_heads, kv_len, head_dim); mask: (batch, 1,
    kv_len) bool. Returns (batch, 1, heads, head_dim); a row that sees no key gives 0.

    The keys go in two parts, whole ``DECODE_CHUNK``s and the rest, with one softmax over both: the products
    over the chunks then have operands whose rows start at aligned addresses whatever the cache's length (score
    rows of a number of keys that is not a multiple of 8 send cuBLAS to slow unaligned kernels: the top GPU
    item of a decode step on an H200); the rest is a small product."""
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # head h reads kv head h // group
    wide = torch.promote_types(query.dtype, torch.float32)  # softmax and sums in at least float32
    split = key.shape[2] // DECODE_CHUNK * DECODE_CHUNK
    parts = [(key[:, :, a:b], value[:, :, a:b], mask[..., a:b]) for a, b in ((0, split), (split, key.shape[2])) if b > a]
    scores = [((grouped @ k.transpose(-1, -2)).to(wide) * scaling).masked_fill(~m[:, None], float("-inf"))
              for k, _, m in parts]  # (batch, kv_heads, group, keys of the part)
    top = torch.stack([s.amax(-1, keepdim=True) for s in scores]).amax(0).clamp(min=torch.finfo(wide).min)
    exps = [torch.exp(s - top) for s in scores]
    total = sum(e.sum(-1, keepdim=True) for e in exps).clamp(min=1.0)  # >= 1 once a key is seen; 0 / 1 if none
    output = sum(_weighted_values((e / total).to(value.dtype), v) for e, (_, v, _) in zip(exps, parts))
    output = output.to(value.dtype).reshape(batch, heads, 1, value.shape[-1])
    return output.transpose(1, 2).contiguous()


def _weighted_values(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``weights @ value`` for one query per row, in float32: (batch, kv_heads, group, kv_len) x (batch,
    kv_heads, kv_len, d), ``kv_len`` whole chunks or less than one (``_one_query``'s parts). Over 32 chunks or
    more that is one long reduction per kv head, which one matrix product spreads over few GPU blocks; chunk
    by chunk it is many small products, summed in float32: the split of flash-decoding, in plain tensor ops.
    ``value`` is read in place when it is a whole tensor of whole chunks (``caches.in_place_slots``), else copied."""
    batch, kv_heads, group, kv_len = weights.shape
    chunks = kv_len // DECODE_CHUNK
    wide = torch.promote_types(value.dtype, torch.float32)
    if chunks < SPLIT_FROM_CHUNKS:
        return (weights @ value).to(wide)
    parts = weights.view(batch, kv_heads, group, chunks, DECODE_CHUNK).transpose(2, 3) @ value.view(
        batch, kv_heads, chunks, DECODE_CHUNK, value.shape[-1])  # (batch, kv_heads, chunks, group, d)
    return parts.sum(2, dtype=wide)

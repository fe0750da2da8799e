"""FlexAttention backend: window, sinks, causality, padding and packed sequences in one fused kernel.

The block mask is built from the plan's positions, at block granularity: for each block of 128 queries
it lists the key blocks that hold its window and its sinks, found by binary search over the keys. Nothing
of size L x L is ever made: FlexAttention's own format holds (L/128)^2 block indices (4 MB at 128k). Blocks whose every pair is visible are
marked full and skip the mask; the others apply ``rules.visible`` element by element.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..plan import Plan
from ..rules import LayerRule, decodes_differently, keys_in_reach, sink_end, visible, window_start
from .base import Backend, Call

BLOCK = 128
MIN_HEAD_DIM = 16  # FlexAttention's GPU kernel refuses smaller query/key/value embeddings
_SEQUENCE_STRIDE = 1 << 40  # (sequence, position) -> one sortable int64


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process; shapes become dynamic after the first recompile, and
    window and sink are tensors, so new lengths and configs reuse the compiled kernels."""
    return torch.compile(flex_attention)


def refuses(call: Call) -> str | None:
    """Takes every call of several queries, on a CUDA GPU, without weights or dropout, with heads the kernel
    can hold."""
    if call.need_weights:
        return "it returns no attention weights"
    if call.dropout:
        return f"it has no attention dropout (dropout={call.dropout})"
    if min(call.query.shape[-1], call.value.shape[-1]) < MIN_HEAD_DIM:
        return (f"head_dim {call.query.shape[-1]} (values {call.value.shape[-1]}) is below FlexAttention's minimum"
                f" of {MIN_HEAD_DIM}")
    return None


def _unavailable(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "it needs a CUDA GPU"


def _flex(query: torch.Tensor):
    """The fused kernel: compiled here, or traced into the caller's compiled step (a compiled decode)."""
    if not query.is_cuda or torch.compiler.is_compiling():
        return flex_attention
    return _compiled_flex()


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
    that ``refuses`` took. Returns (batch, q_len, heads, head_dim); queries that see no key (padding) give 0."""
    key_ = ("flex", *rule.key())
    if key_ not in plan.memo:
        plan.memo[key_] = block_mask(rule, plan)
    # Several queries (a prompt chunk, maybe of a compiled, dynamic length): the main kernel; one query: the
    # split-key decoding kernel.
    options = {"FORCE_USE_FLEX_ATTENTION": True} if query.shape[2] > 1 else None
    output = _flex(query)(query, key, value, block_mask=plan.memo[key_], scale=scaling, enable_gqa=True,
                          kernel_options=options)
    return output.transpose(1, 2).contiguous(), None


def _blocks(tensor: torch.Tensor, fill) -> torch.Tensor:
    """(batch, n) -> (batch, ceil(n / BLOCK), BLOCK), padded with ``fill``."""
    pad = -tensor.shape[1] % BLOCK
    return torch.nn.functional.pad(tensor, (0, pad), value=fill).view(tensor.shape[0], -1, BLOCK)


def block_mask(rule: LayerRule, plan: Plan) -> BlockMask:
    """The BlockMask of ``rule`` over ``plan``; exact through its mask_mod, sparse through its blocks."""
    query_pos, key_pos, generated = plan.query_pos, plan.key_pos, plan.query_generated
    batch, q_len = query_pos.shape
    kv_len = key_pos.shape[1]
    query_seq = plan.query_seq if plan.query_seq is not None else torch.zeros_like(query_pos)
    key_seq = plan.key_seq if plan.key_seq is not None else torch.zeros_like(key_pos)

    # Per query block: the span of (sequence, position) it covers, and whether a generated token is in it.
    q_valid = _blocks(query_pos >= 0, False)
    q_pos = _blocks(query_pos, -1)
    q_seq = _blocks(query_seq, 0)
    big = _SEQUENCE_STRIDE
    any_valid = q_valid.any(-1)
    q_lo_seq = torch.where(q_valid, q_seq, big).amin(-1).where(any_valid, 0)
    q_hi_seq = torch.where(q_valid, q_seq, -1).amax(-1).where(any_valid, 0)
    q_lo_pos = torch.where(q_valid & (q_seq == q_lo_seq[..., None]), q_pos, big).amin(-1).where(any_valid, 0)
    q_hi_pos = torch.where(q_valid & (q_seq == q_hi_seq[..., None]), q_pos, -1).amax(-1).where(any_valid, 0)
    needs_all = q_lo_seq != q_hi_seq  # a block spanning two packed sequences: list all its keys
    if rule.is_full:
        needs_all = torch.ones_like(needs_all)
    elif decodes_differently(rule):  # a generated query sees every earlier key
        needs_all |= (_blocks(generated, False) & q_valid).any(-1)

    # Keys sorted by (sequence, position); padding takes its left neighbour's value to keep the order.
    key_order = torch.where(key_pos >= 0, key_seq * big + key_pos, -1).cummax(-1).values
    near_lo = 0 if rule.is_full else torch.where(needs_all, 0, window_start(rule, q_lo_pos).clamp(min=0))
    near = torch.stack([q_lo_seq * big + near_lo, q_hi_seq * big + q_hi_pos + 1], -1)  # [lo, hi)
    sinks = torch.stack([q_lo_seq * big, q_lo_seq * big + sink_end(rule)], -1)
    bounds = torch.searchsorted(key_order, torch.cat([near, sinks], -1).view(batch, -1)).view(batch, -1, 4)
    first = bounds // BLOCK
    last = (bounds - 1).div(BLOCK, rounding_mode="floor")
    near_first, near_last = first[..., 0], last[..., 1]
    sink_first, sink_last = first[..., 2], last[..., 3]
    has_near = any_valid & (bounds[..., 1] > bounds[..., 0])
    has_sink = any_valid & (bounds[..., 3] > bounds[..., 2]) & ~needs_all
    # Sink blocks come first; when they touch the window's blocks the two runs merge into one.
    merged = has_sink & has_near & (sink_last >= near_first - 1)
    run1_first = torch.where(has_sink, sink_first, near_first)
    run1_last = torch.where(merged, torch.maximum(sink_last, near_last), torch.where(has_sink, sink_last, near_last))
    run1_count = torch.where(has_sink | has_near, run1_last - run1_first + 1, 0)
    run2_count = torch.where(has_sink & has_near & ~merged, near_last - near_first + 1, 0)
    nk_blocks = -(-kv_len // BLOCK)
    slot = torch.arange(nk_blocks, device=query_pos.device)  # FlexAttention's format: one slot per key block
    listed = slot < (run1_count + run2_count)[..., None]
    indices = torch.where(
        slot < run1_count[..., None], run1_first[..., None] + slot, near_first[..., None] + slot - run1_count[..., None]
    )
    indices = torch.where(listed, indices, 0).clamp(max=nk_blocks - 1)

    # A listed block is full when every (query, key) pair in it is visible.
    k_pos = _blocks(key_pos, -1)
    k_seq = _blocks(key_seq, -1)
    k_all_valid = (k_pos >= 0).all(-1)
    k_lo_pos, k_hi_pos = k_pos.amin(-1), k_pos.amax(-1)
    gather = lambda stat: stat.gather(1, indices.flatten(1)).view_as(indices)  # noqa: E731
    same_sequence = (q_lo_seq == q_hi_seq)[..., None] & (gather(k_seq.amin(-1)) == q_lo_seq[..., None])
    same_sequence &= gather(k_seq.amax(-1)) == q_lo_seq[..., None]
    full = listed & q_valid.all(-1)[..., None] & gather(k_all_valid) & same_sequence
    full &= gather(k_hi_pos) <= q_lo_pos[..., None]
    if not rule.is_full:
        all_generated = ((_blocks(generated, True) | ~q_valid).all(-1) if decodes_differently(rule)
                         else torch.zeros_like(any_valid))
        in_reach = keys_in_reach(rule, gather(k_lo_pos), gather(k_hi_pos), q_hi_pos[..., None])
        full &= in_reach | all_generated[..., None]
    partial = listed & ~full

    def ordered(keep):
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
        return keep.sum(-1).int()[:, None], indices.gather(-1, order).int()[:, None]

    kv_num, kv_indices = ordered(partial)
    full_num, full_indices = ordered(full)
    mask_mod = _mask_mod(rule, plan, q_len, kv_len)
    return BlockMask.from_kv_blocks(
        kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(q_len, kv_len)
    )


def _tensor_rule(rule: LayerRule, device: torch.device) -> LayerRule:
    """The rule with window and sink as tensors: the compiled kernel then serves every window size."""
    if rule.is_full:
        return rule
    return LayerRule(torch.tensor(rule.window, device=device), torch.tensor(rule.sink, device=device), rule.fa_decode)


@functools.cache
def _index_mask_mod(rule: LayerRule, device: torch.device):
    """Prompt rows without padding, packing or cache: positions are indices, so the mask_mod loads nothing,
    and one function object per rule lets the compiled kernel be reused across forwards."""
    rule = _tensor_rule(rule, device)

    def mask_mod(b, h, q, k):
        return visible(rule, q, k, False)

    return mask_mod


def _mask_mod(rule: LayerRule, plan: Plan, q_len: int, kv_len: int):
    """``rules.visible`` as a FlexAttention mask_mod. The kernel asks about whole blocks, so indices past the
    last query or key are clamped for the loads and such keys are never visible (clamping rather than padding
    the position tensors keeps a compiled decode step from fusing a pad into the kernel). Window and sink enter
    as tensors, so the compiled kernel serves every window size without recompiling."""
    device = plan.query_pos.device
    if q_len == kv_len and plan.plain() and not plan.generated_matters(rule):
        # traced into a compiled prefill, the cache has nothing to keep (dynamo warns about cached functions)
        return (_index_mask_mod.__wrapped__ if torch.compiler.is_compiling() else _index_mask_mod)(rule, device)
    rule = _tensor_rule(rule, device)
    query_pos, key_pos, generated = plan.query_pos, plan.key_pos, plan.query_generated
    query_seq, key_seq = plan.query_seq, plan.key_seq

    def mask_mod(b, h, q, k):
        q, k_in = q.clamp(max=query_pos.shape[1] - 1), k.clamp(max=key_pos.shape[1] - 1)
        same_sequence = True if query_seq is None else query_seq[b, q] == key_seq[b, k_in]
        seen = visible(rule, query_pos[b, q], key_pos[b, k_in], generated[b, q], same_sequence)
        return seen & (k < key_pos.shape[1])

    return mask_mod


BACKEND = Backend(
    name="flex", order=20, attend=attend, unavailable=_unavailable, refuses=refuses,
    prefill_only=(
        "FlexAttention's decoding kernel read a half-written static cache of 128k slots in 525 us on an H200"
        " (the grouped matrix products swaa used then took 350), and inductor (torch 2.11) failed to build it"
        " inside a compiled decode step"
    ),
    about="window, sinks, padding and cache slots in one block-sparse kernel",
)

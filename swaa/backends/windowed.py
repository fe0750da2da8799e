"""Windowed attention on PyTorch's own kernels: each SWA query reads its sinks and its window, nothing else.

The CPU's path (auto's pick there where it is exact). Queries go in chunks of ``CHUNK``; each chunk attends
through ``F.scaled_dot_product_attention`` (the CPU flash kernel, grouped heads in place) over the keys its
queries can reach, with a small mask of (chunk, keys read) from ``rules.visible``. Nothing the size of the
context is built, and the work per query is O(window + chunk + sink) for a window query.

Which keys a chunk reads, from the plan's positions (``_schedule``: once per forward and rule):

- the line: from some slot ``held`` on, every real key of a row sits at its position plus a per-row offset
  (left padding shifts a row; a static cache's unwritten tail is -1). A chunk reads one range of those slots,
  a view of the cache shared by the rows: from the lowest ``window_start`` of its queries (0 for a query that
  sees its whole prefix: a full layer, a generated token under FA decode) to its last query;
- the extra keys, which every chunk that needs them reads whole: the slots before ``held`` (a bounded cache's
  ring, in any order, at most ``kept_keys``) and the sinks found on the line. A chunk that reads them hides
  the line's sinks in its mask, so no key counts twice.

Layers of one rule share each chunk's mask, and the steady chunks of a long prompt (every query windowed past
the sinks, no padding, the same shape) share one: past the sinks the rule depends on ``query - key`` only. They
also run side by side in one SDPA call over an unfolded view of the cache (``_attend_steady``), the sinks merged
in through the log-sum-exp when no gradient is asked: a few calls a layer, no copy of the cache. A prompt's first
window (queries that see their whole prefix) is one causal call with no mask. Calls
where no query needs a mask (a full layer's prompt, a decode step that sees every key, on plain rows) run
``sdpa.attend``, the call an unpatched model makes. Gradients are autograd's through SDPA, views and ``cat``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..plan import Plan
from ..rules import LayerRule, sees_whole_prefix, sink_end, visible, window_start
from . import sdpa
from .base import Backend, Call

CHUNK = 256  # queries a chunk: with a 2k window, 11% more keys read than seen, and few chunks to plan


@dataclass(frozen=True)
class _Chunk:
    """One SDPA call: queries ``[start, stop)`` read the line's slots ``[lo, hi)``, after the extra keys when
    ``extra``. ``padded``: some of its queries are padding (they see nothing and give 0). ``mask_key`` names its
    mask among the plan's: chunks that share a key share a mask."""

    start: int
    stop: int
    lo: int
    hi: int
    extra: bool
    padded: bool
    mask_key: tuple


@dataclass(frozen=True)
class _Schedule:
    """Where every chunk reads, for one rule over one plan. head: the first ``head`` queries and keys are a plain
    causal prompt (no chunk holds them); extra_slot, extra_pos: (batch, n) slots and positions of the extra keys,
    -1 where a row has none; ``extra_prefix``: they are the slots ``[0, n)`` of every row."""

    head: int
    extra_slot: torch.Tensor
    extra_pos: torch.Tensor
    extra_prefix: bool
    chunks: tuple[_Chunk, ...]


def _per_chunk(values: torch.Tensor, head: int, chunk: int, fill, reduce) -> list:
    """(batch, q_len) -> one value per chunk of ``chunk`` queries after the first ``head``, reduced over the
    rows and the chunk."""
    values = values[:, head:]
    batch, q_len = values.shape
    count = -(-q_len // chunk)
    if not count:
        return []
    padded = F.pad(values, (0, count * chunk - q_len), value=fill).view(batch, count, chunk)
    return reduce(padded.transpose(0, 1).reshape(count, -1), -1).tolist()


def _schedule(rule: LayerRule, plan: Plan, chunk: int) -> _Schedule:
    """The chunks of one call and the keys each reads; one look at the plan's positions on the host."""
    key_pos, query_pos, generated = plan.key_pos, plan.query_pos, plan.query_generated
    batch, kv_len = key_pos.shape
    device = key_pos.device
    slot = torch.arange(kv_len, device=device)
    real = key_pos >= 0
    shift = slot - key_pos  # where a key sits against its position
    offset = shift.gather(1, torch.where(real, slot, 0).amax(-1, keepdim=True))  # (batch, 1): at each row's last key
    held = int(torch.where(real & (shift != offset), slot + 1, 0).amax()) if kv_len else 0

    # the extra keys: the held slots, and the sinks on the line (those found in some row)
    sink_count = min(sink_end(rule), int(key_pos.max()) + 1)  # sinks no key reaches are none to look for
    sinks = torch.arange(sink_count, device=device)
    sink_slot = offset + sinks  # (batch, sink): where each sink sits if it is on the line
    on_line = (sink_slot >= held) & (sink_slot < kv_len)
    on_line &= key_pos.gather(1, sink_slot.clamp(0, max(kv_len - 1, 0))) == sinks
    found = on_line.any(0)
    sinks, sink_slot, on_line = sinks[found], sink_slot[:, found], on_line[:, found]
    extra_slot = torch.cat([slot[:held].expand(batch, -1), torch.where(on_line, sink_slot, 0)], 1)
    extra_pos = torch.cat([key_pos[:, :held], torch.where(on_line, sinks, -1)], 1)
    extra_prefix = bool((extra_slot == slot[: extra_slot.shape[1]]).all())
    first_sink_slot = int(torch.where(on_line, sink_slot, kv_len).amin()) if sinks.numel() else kv_len

    # the line's slots each query may need: from its window's start (0 when it sees its whole prefix) to itself
    padding = query_pos < 0
    if rule.is_full:
        whole = torch.ones_like(padding)
        first = torch.zeros_like(query_pos)
    else:
        whole = torch.as_tensor(sees_whole_prefix(rule, query_pos, generated), device=device)
        first = torch.where(whole, 0, window_start(rule, query_pos).clamp(min=0))
    lo = torch.where(padding, kv_len, first + offset).clamp(held, kv_len)
    hi = torch.where(padding, held, query_pos + offset + 1).clamp(held, kv_len)
    # the head: leading queries that see their whole prefix, each at the slot of its position in every row (no
    # cache, no padding); with those keys they are a plain causal prompt, which needs no mask
    q_len = query_pos.shape[1]
    index = torch.arange(q_len, device=device)
    at_index = (query_pos == index) & (key_pos[:, :q_len] == index) & whole
    head = int(at_index.all(0).long().cumprod(0).sum())
    chunk_lo = _per_chunk(lo, head, chunk, kv_len, torch.amin)
    chunk_hi = [max(low, high) for low, high in zip(chunk_lo, _per_chunk(hi, head, chunk, held, torch.amax))]

    # Steady chunks share a mask: every row's queries at consecutive positions, windowed past every sink, all
    # sinks among the extra keys and nothing else, a line of real keys. Their mask depends on the place of the
    # line against the queries alone: past the sinks the rule depends on query - key only.
    after_previous = F.pad(query_pos[:, 1:] - query_pos[:, :-1] == 1, (1, 0), value=True)
    after_previous[:, head::chunk] = True  # a chunk's first query
    all_sinks = held == 0 and bool(on_line.all()) and sinks.numel() == sink_count
    steady = ~padding & ~whole & (first >= sink_end(rule)) & after_previous & all_sinks
    real_before = F.pad(real.long().cumsum(-1), (1, 0))  # (batch, kv_len + 1)
    line_length = torch.tensor(chunk_hi, device=device) - torch.tensor(chunk_lo, device=device)
    line_real = real_before[:, chunk_hi] - real_before[:, chunk_lo] == line_length
    chunks = []
    for start, low, high, padded, is_steady, all_real in zip(
        range(head, q_len, chunk), chunk_lo, chunk_hi, _per_chunk(padding, head, chunk, False, torch.any),
        _per_chunk(steady, head, chunk, False, torch.all), line_real.all(0).tolist(),
    ):
        stop = min(start + chunk, q_len)
        mask_key = ("steady", low - start, high - low, stop - start) if is_steady and all_real else ("at", start)
        chunks.append(_Chunk(start, stop, low, high, held > 0 or first_sink_slot < low, padded, mask_key))
    return _Schedule(head, extra_slot, extra_pos, extra_prefix, tuple(chunks))


MASK_MEMO_BYTES = 256 << 10  # masks kept per plan for the next layers: decode steps' (steady masks are always kept)


def _mask(rule: LayerRule, plan: Plan, schedule: _Schedule, chunk: _Chunk) -> torch.Tensor:
    """(batch, 1, queries, keys read) bool mask of one chunk, the extra keys' then the line's. Layers of one rule
    share it: kept in the plan's memo, but for non-steady chunks past ``MASK_MEMO_BYTES``. Bool, a quarter of an
    additive mask's bytes: it outlives the layer, the additive one SDPA makes of it does not."""
    memo_key = ("windowed mask", *rule.key(), *chunk.mask_key)
    if memo_key in plan.memo:
        return plan.memo[memo_key]
    query_pos = plan.query_pos[:, chunk.start : chunk.stop, None]
    generated = plan.query_generated[:, chunk.start : chunk.stop, None]
    line_pos = plan.key_pos[:, None, chunk.lo : chunk.hi]
    seen = visible(rule, query_pos, line_pos, generated)
    if chunk.extra:  # the extra keys bring the sinks: the line's are hidden
        extra = visible(rule, query_pos, schedule.extra_pos[:, None, :], generated)
        seen = torch.cat([extra, seen & (line_pos >= sink_end(rule))], -1)
    if chunk.padded:  # a padding query sees nothing: any finite softmax will do, its output is zeroed
        seen = seen | (query_pos < 0)
    mask = seen[:, None]
    kept = plan.memo.get("windowed mask bytes", 0)
    if chunk.mask_key[0] == "steady" or kept + mask.nbytes <= MASK_MEMO_BYTES:
        plan.memo[memo_key] = mask
        plan.memo["windowed mask bytes"] = kept + mask.nbytes
    return mask


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
    """query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim), heads a
    multiple of kv_heads; a plan of one sequence per row. Returns (batch, q_len, heads, head_dim); a padding
    query gives 0."""
    if sdpa.refuses(Call(query, key, value, rule, plan, dropout)) is None:
        return sdpa.attend(query, key, value, rule=rule, plan=plan, scaling=scaling, dropout=dropout)
    memo_key = ("windowed", *rule.key())
    if memo_key not in plan.memo:
        plan.memo[memo_key] = _schedule(rule, plan, CHUNK)
    schedule = plan.memo[memo_key]
    extra_count = schedule.extra_slot.shape[1]
    extras = None, None
    if schedule.extra_prefix:
        extras = key[:, :, :extra_count], value[:, :, :extra_count]
    elif any(chunk.extra for chunk in schedule.chunks):
        index = schedule.extra_slot[:, None, :, None].expand(-1, key.shape[1], -1, -1)
        extras = tuple(t.gather(2, index.expand(-1, -1, -1, t.shape[3])) for t in (key, value))
    run = functools.partial(F.scaled_dot_product_attention, dropout_p=dropout, scale=scaling, enable_gqa=True)
    key_bytes = query.shape[0] * key.shape[1] * (key.shape[3] + value.shape[3]) * key.element_size()
    parts = []  # (batch, queries, heads, head_dim) each, in query order
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if schedule.head:
        head = slice(0, schedule.head)
        parts.append(run(query[:, :, head], key[:, :, head], value[:, :, head], is_causal=True).transpose(1, 2))
    for group in _groups(schedule.chunks, extra_count, key_bytes):
        first = group[0]
        if len(group) > 1:  # steady chunks: one call, the chunks side by side in the batch dimension
            mask = _mask(rule, plan, schedule, first)
            parts.append(_attend_steady(run, query, key, value, extras, group, mask, grad))
            continue
        queries = slice(first.start, first.stop)
        if first.lo == first.hi and not first.extra:  # no key to read: padding queries only
            parts.append(query.new_zeros(query.shape[0], first.stop - first.start, query.shape[1], value.shape[3]))
            continue
        keys, values = key[:, :, first.lo : first.hi], value[:, :, first.lo : first.hi]
        if first.extra and schedule.extra_prefix and first.lo == extra_count:  # one range of slots: no copy
            keys, values = key[:, :, : first.hi], value[:, :, : first.hi]
        elif first.extra:
            keys, values = torch.cat([extras[0], keys], 2), torch.cat([extras[1], values], 2)
        part = run(query[:, :, queries], keys, values, attn_mask=_mask(rule, plan, schedule, first))
        if first.padded:
            part = part * (plan.query_pos[:, None, queries, None] >= 0)
        parts.append(part.transpose(1, 2))
    return torch.cat(parts, 1) if len(parts) > 1 else parts[0].contiguous(), None


GROUP_BYTES = 16 << 20  # the keys and values that one call over steady chunks copies, at most


def _groups(chunks: tuple[_Chunk, ...], extra_count: int, key_bytes: int):
    """The chunks in runs of steady chunks of one mask, each run's keys and values at most ``GROUP_BYTES``
    (``key_bytes``: one key and its value in every row); other chunks alone."""
    group: list[_Chunk] = []
    for chunk in chunks:
        chunk_bytes = (chunk.hi - chunk.lo + extra_count * chunk.extra) * key_bytes
        if group and (chunk.mask_key[0] != "steady" or chunk.mask_key != group[0].mask_key
                      or (len(group) + 1) * chunk_bytes > GROUP_BYTES):
            yield group
            group = []
        group.append(chunk)
    if group:
        yield group


def _attend_steady(run, query, key, value, extras, group: list[_Chunk], mask: torch.Tensor,
                   grad: bool) -> torch.Tensor:
    """Steady chunks in one call, side by side in the batch dimension: each chunk's queries and line are the
    first's moved by a whole chunk, so the lines are one unfolded view of the cache; their masks are one, the
    same in every row. Every query sees every extra key (the sinks). Without gradients, the sinks are a second
    call merged through the log-sum-exp, as ``flash.py`` merges them (no copy of the cache); with them (autograd
    has no gradient for the kernel's log-sum-exp), the sinks are copied in front of each chunk's line. Returns
    (batch, queries, heads, head_dim)."""
    first, count = group[0], len(group)
    size, width = first.stop - first.start, first.hi - first.lo
    batch, heads = query.shape[:2]
    queries = query[:, :, first.start : first.start + count * size].unflatten(2, (count, size)).transpose(1, 2)
    queries = queries.reshape(batch * count, heads, size, -1)

    def per_chunk(tensor: torch.Tensor) -> torch.Tensor:  # (batch, kv_heads, chunk, n, head_dim) -> batch * chunk
        return tensor.transpose(1, 2).reshape(batch * count, tensor.shape[1], -1, tensor.shape[4])

    def lines_of(tensor: torch.Tensor) -> torch.Tensor:  # a view of the cache
        return tensor[:, :, first.lo : first.lo + (count - 1) * size + width].unfold(2, width, size).transpose(3, 4)

    def extras_of(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, :, None].expand(-1, -1, count, -1, -1)

    if not first.extra:
        output = run(queries, per_chunk(lines_of(key)), per_chunk(lines_of(value)), attn_mask=mask[:1])
    elif grad:  # copied in the cache's order (kv_heads outermost): the fastest copy measured
        keys, values = (per_chunk(torch.cat([extras_of(extra), lines_of(tensor)], 3))
                        for extra, tensor in zip(extras, (key, value)))
        output = run(queries, keys, values, attn_mask=mask[:1])
    else:
        flash = functools.partial(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                                  dropout_p=run.keywords["dropout_p"], scale=run.keywords["scale"])
        sink_count = extras[0].shape[2]
        line_mask = mask[:1, :, :, sink_count:]  # the kernel itself takes additive masks only
        line_mask = torch.zeros(line_mask.shape, dtype=query.dtype).masked_fill_(~line_mask, float("-inf"))
        line, line_lse = flash(queries, per_chunk(lines_of(key)), per_chunk(lines_of(value)), attn_mask=line_mask)
        sink, sink_lse = flash(queries, per_chunk(extras_of(extras[0])), per_chunk(extras_of(extras[1])))
        wide = torch.promote_types(line.dtype, torch.float32)
        sink_share = torch.sigmoid(sink_lse - line_lse)[..., None].to(wide)  # exp(sink) / (exp(line) + exp(sink))
        output = torch.lerp(line.to(wide), sink.to(wide), sink_share).to(line.dtype)
    return output.transpose(1, 2).reshape(batch, count * size, heads, -1)


def refuses(call: Call) -> str | None:
    """Takes every call of one sequence per row, outside a compiled forward, without attention weights."""
    if call.need_weights:
        return "it returns no attention weights"
    if call.plan.query_seq is not None:
        return "packed sequences (several per row): the reference's mask separates them"
    return None


def _unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"it is the CPU's path; on {device.type} sdpa, flex and flash read only the window"
    return None


BACKEND = Backend(
    name="windowed", order=90, attend=attend, unavailable=_unavailable, refuses=refuses,
    uncompilable="it reads the plan's positions on the host to choose each chunk's keys",
    about="each query reads its window and sinks through PyTorch's fused attention, a small mask per chunk",
)

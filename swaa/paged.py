"""swaa's rule over a paged KV cache, in plain torch (no vLLM import): the attention of a serving engine's batch.

A serving engine (vLLM) keeps every request's keys and values in fixed-size cache blocks and hands attention one
batch of new tokens from many requests: some still reading their prompt (many queries), some generating (one query),
in any mix. ``paged_attention`` computes that batch's attention by swaa's rule, per layer, reading from the cache only
the keys a query can see:

- an SWA query that is a prompt token (or a generated token without FA decode): the sinks and its window;
- a query of a full-attention layer, or a generated token under FA decode: every earlier key.

Queries are attended in groups, each over the cache blocks that hold the keys its queries can see
(``_visible_blocks``), copied whole through the block table, with the rule's mask (``swaa.rules.visible``) over those
keys only, on PyTorch's fused attention (``scaled_dot_product_attention``):

- a decode step that sees every key (FA decode, a full-attention layer), on the CPU: its request's keys read in
  place, no copy, one CPU flash-kernel call per run of consecutive cache blocks, the runs merged through their
  log-sum-exps (``_attend_every_key``; a table broken into more than ``MAX_RUNS`` runs is copied once);
- the other requests that bring one query (decode steps) in one batched call, their blocks padded to the longest;
- a request that brings several (a prompt, or a prompt chunk) in tiles of ``tile`` queries: an SWA tile reads the
  sinks' blocks and the blocks from its first query's window start to its last query, about
  ``sink + window + tile + 2 x block_size`` keys; SWA tiles of every request go in one batched call.

So an SWA prompt of n tokens costs about n x (sink + window + tile + 2 x block_size) scores, not n x n / 2.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from .rules import LayerRule, sees_whole_prefix, visible, window_start

TILE = 256  # queries per group of a request with many new tokens
_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # (output, log-sum-exp)
MAX_RUNS = 8  # a decode step over a block table broken into more runs copies the request's blocks once


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_table: torch.Tensor, query_starts: list[int], seq_lens: list[int], prompt_lens: list[int],
                    rule: LayerRule, scaling: float, tile: int = TILE) -> torch.Tensor:
    """One layer's attention for a batch of requests' new tokens under ``rule``.

    query: (tokens, heads, head_dim), every request's new tokens one after another.
    key_cache, value_cache: (num_blocks, kv_heads, block_size, head_dim), views of any strides but the last (vLLM's
        CPU cache ``[..., :head_dim]`` and ``[..., head_dim:]``; its GPU layout ``.transpose(1, 2)``); the new tokens'
        keys and values are already written, and unwritten slots hold finite values (vLLM zero-fills its cache).
    block_table: (requests, blocks per request) int: request r's token at position p lies in block
        ``block_table[r, p // block_size]`` at offset ``p % block_size``.
    query_starts: requests + 1 ints: request r's new tokens are ``query[query_starts[r]:query_starts[r + 1]]``.
    seq_lens: per request, its tokens so far, the new ones included (they are the last ones).
    prompt_lens: per request, its prompt length: tokens at positions ``prompt_len`` and beyond are generated
        (under FA decode they see every earlier key). A preempted request recomputing prompt and answer in one
        chunk keeps its prompt length.
    heads must be a multiple of kv_heads (grouped-query attention). Returns (tokens, heads, head_dim).
    """
    output = torch.empty_like(query)
    block_size = key_cache.shape[2]
    windowed, whole = [], []  # groups (request, first row, end row, positions, cache blocks): batched by kind
    for request, seq_len in enumerate(seq_lens):
        first, end = query_starts[request], query_starts[request + 1]
        for lo in range(first, end, tile):
            hi = min(lo + tile, end)
            first_pos, last_pos = seq_len - (end - lo), seq_len - (end - hi) - 1
            positions = torch.arange(first_pos, last_pos + 1, device=query.device)
            blocks, everything = _visible_blocks(rule, first_pos, last_pos, prompt_lens[request], block_size,
                                                 query.device)
            group = (request, lo, hi, positions, blocks)
            if not everything:
                windowed.append(group)
            elif hi - lo == 1 and query.device.type == "cpu":  # a decode step seeing every key: keys read in place
                output[lo] = _attend_every_key(query[lo], key_cache, value_cache, block_table[request], seq_len,
                                               scaling)
            elif hi - lo == 1:
                whole.append(group)  # decode steps seeing every key: one call
            else:  # a tile seeing every key: alone (padding tiles to the longest would double causal work)
                _attend_groups(rule, [group], query, key_cache, value_cache, block_table, prompt_lens, scaling,
                               output)
    for groups in (windowed, whole):
        if groups:
            _attend_groups(rule, groups, query, key_cache, value_cache, block_table, prompt_lens, scaling, output)
    return output


def _visible_blocks(rule: LayerRule, first: int, last: int, prompt_len: int, block_size: int,
                    device) -> tuple[torch.Tensor, bool]:
    """The request's cache blocks (logical indices, ascending) that hold the keys a run of consecutive queries at
    positions ``first..last`` may see between them, and whether those are every key: every block up to the last
    query where one of them sees its whole prefix, else the sinks' blocks and the window's from the first query's
    window start to the last query. Whole blocks are read (one copy per block); the mask drops the keys in them no
    query sees."""
    if sees_whole_prefix(rule, first, last >= prompt_len):
        return torch.arange(last // block_size + 1, device=device), True
    window_block = window_start(rule, first) // block_size
    sink_blocks = min(-(-rule.sink // block_size), window_block)
    return torch.cat([torch.arange(sink_blocks, device=device),
                      torch.arange(window_block, last // block_size + 1, device=device)]), False


def _attend_groups(rule: LayerRule, groups: list, query: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, block_table: torch.Tensor, prompt_lens: list[int], scaling: float,
                   output: torch.Tensor) -> None:
    """One fused attention call over ``groups`` (request, first row, end row, query positions, logical cache
    blocks), queries and blocks padded to the group's longest; writes ``output[first:end]`` of each."""
    requests = [group[0] for group in groups]
    rows = torch.cat([torch.arange(lo, hi, device=query.device) for _, lo, hi, _, _ in groups])
    positions = pad_sequence([group[3] for group in groups], batch_first=True, padding_value=-1)  # (n, q)
    blocks = pad_sequence([group[4] for group in groups], batch_first=True, padding_value=-1)  # (n, b)
    real = positions >= 0
    queries = query.new_zeros(*positions.shape, *query.shape[1:])
    queries[real] = query[rows]
    block_size = key_cache.shape[2]
    physical = block_table[requests].gather(1, blocks.clamp(min=0)).long()
    keys = blocks[:, :, None] * block_size + torch.arange(block_size, device=query.device)  # (n, b, block_size)
    keys = keys.masked_fill(blocks[:, :, None] < 0, -1).flatten(1)  # (n, k) key positions, -1: padding
    # one copy of the blocks, (kv_heads, n, b, block_size, d), seen as (n, kv_heads, k, d)
    key, value = (cache.transpose(0, 1)[:, physical].to(query.dtype).transpose(0, 1).flatten(2, 3)
                  for cache in (key_cache, value_cache))
    generated = positions >= torch.tensor([prompt_lens[r] for r in requests], device=query.device)[:, None]
    mask = visible(rule, positions[:, :, None], keys[:, None, :], generated[:, :, None])  # (n, q, k); pads: none
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), key, value, attn_mask=mask[:, None], scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    output[rows] = out.transpose(1, 2)[real]


def _attend_every_key(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      blocks: torch.Tensor, seq_len: int, scaling: float) -> torch.Tensor:
    """One query (heads, head_dim) over every key of its request, the ``seq_len`` keys in cache blocks ``blocks``
    (the request's block-table row), read in place: each run of consecutive cache blocks is one view of the cache
    (blocks sorted first: a fresh engine hands a request consecutive blocks, a used one in descending order: one
    run either way), and the blocks of a table broken into more than ``MAX_RUNS`` runs are copied once. Each piece is one call of PyTorch's CPU flash kernel over a batch of blocks
    (batch: block, heads: kv heads, queries: the query's heads of that kv head), the last block's unwritten slots
    masked; the blocks' log-sum-exps merge their outputs exactly."""
    kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    physical = blocks[: -(-seq_len // block_size)].long()
    ordered, order = physical.sort()  # a query attends to its keys as a set: the blocks in any order serve
    runs = [0, *((ordered[1:] != ordered[:-1] + 1).nonzero()[:, 0] + 1).tolist(), len(ordered)]
    if len(runs) - 1 > MAX_RUNS:
        runs = [0, len(ordered)]
        pieces = [(key_cache[ordered], value_cache[ordered])]
    else:
        starts = [int(ordered[first]) for first in runs[:-1]]
        pieces = [(key_cache[start : start + end - first], value_cache[start : start + end - first])
                  for start, first, end in zip(starts, runs, runs[1:])]
    last = int((order == len(physical) - 1).nonzero())  # the last, partly written block's place in ``ordered``
    last_piece = bisect.bisect_right(runs, last) - 1
    last_mask = query.new_zeros(len(pieces[last_piece][0]), 1, 1, block_size)
    last_mask[last - runs[last_piece], ..., torch.arange(block_size) >= seq_len - (len(physical) - 1) * block_size] \
        = float("-inf")
    grouped = query.view(kv_heads, -1, query.shape[-1])  # (kv_heads, query heads per kv head, head_dim)
    outputs, lses = zip(*(_cpu_flash(grouped.expand(len(key), *grouped.shape), key.to(query.dtype),
                                     value.to(query.dtype), scale=scaling,
                                     attn_mask=last_mask if index == last_piece else None)
                          for index, (key, value) in enumerate(pieces)))
    weights = torch.cat(lses).softmax(dim=0)  # (blocks, kv_heads, heads per kv head): each block's share
    return (torch.cat(outputs) * weights[..., None]).sum(0).flatten(0, 1).to(query.dtype)

"""swaa's rule over a paged KV cache, in plain torch (no vLLM import): the attention of a serving engine's batch.

A serving engine (vLLM) keeps every request's keys and values in fixed-size cache blocks and hands attention one
batch of new tokens from many requests: some still reading their prompt (many queries), some generating (one query),
in any mix. ``paged_attention`` computes that batch's attention by swaa's rule, per layer, reading from the cache only
the keys a query can see:

- an SWA query that is a prompt token (or a generated token without FA decode): the sinks and its window;
- a query of a full-attention layer, or a generated token under FA decode: every earlier key.

Queries are attended in groups, each over the key positions its queries can see (``_visible_keys``), gathered from
the cache through the block table, with the rule's mask (``swaa.rules.visible``) over those positions only, on
PyTorch's fused attention (``scaled_dot_product_attention``):

- every request that brings one query (a decode step) in one batched call, its keys padded to the longest;
- a request that brings several (a prompt, or a prompt chunk) in tiles of ``tile`` queries: an SWA tile reads the
  sinks and the window of its first query up to its last one, ``sink + window - 1 + tile`` keys at most.

So an SWA prompt of n tokens costs about n x (sink + window + tile) scores, not n x n / 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from .rules import LayerRule, sees_whole_prefix, visible, window_start

TILE = 256  # queries per group of a request with many new tokens


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_table: torch.Tensor, query_starts: list[int], seq_lens: list[int], prompt_lens: list[int],
                    rule: LayerRule, scaling: float, tile: int = TILE) -> torch.Tensor:
    """One layer's attention for a batch of requests' new tokens under ``rule``.

    query: (tokens, heads, head_dim), every request's new tokens one after another.
    key_cache, value_cache: (num_blocks, block_size, kv_heads, head_dim) (views are fine); the new tokens' keys and
        values are already written.
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
    windowed, whole = [], []  # groups (request, first row, end row, positions, keys): batched by kind
    for request, seq_len in enumerate(seq_lens):
        first, end = query_starts[request], query_starts[request + 1]
        for lo in range(first, end, tile):
            hi = min(lo + tile, end)
            positions = torch.arange(seq_len - (end - lo), seq_len - (end - hi), device=query.device)
            keys, everything = _visible_keys(rule, positions, prompt_lens[request])
            group = (request, lo, hi, positions, keys)
            if not everything:
                windowed.append(group)
            elif hi - lo == 1:
                whole.append(group)  # decode steps seeing every key: one call
            else:  # a tile seeing every key: alone (padding tiles to the longest would double causal work)
                _attend_groups(rule, [group], query, key_cache, value_cache, block_table, prompt_lens, scaling, output)
    for groups in (windowed, whole):
        if groups:
            _attend_groups(rule, groups, query, key_cache, value_cache, block_table, prompt_lens, scaling, output)
    return output


def _visible_keys(rule: LayerRule, positions: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, bool]:
    """Key positions that a run of consecutive queries at ``positions`` may see between them, ascending, and
    whether that is every key: every key up to the last query where one of them sees its whole prefix, else the
    sinks and the window from the first query's window start to the last query."""
    first, last = int(positions[0]), int(positions[-1])
    device = positions.device
    if sees_whole_prefix(rule, first, last >= prompt_len):
        return torch.arange(last + 1, device=device), True
    start = window_start(rule, first)
    return torch.cat([torch.arange(rule.sink, device=device), torch.arange(start, last + 1, device=device)]), False


def _attend_groups(rule: LayerRule, groups: list, query: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, block_table: torch.Tensor, prompt_lens: list[int], scaling: float,
                   output: torch.Tensor) -> None:
    """One fused attention call over ``groups`` (request, first row, end row, query positions, key positions),
    queries and keys padded to the group's longest; writes ``output[first:end]`` of each."""
    requests = [group[0] for group in groups]
    rows = torch.cat([torch.arange(lo, hi, device=query.device) for _, lo, hi, _, _ in groups])
    positions = pad_sequence([group[3] for group in groups], batch_first=True, padding_value=-1)  # (n, q)
    keys = pad_sequence([group[4] for group in groups], batch_first=True, padding_value=-1)  # (n, k)
    real = positions >= 0
    queries = query.new_zeros(*positions.shape, *query.shape[1:])
    queries[real] = query[rows]
    block_size = key_cache.shape[1]
    read = keys.clamp(min=0)
    blocks = block_table[requests].gather(1, read // block_size).long()
    offsets = read % block_size
    key = key_cache[blocks, offsets].to(query.dtype)  # (n, k, kv_heads, d)
    value = value_cache[blocks, offsets].to(query.dtype)
    generated = positions >= torch.tensor([prompt_lens[r] for r in requests], device=query.device)[:, None]
    mask = visible(rule, positions[:, :, None], keys[:, None, :], generated[:, :, None])  # (n, q, k); pads: none
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=mask[:, None], scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[2])
    output[rows] = out.transpose(1, 2)[real]

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
    decode = []  # (request, query position, generated) of requests with one new token
    for request, seq_len in enumerate(seq_lens):
        first, end = query_starts[request], query_starts[request + 1]
        if end - first == 1:
            decode.append(request)
            continue
        for lo in range(first, end, tile):
            hi = min(lo + tile, end)
            positions = torch.arange(seq_len - (end - lo), seq_len - (end - hi), device=query.device)
            keys = _visible_keys(rule, positions, prompt_lens[request], query.device)
            output[lo:hi] = _attend(rule, query[lo:hi][None], positions[None], keys[None],
                                    torch.tensor([prompt_lens[request]], device=query.device), key_cache,
                                    value_cache, block_table[request : request + 1], scaling)[0]
    if decode:
        rows = torch.tensor([query_starts[r] for r in decode], device=query.device)
        positions = torch.tensor([seq_lens[r] - 1 for r in decode], device=query.device)[:, None]
        keys = [_visible_keys(rule, positions[i], prompt_lens[r], query.device) for i, r in enumerate(decode)]
        keys = torch.nn.utils.rnn.pad_sequence(keys, batch_first=True, padding_value=-1)
        output[rows] = _attend(rule, query[rows][:, None], positions, keys,
                               torch.tensor([prompt_lens[r] for r in decode], device=query.device), key_cache,
                               value_cache, block_table[decode], scaling)[:, 0]
    return output


def _visible_keys(rule: LayerRule, positions: torch.Tensor, prompt_len: int, device) -> torch.Tensor:
    """Key positions that a run of consecutive queries at ``positions`` may see between them, ascending: every
    key up to the last query where one of them sees its whole prefix, else the sinks and the window from the first
    query's window start to the last query."""
    first, last = int(positions[0]), int(positions[-1])
    if sees_whole_prefix(rule, first, last >= prompt_len):
        return torch.arange(last + 1, device=device)
    start = window_start(rule, first)
    return torch.cat([torch.arange(rule.sink, device=device), torch.arange(start, last + 1, device=device)])


def _attend(rule: LayerRule, query: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
            prompt_lens: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
            block_table: torch.Tensor, scaling: float) -> torch.Tensor:
    """query: (n, q, heads, d) at ``positions`` (n, q); keys: (n, k) key positions to read, -1 for none;
    block_table: (n, blocks); prompt_lens: (n,). Returns (n, q, heads, d)."""
    block_size = key_cache.shape[1]
    read = keys.clamp(min=0)
    blocks = block_table.gather(1, read // block_size).long()
    offsets = read % block_size
    key = key_cache[blocks, offsets].to(query.dtype)  # (n, k, kv_heads, d)
    value = value_cache[blocks, offsets].to(query.dtype)
    generated = positions >= prompt_lens[:, None]
    mask = visible(rule, positions[:, :, None], keys[:, None, :], generated[:, :, None])  # (n, q, k)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=mask[:, None], scale=scaling,
                                         enable_gqa=query.shape[2] != key.shape[2])
    return out.transpose(1, 2)

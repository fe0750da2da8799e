"""Paged-cache cases shared by the CPU and GPU tests of ``swaa.paged.paged_attention``: a batch of requests (some
prefilling a prompt or a chunk of it, some decoding, some recomputing prompt and answer after a preemption), their
keys and values scattered over shuffled cache blocks, and the float64 rule of tests/reference.py per request."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from reference import attention, sees

from swaa.rules import LayerRule


@dataclass(frozen=True)
class Request:
    """A request with ``seq_len`` tokens so far, the last ``new`` of them in this batch; positions from
    ``prompt_len`` on are generated."""

    seq_len: int
    new: int
    prompt_len: int


@dataclass(frozen=True)
class PagedCase:
    requests: tuple[Request, ...]
    rule: LayerRule
    block_size: int = 16
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    run: int = 1  # the cache's blocks lie shuffled in runs of this many consecutive blocks (1: each anywhere)
    descending: bool = False  # requests take the blocks in descending order (a used vLLM engine's free list)

    def __str__(self):
        rule = self.rule
        rule = "full" if rule.is_full else f"w{rule.window}s{rule.sink}{'d' if rule.fa_decode else ''}"
        run = (f"-r{self.run}" if self.run != 1 else "") + ("-desc" if self.descending else "")
        return f"{rule}-b{self.block_size}{run}-" + "_".join(f"{r.seq_len}n{r.new}p{r.prompt_len}" for r in self.requests)


def make_inputs(case: PagedCase, device="cpu", dtype=torch.float32, seed=0):
    """(kwargs for ``paged_attention`` but rule and scaling, the float64 rule's output (tokens, heads, d), plain
    dense attention's output at ``dtype`` over the same inputs: the tolerance rule's baseline)."""
    generator = torch.Generator().manual_seed(seed)
    per_request = [-(-r.seq_len // case.block_size) for r in case.requests]
    num_blocks = sum(per_request) + 3  # a few blocks no request owns
    runs = torch.arange(num_blocks).split(case.run)  # requests take the blocks in this order, run after run
    order = torch.cat([runs[index] for index in torch.randperm(len(runs), generator=generator)])
    order = order.flip(0) if case.descending else order
    key_cache = torch.randn(num_blocks, case.kv_heads, case.block_size, case.head_dim, generator=generator)
    value_cache = torch.randn(num_blocks, case.kv_heads, case.block_size, case.head_dim, generator=generator)
    block_table = torch.zeros(len(case.requests), max(per_request) + 1, dtype=torch.int32)
    queries, expected, plain, starts, used = [], [], [], [0], 0
    scaling = case.head_dim**-0.5
    for index, request in enumerate(case.requests):
        blocks = order[used : used + per_request[index]]
        used += per_request[index]
        block_table[index, : len(blocks)] = blocks.int()
        token = torch.arange(request.seq_len)
        keys = key_cache[blocks[token // case.block_size], :, token % case.block_size]  # (seq, kv_heads, d)
        values = value_cache[blocks[token // case.block_size], :, token % case.block_size]
        query = torch.randn(request.new, case.heads, case.head_dim, generator=generator)
        first = request.seq_len - request.new
        rule = case.rule
        mask = torch.tensor([[sees(i, j, generated=i >= request.prompt_len, full=rule.is_full, window=rule.window,
                                   sink=rule.sink, fa_decode=rule.fa_decode) for j in range(request.seq_len)]
                             for i in range(first, request.seq_len)])
        query = query.to(dtype)  # the inputs at ``dtype``, exactly as the function reads them
        keys, values = keys.to(dtype), values.to(dtype)
        for results, precision in ((expected, torch.float64), (plain, dtype)):
            out, _ = attention(query.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                               mask[None], scaling, dtype=precision)
            results.append(out[0].transpose(0, 1).double())
        queries.append(query)
        starts.append(starts[-1] + request.new)
    inputs = dict(query=torch.cat(queries).to(device, dtype), key_cache=key_cache.to(device, dtype),
                  value_cache=value_cache.to(device, dtype), block_table=block_table.to(device),
                  query_starts=starts, seq_lens=[r.seq_len for r in case.requests],
                  prompt_lens=[r.prompt_len for r in case.requests])
    return inputs, torch.cat(expected), torch.cat(plain)


def _grid() -> list[PagedCase]:
    mixed = (Request(70, 70, 70), Request(45, 1, 30), Request(100, 37, 100), Request(90, 1, 90), Request(61, 20, 50))
    rules = [LayerRule(8, 2, True), LayerRule(8, 2, False), LayerRule(5, 0, True), LayerRule(300, 4, True),
             LayerRule(1, 3, False), LayerRule(None)]
    cases = [PagedCase(mixed, rule, block_size) for rule in rules for block_size in (16, 32, 64)]
    decode_only = (Request(33, 1, 20), Request(200, 1, 200), Request(9, 1, 9))
    cases += [PagedCase(decode_only, LayerRule(16, 4, fa)) for fa in (True, False)]
    cases.append(PagedCase((Request(5, 5, 5),), LayerRule(16, 8, True), heads=4, kv_heads=4))  # all inside the sinks
    # decode steps that see every key, read in place: block tables in shuffled blocks (many runs: one copy), in runs
    # of 3 consecutive blocks (partly contiguous), wholly consecutive (a fresh engine's); last blocks partly written,
    # full or the only block; among prompt chunks
    long_decodes = (Request(200, 1, 150), Request(256, 1, 100), Request(9, 1, 5), Request(70, 70, 70),
                    Request(61, 20, 50), Request(300, 1, 300))
    cases += [PagedCase(long_decodes, rule, block_size, run=run) for rule in (LayerRule(16, 4, True), LayerRule(None))
              for block_size in (16, 32) for run in (1, 3, 1000)]
    cases.append(PagedCase(long_decodes, LayerRule(16, 4, True), heads=8, kv_heads=1, run=1000))
    cases += [PagedCase(long_decodes, rule, run=1000, descending=True) for rule in (LayerRule(16, 4, True),
                                                                                      LayerRule(None))]
    return cases


CASES = _grid()

"""Time ``swaa.paged.paged_attention`` (one SWA layer of a serving engine's batch, read from a paged cache) on CUDA
against PyTorch's full-attention kernel and swaa's own FlexAttention prefill, at 32k-128k tokens.

    python benchmarks/paged_bench.py [--lengths 32768 65536 131072] [--out DIR]

bf16, 32 query / 8 KV heads, head_dim 128, block size 16 (cache blocks shuffled), window 2048, sink 100. Rows:
- prefill of one prompt of L tokens: ``sdpa full`` (``scaled_dot_product_attention(is_causal=True)`` on contiguous
  q/k/v: full attention's cost), ``flex swa`` (swaa's FlexAttention backend, contiguous), ``paged swa`` and
  ``paged full`` (this function, an SWA layer and a full layer);
- one decode step of 16 requests with L tokens each: ``sdpa full`` (one query over contiguous keys), ``paged swa``
  (SWA decode: sinks + window), ``paged fa-decode`` (every key, read through the block table).
Prints a table (median of 5 after 2 warm-ups, milliseconds) and writes paged_bench.json to --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from swaa.backends import flex
from swaa.paged import paged_attention
from swaa.plan import plan_forward
from swaa.rules import LayerRule

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
SWA = LayerRule(window=2048, sink=100, fa_decode=True)


def timed(call) -> float:
    times = []
    for run in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        if run >= 2:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def paged_cache(requests: int, length: int, dtype):
    """Random keys/values of ``requests`` requests of ``length`` tokens in shuffled blocks; and the same keys
    contiguous (requests, kv_heads, length, d) for the unpaged rows."""
    per = -(-length // BLOCK)
    key_cache = torch.randn(requests * per, KV_HEADS, BLOCK, HEAD_DIM, device="cuda", dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    block_table = torch.randperm(requests * per, device="cuda").int().reshape(requests, per)
    token = torch.arange(length, device="cuda")
    blocks = block_table[:, token // BLOCK].long()
    key = key_cache[blocks, :, token % BLOCK].transpose(1, 2).contiguous()  # (requests, kv_heads, length, d)
    value = value_cache[blocks, :, token % BLOCK].transpose(1, 2).contiguous()
    return key_cache, value_cache, block_table, key, value


def prefill_rows(length: int, dtype) -> dict[str, float]:
    key_cache, value_cache, block_table, key, value = paged_cache(1, length, dtype)
    query = torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", dtype=dtype)
    scaling = HEAD_DIM**-0.5
    plan = plan_forward(batch_size=1, q_len=length, past_len=0, device=query.device, generate=length)
    paged = dict(query=query[0].transpose(0, 1).contiguous(), key_cache=key_cache, value_cache=value_cache,
                 block_table=block_table, query_starts=[0, length], seq_lens=[length], prompt_lens=[length],
                 scaling=scaling)
    return {
        "sdpa full": timed(lambda: F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                                  enable_gqa=True)),
        "flex swa": timed(lambda: flex.attend(query, key, value, rule=SWA, plan=plan, scaling=scaling)),
        "paged swa": timed(lambda: paged_attention(**paged, rule=SWA)),
        "paged full": timed(lambda: paged_attention(**paged, rule=LayerRule(None))),
    }


def decode_rows(length: int, dtype, requests: int = 16) -> dict[str, float]:
    key_cache, value_cache, block_table, key, value = paged_cache(requests, length, dtype)
    query = torch.randn(requests, HEADS, 1, HEAD_DIM, device="cuda", dtype=dtype)
    scaling = HEAD_DIM**-0.5
    paged = dict(query=query[:, :, 0].contiguous(), key_cache=key_cache, value_cache=value_cache,
                 block_table=block_table, query_starts=list(range(requests + 1)), seq_lens=[length] * requests,
                 prompt_lens=[length - 1] * requests, scaling=scaling)
    return {
        "sdpa full": timed(lambda: F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)),
        "paged swa": timed(lambda: paged_attention(**paged, rule=LayerRule(SWA.window, SWA.sink, fa_decode=False))),
        "paged fa-decode": timed(lambda: paged_attention(**paged, rule=SWA)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("paged_bench.py times CUDA kernels: no CUDA device here")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
               "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK,
               "window": SWA.window, "sink": SWA.sink, "prefill_ms": {}, "decode_16_requests_ms": {}}
    for length in args.lengths:
        results["prefill_ms"][length] = prefill_rows(length, torch.bfloat16)
        results["decode_16_requests_ms"][length] = decode_rows(length, torch.bfloat16)
        torch.cuda.empty_cache()
    print(f"{results['device']}, torch {results['torch']}, bf16, window {SWA.window}, sink {SWA.sink}, ms (median)")
    for section in ("prefill_ms", "decode_16_requests_ms"):
        rows = results[section]
        names = list(next(iter(rows.values())))
        print(f"\n{section:<24}" + "".join(f"{name:>16}" for name in names))
        for length, row in rows.items():
            print(f"{length:<24}" + "".join(f"{row[name]:>16.2f}" for name in names))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "paged_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""KV cache bytes and peak GPU memory of SWAA configs against full attention, and the longest prompt that fits.

    python benchmarks/cache_memory.py results/cache_memory.json            # CUDA: Qwen3-4B-shaped, bf16
    python benchmarks/cache_memory.py /tmp/smoke.json --smoke              # CPU: tiny model, tiny lengths

A Qwen3-4B-shaped model (36 layers, hidden 2560, intermediate 9728, 32/8 heads, head_dim 128) with random
weights, in bf16, batch 1. For each config and prompt length it runs ``generate(max_new_tokens=2)`` with
chunked prefill and measures: the KV cache's bytes after generation (keys, values and swaa's position
tensors, summed over layers), the peak memory allocated during generation (``torch.cuda.max_memory_allocated``,
total and above the weights) and the wall time. Then it finds the longest prompt that fits for each config:
doubling from the first length until out of memory (or ``--max-len``), then bisecting to ``--resolution``
tokens. Configs: full attention (unpatched, sdpa); every layer SWA (no FA decode: bounded cache); odd layers
full without FA decode (half the layers bounded); FA decode on every SWA layer (nothing bounded). The JSON
goes to the path given; a markdown table is printed last. torch and transformers are imported after the
arguments are read: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch loads after the arguments are read
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import swaa  # noqa: E402
from swaa.tables import markdown_table  # noqa: E402

QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000, tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
)


def swaa_configs(window: int, sink: int) -> dict[str, dict | None]:
    """Name -> patch_model fields (None: full attention, unpatched)."""
    return {
        "full attention": None,
        "SWA every layer": dict(window=window, sink=sink, fa_decode=False),
        "interleave 2, no FA decode": dict(window=window, sink=sink, interleave=2, fa_decode=False),
        "FA decode": dict(window=window, sink=sink, fa_decode=True),
    }


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, max_len: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**shape, max_position_embeddings=max(max_len * 2, 4096), pad_token_id=0,
                         eos_token_id=None, bos_token_id=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.set_attn_implementation("sdpa")
    return model.eval()


def cache_bytes(cache) -> int:
    import torch

    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "positions"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def measure(model, fields, length: int, chunk: int | None, device: torch.device, weights: int) -> dict:
    """One generate of a ``length``-token prompt; raises torch.OutOfMemoryError when it does not fit."""
    import torch

    if fields is None:
        if swaa.is_patched(model):
            swaa.unpatch_model(model)
    else:
        swaa.patch_model(model, **fields)
    ids = torch.randint(1, model.config.vocab_size, (1, length), device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                             do_sample=False, prefill_chunk_size=chunk, return_dict_in_generate=True)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    cache = out.past_key_values
    result = dict(
        prompt_len=length, kv_bytes=cache_bytes(cache), seconds=round(seconds, 3),
        stored_tokens_per_layer=[0 if layer.keys is None else int(layer.keys.shape[-2]) for layer in cache.layers],
        peak_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
    )
    result["peak_above_weights_bytes"] = None if result["peak_bytes"] is None else result["peak_bytes"] - weights
    del out, cache, ids
    free(device)
    return result


def free(device):
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def longest_that_fits(fits, start: int, max_len: int, resolution: int) -> int:
    """Largest length (a multiple of ``resolution``, <= ``max_len``) for which ``fits`` holds: doubling, then
    bisecting. 0 when ``start`` does not fit."""
    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None:
        if good >= max_len:
            return max_len
        trial = min(good * 2, max_len)
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad - good > resolution:
        middle = (good + bad) // 2 // resolution * resolution
        if middle <= good:
            break
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def mib(value) -> str:
    return f"{value / 2**20:.1f}" if value >= 2**20 else f"{value / 2**20:.4f}"


def table(results: list[dict], longest: dict[str, int]) -> str:
    header = ["config", "prompt", "KV cache MiB", "peak GiB", "peak above weights GiB", "time s"]
    measured = markdown_table(header, [table_row(row) for row in results])
    return measured + "\n\n" + markdown_table(["config", "longest prompt that fits"], longest.items())


def table_row(row: dict) -> list:
    """A result's cells in the printed table."""
    if row.get("oom"):
        return [row["config"], row["prompt_len"], "out of memory", None, None, None]
    return [row["config"], row["prompt_len"], mib(row["kv_bytes"]), gib(row["peak_bytes"]),
            gib(row["peak_above_weights_bytes"]), str(row["seconds"])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="where to write the JSON results")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and lengths: checks the script runs")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--sink", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=4096, help="prefill_chunk_size (0: one-shot prefill)")
    parser.add_argument("--max-len", type=int, default=1 << 20, help="stop the longest-prompt search here")
    parser.add_argument("--resolution", type=int, default=8192, help="bisect the longest prompt to this many tokens")
    parser.add_argument("--no-search", action="store_true", help="skip the longest-prompt search")
    parser.add_argument("--configs", nargs="+", help="only these config names")
    args = parser.parse_args(argv)
    import torch

    if args.smoke:
        device, dtype, shape = torch.device("cpu"), torch.float32, TINY
        args.lengths, args.window, args.sink, args.chunk = [32, 64], 8, 2, 16
        args.max_len, args.resolution = 128, 16
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA device (or --smoke)", file=sys.stderr)
            return 2
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, QWEN3_4B
    chunk = args.chunk or None
    model = build_model(shape, device, dtype, max(args.max_len, *args.lengths))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    configs = swaa_configs(args.window, args.sink)
    if args.configs:
        configs = {name: configs[name] for name in args.configs}

    results, longest = [], {}
    smoke_budget = None
    for name, fields in configs.items():
        for length in args.lengths:
            try:
                row = measure(model, fields, length, chunk, device, weights)
            except torch.OutOfMemoryError:
                free(device)
                row = dict(prompt_len=length, oom=True)
            results.append(dict(config=name, fields=fields, **row))
            print(json.dumps(results[-1]), flush=True)
    if not args.no_search:
        if args.smoke:  # no OOM on the CPU: pretend the KV cache budget is full attention's at the first length
            smoke_budget = next(r["kv_bytes"] for r in results if r["config"] == "full attention")
        for name, fields in configs.items():
            def fits(length, fields=fields):
                try:
                    row = measure(model, fields, length, chunk, device, weights)
                except torch.OutOfMemoryError:
                    free(device)
                    return False
                return smoke_budget is None or row["kv_bytes"] <= smoke_budget

            longest[name] = longest_that_fits(fits, args.lengths[0], args.max_len, args.resolution)
            print(f"{name}: longest prompt that fits {longest[name]}", flush=True)

    report = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        model=shape, dtype=str(dtype), window=args.window, sink=args.sink, prefill_chunk_size=chunk,
        weights_bytes=weights, results=results, longest_prompt=longest, max_len=args.max_len,
        resolution=args.resolution,
    )
    with open(args.output, "w") as file:
        json.dump(report, file, indent=2)
    print(table(results, longest))
    return 0


if __name__ == "__main__":
    sys.exit(main())

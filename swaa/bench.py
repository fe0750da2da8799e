"""Speed and memory of SWAA against full attention, in one run: ``python -m swaa.bench``.

A Qwen3-4B-shaped model with random weights built from its config (no download), bf16, batch 1. Two
tables: the attention kernels alone (time, effective TFLOP/s counted over the pairs the mask keeps, decode
bandwidth), and the whole model (time to first token, time per output token at that context, peak GPU
memory) for full attention and four SWAA configs. Prints markdown last, writes JSON and a PNG plot.
``--smoke`` runs a tiny model on the CPU in seconds, to keep this script working.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch
import transformers
from transformers import Qwen3Config, Qwen3ForCausalLM

import swaa
from swaa.backends import flash, flex, sdpa
from swaa.layout import Layout
from swaa.rules import LayerRule

WINDOW, SINK = 2048, 100
SWAA_CONFIGS = {
    "SWA (no FA decode)": dict(fa_decode=False),
    "FA decode": dict(),
    "FA decode + interleave 2": dict(interleave=2),
    "FA decode + interleave 4": dict(interleave=4),
}
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, tie_word_embeddings=True,
)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def visible_pairs(length: int, window: int | None, sink: int) -> int:
    """(query, key) pairs a causal prompt of ``length`` tokens keeps under window + sinks (None: full)."""
    if window is None:
        return length * (length + 1) // 2
    near = sum(min(i + 1, window) for i in range(min(length, window))) + max(length - window, 0) * window
    far = sum(max(0, min(sink, i - window + 1)) for i in range(window, length))
    return near + far


def cuda_seconds(fn, repeat: int = 5, calls: int = 1) -> float:
    """Median seconds of one call of ``fn``, over ``repeat`` timings of ``calls`` back-to-back calls (which
    lets the CPU run ahead of short kernels, as across the layers of a model), after a warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def kernel_rows(lengths: list[int], heads: int = 32, kv_heads: int = 8, head_dim: int = 128) -> list[dict]:
    """Attention alone, one layer: prefill kernels and decode against a cache of each length."""
    rows = []
    copy_source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    copy_bandwidth = 2 * copy_source.numel() / cuda_seconds(lambda: copy_source.clone())
    del copy_source
    for length in lengths:
        q = torch.randn(1, heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kv_heads, length, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        layout = Layout.build(batch_size=1, q_len=length, past_len=0, device=torch.device("cuda"))
        scaling = head_dim**-0.5
        cases = {
            "full causal, sdpa": (sdpa.attend, LayerRule(None)),
            f"window {WINDOW}, flex": (flex.attend, LayerRule(WINDOW)),
            f"window {WINDOW} + {SINK} sinks, flex": (flex.attend, LayerRule(WINDOW, SINK)),
            f"window {WINDOW}, flash": (flash.attend, LayerRule(WINDOW)),
            f"window {WINDOW} + {SINK} sinks, flash": (flash.attend, LayerRule(WINDOW, SINK)),
        }
        for name, (attend, rule) in cases.items():
            seconds = cuda_seconds(lambda: attend(q, k, v, rule=rule, layout=layout, scaling=scaling))
            flops = 4 * head_dim * heads * visible_pairs(length, rule.window, rule.sink)
            rows.append(dict(length=length, kernel=name, ms=seconds * 1e3, tflops=flops / seconds / 1e12))
        decode_q = q[:, :, -1:]
        decode = Layout.build(batch_size=1, q_len=1, past_len=length - 1, device=torch.device("cuda"), prompt_end=length - 1)
        cache_bytes = 2 * k.numel() * k.element_size()
        for name, rule in {"decode, FA-decode layer": LayerRule(WINDOW, SINK, True),
                           "decode, SWA layer": LayerRule(WINDOW, SINK, False)}.items():
            seconds = cuda_seconds(lambda: sdpa.attend(decode_q, k, v, rule=rule, layout=decode, scaling=scaling), 5, 36)
            read = cache_bytes if rule.fa_decode else cache_bytes * min(1.0, (WINDOW + SINK) / length)
            rows.append(dict(length=length, kernel=name, ms=seconds * 1e3, us=seconds * 1e6,
                             read_floor_us=read / copy_bandwidth * 1e6, copy_tb_s=copy_bandwidth / 1e12))
        del q, k, v
    return rows


def _generate_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    if prompt.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _decode_seconds(model, prompt: torch.Tensor, steps: int = 16) -> float:
    """Median seconds of one generated token at the prompt's context: a forward of one token on the cache."""
    with torch.no_grad():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            if prompt.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if prompt.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def model_rows(model, lengths: list[int], configs: dict) -> list[dict]:
    """Time to first token (``generate`` of one token, best of two after a warm-up), time per output token
    at that context, peak memory, per config and length."""
    rows = []
    device = model.device
    for name, fields in configs.items():
        if fields is not None:
            swaa.patch_model(model, window=WINDOW, sink=SINK, **fields)
        for length in lengths:
            prompt = torch.randint(1, model.config.vocab_size, (1, length), device=device)
            _generate_seconds(model, prompt, 2)  # warm-up: compilation, allocator
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            first = min(_generate_seconds(model, prompt, 1) for _ in range(2))
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            per_token = _decode_seconds(model, prompt)
            rows.append(dict(config=name, length=length, ttft_s=first, tpot_ms=per_token * 1e3, peak_gib=peak,
                             compiled_graphs=_compiled_graphs()))
            print(f"  {name:28s} {length:>7d}: TTFT {first:.3f} s, TPOT {rows[-1]['tpot_ms']:.1f} ms, peak {peak:.1f} GiB",
                  flush=True)
    if hasattr(model, "_swaa_patch"):
        swaa.unpatch_model(model)
    return rows


def _compiled_graphs() -> int:
    """Graphs torch.compile has built so far: flat across a config's lengths means no recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row.get(c):.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedups(rows: list[dict]) -> list[dict]:
    """Each SWAA config's TTFT and TPOT against full attention (sdpa) at the same length, same run."""
    full = {r["length"]: r for r in rows if r["config"] == "full attention (sdpa)"}
    return [dict(config=r["config"], length=r["length"], ttft_speedup=full[r["length"]]["ttft_s"] / r["ttft_s"],
                 tpot_speedup=full[r["length"]]["tpot_ms"] / r["tpot_ms"],
                 memory_ratio=r["peak_gib"] / full[r["length"]]["peak_gib"])
            for r in rows if r["length"] in full and r["config"] != "full attention (sdpa)"]


def plot(ratios: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for config in dict.fromkeys(r["config"] for r in ratios):
        points = [r for r in ratios if r["config"] == config]
        axis.plot([p["length"] for p in points], [p["ttft_speedup"] for p in points], marker="o", label=config)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("prompt tokens")
    axis.set_ylabel("time-to-first-token speed-up vs full attention")
    axis.axhline(1, color="gray", linewidth=0.8)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--out", default="bench.json", help="JSON results")
    parser.add_argument("--plot", default=None, help="PNG of the speed-up against context length")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, for tests")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    torch.manual_seed(0)
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if not args.skip_model:
        with torch.device(device):
            model = Qwen3ForCausalLM(Qwen3Config(**(TINY if args.smoke else QWEN3_4B))).to(dtype).eval()
        model.set_attn_implementation("sdpa")
    configs = {"full attention (sdpa)": None, **SWAA_CONFIGS}
    lengths = [64, 160] if args.smoke else args.lengths
    result = dict(
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        torch=torch.__version__, transformers=transformers.__version__, window=WINDOW, sink=SINK,
        kernels=kernel_rows(lengths) if cuda and not args.skip_kernels else [],
    )
    result["model"] = [] if args.skip_model else model_rows(model, lengths, configs)
    result["speedups"] = speedups(result["model"])
    with open(args.out, "w") as file:
        json.dump(result, file, indent=1)
    if args.plot:
        plot(result["speedups"], args.plot)
    print(f"\n{result['gpu']}, torch {result['torch']}, transformers {result['transformers']}, {result['date']}")
    if result["kernels"]:
        print(markdown([r for r in result["kernels"] if "tflops" in r], ["length", "kernel", "ms", "tflops"]))
        print(markdown([r for r in result["kernels"] if "us" in r], ["length", "kernel", "us", "read_floor_us"]))
    if result["model"]:
        print(markdown(result["model"], ["config", "length", "ttft_s", "tpot_ms", "peak_gib", "compiled_graphs"]))
        print(markdown(result["speedups"], ["config", "length", "ttft_speedup", "tpot_speedup", "memory_ratio"]))
    return result


if __name__ == "__main__":
    main()

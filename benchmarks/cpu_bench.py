"""What swaa costs and saves on a CPU: time to first token, peak memory and decode time per token of a small
random Qwen3 (8 layers, hidden 256, 4/2 heads of 64, float32), unpatched against two swaa configs.

    python benchmarks/cpu_bench.py --lengths 8192 16384 32768 --repeats 2 --json cpu_bench.json

Rows: ``unpatched`` (transformers' sdpa, its best CPU path), ``recommended`` (window 2048, sink 100,
interleave 2, FA decode), ``every_layer`` (window 2048, sink 100 on every layer, no FA decode: a bounded
cache). Each measurement is ``generate`` in a fresh process, with the rows of one length run one after the
other and the repeats interleaved, so each ratio compares runs made close together on a machine whose speed
drifts; the table gives the best time of each row and the median of the per-repeat ratios. Peak memory comes
from one more process per row and length (a prompt and one token), the whole process's peak RSS (python,
torch and the model included) with glibc returning every freed buffer of 128 KiB or more to the system at once
(``MALLOC_MMAP_THRESHOLD_``), so that it follows the memory in use rather than the allocator's reuse of it
(+-30 MiB from run to run otherwise); the timed runs keep the default allocator, whose reuse spares page faults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROWS = {
    "unpatched": None,
    "recommended": dict(window=2048, sink=100, interleave=2),
    "every_layer": dict(window=2048, sink=100, fa_decode=False),
}
SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=131072, tie_word_embeddings=False)


def measure(row: str, length: int, decode_tokens: int, backend: str) -> dict:
    """One generate of ``decode_tokens + 1`` tokens after a ``length``-token prompt, in this process."""
    import resource

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.generation.streamers import BaseStreamer

    import swaa

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**SHAPE, attn_implementation="sdpa")).eval()
    if ROWS[row] is not None:
        swaa.patch_model(model, **ROWS[row], backend=backend)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, length), generator=torch.Generator().manual_seed(1))

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=decode_tokens + 1,
                       min_new_tokens=decode_tokens + 1, do_sample=False, streamer=clock, pad_token_id=0)
    tokens = clock.times[1:]  # the first put is the prompt
    return dict(row=row, length=length, backend=backend, ttft_s=tokens[0] - start,
                decode_ms=(tokens[-1] - tokens[0]) / (len(tokens) - 1) * 1e3 if len(tokens) > 1 else None,
                peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_before_mib=rss_before,
                threads=torch.get_num_threads())


def run_one(row: str, length: int, decode_tokens: int, backend: str, memory: bool = False) -> dict:
    """``measure`` in a fresh process; ``memory``: with the allocator set for a peak memory figure."""
    command = [sys.executable, os.path.abspath(__file__), "--one", row, str(length), str(decode_tokens), backend]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072") if memory else None
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"{row} at {length} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict], memory: list[dict], rows: list[str]) -> str:
    """Markdown: per length and row, best TTFT, peak memory, best decode time per token, and the median of
    the per-repeat ratios against unpatched (speed-up: unpatched time / row time; memory: row / unpatched)."""
    lines = ["| prompt | row | TTFT s | TTFT speed-up | peak MiB | memory vs unpatched | decode ms/token |"
             " decode speed-up |", "|---|---|---|---|---|---|---|---|"]
    for length in sorted({r["length"] for r in results}):
        at = [r for r in results if r["length"] == length]
        for row in rows:
            mine = [r for r in at if r["row"] == row]
            if not mine:
                continue
            base = [r for r in at if r["row"] == "unpatched"]
            pairs = list(zip([r for r in base], mine))  # repeat by repeat

            def ratio(key, invert=False):
                if not pairs or row == "unpatched":
                    return "1.00x" if row == "unpatched" else "-"
                values = [(b[key] / m[key]) if not invert else (m[key] / b[key]) for b, m in pairs]
                return f"{statistics.median(values):.2f}x"

            peak = [r for r in memory if r["length"] == length and r["row"] == row]
            base_peak = [r for r in memory if r["length"] == length and r["row"] == "unpatched"]
            peak_text = f"{peak[0]['peak_mib']:.0f} | {peak[0]['peak_mib'] / base_peak[0]['peak_mib']:.3f}x" \
                if peak and base_peak else "- | -"
            lines.append(
                f"| {length} | {row} | {min(r['ttft_s'] for r in mine):.2f} | {ratio('ttft_s')} | {peak_text} |"
                f" {min(r['decode_ms'] for r in mine):.1f} | {ratio('decode_ms')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds over every row and length")
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens timed after the first")
    parser.add_argument("--backend", default="auto", help="swaa's backend for the patched rows")
    parser.add_argument("--json", default=None, help="write every measurement here")
    parser.add_argument("--skip-memory", action="store_true", help="no peak memory pass")
    parser.add_argument("--one", nargs=4, metavar=("ROW", "LENGTH", "DECODE", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        row, length, decode, backend = args.one
        print(json.dumps(measure(row, int(length), int(decode), backend)))
        return 0
    rows = ["unpatched", *[r for r in args.rows if r != "unpatched"]]
    results = []
    for repeat in range(args.repeats):
        for length in args.lengths:
            for row in rows:
                results.append(dict(run_one(row, length, args.decode_tokens, args.backend), repeat=repeat))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    memory = []
    if not args.skip_memory:
        for length in args.lengths:
            for row in rows:
                memory.append(run_one(row, length, 0, args.backend, memory=True))
                print(json.dumps(memory[-1]), file=sys.stderr, flush=True)
    print(table(results, memory, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=SHAPE, rows=ROWS, timed=results, memory=memory, cpus=os.cpu_count(),
                           load_average=os.getloadavg()), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""swaa's vLLM plugin against plain vLLM on the same weights (vLLM's CPU build): prefill and decode throughput.

    python benchmarks/vllm_bench.py [--quick] [--shape small|8b-heads] [--out vllm_bench.json]

A 4-layer Llama, hidden 256 (4 heads of 64, 2 KV heads; ``--shape 8b-heads``: hidden 1024 with a Llama-8B's 32
heads and 8 KV heads of 128), random weights, float32, eager; prefix caching off. Rows: 8
prompts of 2k tokens, and one prompt of 16k tokens; paths: plain vLLM (the checkpoint without config.swaa), the
recommended config scaled down (window 256, sink 4, interleave 2, FA decode) and every layer SWA (window 256, sink
4, no FA decode: every query reads 260 keys at most). Prefill: prompt tokens per second of a generate of one token;
decode: generated tokens per second of the engine steps after every prompt has its first token (a generate of
``--new`` tokens, step by step; the faster of two). Each path and row runs in a process of its own. Prints a
table and writes JSON. Run it in the vLLM environment (README, "Serving with vLLM"); ``--quick`` runs 2 prompts of
1k and one of 4k, for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHS = {"plain vLLM": None, "recommended": dict(window=256, sink=4, interleave=2),
         "every layer SWA": dict(window=256, sink=4, full_attention_layers=[], fa_decode=False)}


SHAPES = {  # --shape: the default, and attention heads of a Llama-8B-class model (32/8 heads of 128) on a small body
    "small": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "8b-heads": dict(hidden_size=1024, intermediate_size=2048, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128),
}


def build(folder: Path, swaa_config: dict | None, shape: str = "small") -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import swaa

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, num_hidden_layers=4, **SHAPES[shape],
                                         max_position_embeddings=32768, bos_token_id=None, eos_token_id=None,
                                         pad_token_id=0, tie_word_embeddings=False))
    if swaa_config is not None:
        swaa.patch_model(model, **swaa_config)
    model.save_pretrained(folder)
    return str(folder)


def run_one(spec: dict) -> dict:
    """In this process: one engine, one row."""
    from vllm import LLM, SamplingParams

    prompts, length, new = spec["prompts"], spec["length"], spec["new"]
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              max_model_len=length + new + 8, enable_prefix_caching=False, seed=0)

    def batch(offset: int) -> list[dict]:
        return [{"prompt_token_ids": [(i * 7 + p * 13 + offset) % 500 + 1 for i in range(length)]}
                for p in range(prompts)]

    def params(tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)

    def prefill_s() -> float:
        start = time.perf_counter()
        llm.generate(batch(0), params(1), use_tqdm=False)
        return time.perf_counter() - start

    def decode_tok_s() -> float:
        """Tokens per second of the engine steps after every request has its first token."""
        engine = llm.llm_engine
        for index, prompt in enumerate(batch(0)):
            engine.add_request(f"decode-{index}", prompt, params(new))
        counts, start, first = {}, None, 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                counts[output.request_id] = len(output.outputs[0].token_ids)
            if start is None and len(counts) == prompts and min(counts.values()) >= 1:
                start, first = time.perf_counter(), sum(counts.values())
        return (sum(counts.values()) - first) / (time.perf_counter() - start)

    llm.generate(batch(99), params(2), use_tqdm=False)  # warm-up
    first = min(prefill_s() for _ in range(2))  # the same prompts each time: prefix caching is off
    decode = max(decode_tok_s() for _ in range(2))
    return dict(prefill_tok_s=prompts * length / first, decode_tok_s=decode, prefill_s=first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new", type=int, default=65, help="tokens generated per prompt for the decode figure")
    parser.add_argument("--rows", nargs="+", default=None, help="rows as PROMPTSxLENGTH, e.g. 8x2048 1x16384")
    parser.add_argument("--shape", choices=list(SHAPES), default="small", help="the model's width and heads")
    parser.add_argument("--out", default="vllm_bench.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("vllm_bench result: " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    rows = args.rows or (["2x1024", "1x4096"] if args.quick else ["8x2048", "1x16384"])
    results = {"rows": {}, "new": args.new, "threads": os.cpu_count(), "shape": SHAPES[args.shape]}
    with tempfile.TemporaryDirectory() as folder:
        models = {name: build(Path(folder) / str(index), config, args.shape) for index, (name, config) in enumerate(PATHS.items())}
        for row in rows:
            prompts, length = (int(x) for x in row.split("x"))
            for name, model in models.items():
                spec = dict(model=model, prompts=prompts, length=length, new=args.new)
                done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                      text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
                if done.returncode != 0:
                    raise SystemExit(f"{name} {row} failed:\n{done.stderr[-3000:]}")
                line = next(x for x in done.stdout.splitlines() if x.startswith("vllm_bench result: "))
                results["rows"].setdefault(row, {})[name] = json.loads(line.removeprefix("vllm_bench result: "))
                print(row, name, results["rows"][row][name], flush=True)
    print(f"\n{'row':<10}{'path':<18}{'prefill tok/s':>15}{'x plain':>9}{'decode tok/s':>15}{'x plain':>9}")
    for row, paths in results["rows"].items():
        plain = paths["plain vLLM"]
        for name, figures in paths.items():
            print(f"{row:<10}{name:<18}{figures['prefill_tok_s']:>15.0f}"
                  f"{figures['prefill_tok_s'] / plain['prefill_tok_s']:>9.2f}{figures['decode_tok_s']:>15.1f}"
                  f"{figures['decode_tok_s'] / plain['decode_tok_s']:>9.2f}")
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""Training speed and memory of SWA-aware LoRA fine-tuning, per attention backend, against full attention.

One optimizer step = forward + backward + AdamW on the LoRA weights (q/k/v, r=16, rsLoRA: the paper's
recipe) over one sequence of ``--seq-lens`` tokens whose last ``--answer-tokens`` are the answer (labels;
the rest is prompt, -100). Default model: Qwen3-4B-shaped with random weights, bf16, gradient
checkpointing on. Prints a markdown table last and writes the rows as JSON.

    python benchmarks/train_speed.py --json train_speed.json                 # one GPU, every backend
    python benchmarks/train_speed.py --backends reference flash --seq-lens 4096 8192
    python benchmarks/train_speed.py --smoke --json /tmp/speed.json          # tiny model on the CPU (test)

Note: the LM head's float32 logits over all tokens (vocab 151936) are a large, equal share of the
memory in every row; the difference between rows is attention.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM

import swaa

QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
)
FULL = "full (sdpa)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few tokens: checks the script")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--answer-tokens", type=int, default=512)
    parser.add_argument("--backends", nargs="+", default=["reference", "flash", "flex"])
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--sink", type=int, default=100)
    parser.add_argument("--interleave", type=int, default=2, help="0: every layer SWA")
    parser.add_argument("--fa-decode", choices=["on", "off"], default="on")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--json", default="train_speed.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.answer_tokens, args.window, args.sink = [64], 8, 16, 2
        args.steps, args.warmup = 2, 1
    return args


def build_model(args, device, dtype):
    config = Qwen3Config(**(TINY if args.smoke else QWEN3_4B))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=16, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if not args.no_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def time_steps(model, args, seq_len, device):
    """Seconds per optimizer step (median of ``--steps``) and peak memory in bytes (None on the CPU)."""
    vocab = model.get_base_model().config.vocab_size
    generator = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(1, vocab, (1, seq_len), generator=generator).to(device)
    labels = ids.clone()
    labels[:, : seq_len - args.answer_tokens] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    del optimizer
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return sorted(times)[len(times) // 2], peak


def attentions(args):
    """(name, SWAAConfig or None for full attention) per row."""
    layers = dict(interleave=args.interleave) if args.interleave else {}
    rows = [(FULL, None)]
    for backend in args.backends:
        config = swaa.SWAAConfig(window=args.window, sink=args.sink, fa_decode=args.fa_decode == "on",
                                 backend=backend, **layers)
        rows.append((f"swaa {backend}", config))
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_model(args, device, dtype)
    rows = []
    for seq_len in args.seq_lens:
        baseline = None
        for name, config in attentions(args):
            row = dict(attention=name, seq_len=seq_len, answer_tokens=args.answer_tokens, status="ok")
            try:
                if config is None:
                    if swaa.is_patched(model):
                        swaa.unpatch_model(model)
                else:
                    swaa.patch_model(model, config)
                seconds, peak = time_steps(model, args, seq_len, device)
                row.update(step_s=seconds, tokens_per_s=seq_len / seconds,
                           peak_gib=None if peak is None else peak / 2**30)
                if config is None:
                    baseline = seconds
                row["speedup_vs_full"] = None if baseline is None else baseline / seconds
            except torch.OutOfMemoryError:
                row["status"] = "OOM"
            except (RuntimeError, NotImplementedError) as error:  # a backend this machine or build lacks
                row["status"] = f"skipped: {str(error).splitlines()[0][:100]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        dtype=str(dtype), model="tiny" if args.smoke else "Qwen3-4B-shaped, random weights",
        gradient_checkpointing=not args.no_gradient_checkpointing, window=args.window, sink=args.sink,
        interleave=args.interleave, fa_decode=args.fa_decode, lora="q/k/v r=16 rsLoRA alpha=32",
        torch=torch.__version__,
    )
    with open(args.json, "w") as file:
        json.dump(dict(meta=meta, rows=rows), file, indent=2)
    print(f"\n{meta['model']}, {meta['dtype']}, {meta['device']}; window {args.window}, sink {args.sink},"
          f" interleave {args.interleave}, FA decode {args.fa_decode}; one step = fwd + bwd + AdamW (LoRA)\n")
    print("| attention | tokens | step (s) | tokens/s | peak memory (GiB) | speed vs full |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if row["status"] != "ok":
            print(f"| {row['attention']} | {row['seq_len']} | {row['status']} | | | |")
            continue
        peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        speed = "" if row["speedup_vs_full"] is None else f"{row['speedup_vs_full']:.2f}x"
        print(f"| {row['attention']} | {row['seq_len']} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | {peak} | {speed} |")


if __name__ == "__main__":
    main()

"""Training speed and memory of SWA-aware LoRA fine-tuning, per attention backend, against full attention.

One optimizer step = forward + backward + AdamW on the LoRA weights (q/k/v, r=16, rsLoRA: the paper's
recipe) over one sequence of ``--seq-lens`` tokens whose last ``--answer-tokens`` are the answer (labels;
the rest is prompt, -100). Default model: Qwen3-4B-shaped with random weights, bf16, gradient
checkpointing on. Prints a markdown table last and writes the rows as JSON.

    python benchmarks/train_speed.py --json train_speed.json                 # one GPU, 4k to 32k tokens
    python benchmarks/train_speed.py --backends auto flash --seq-lens 16384 32768 --profile profile.txt
    python benchmarks/train_speed.py --smoke --json /tmp/speed.json          # tiny model on the CPU (test)

``--logits answer`` (default) runs the LM head and the loss on the answer tokens only, the only ones with
labels (the same loss and gradients), as trainers with a fused loss do; the answer's start reaches swaa as
``prompt_len``. ``--logits all`` computes float32 logits over every token as the HF Trainer does: 20 GB at
32k tokens (vocab 151936), an equal share of every row's time and memory that does not fit an 80 GB GPU at
32k. ``--profile FILE`` records one more step of every row with torch.profiler and writes its top kernels.
torch, transformers and peft are imported after the arguments are read: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import swaa
from swaa.tables import markdown_table

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
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--answer-tokens", type=int, default=512)
    parser.add_argument("--logits", choices=["answer", "all"], default="answer",
                        help="LM head and loss over the answer tokens only, or over every token (HF Trainer)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="swaa backends, one row each (default: auto flex flash; --smoke: reference)")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--sink", type=int, default=100)
    parser.add_argument("--interleave", type=int, default=2, help="0: every layer SWA")
    parser.add_argument("--fa-decode", choices=["on", "off"], default="on")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--json", default="train_speed.json")
    parser.add_argument("--profile", metavar="FILE", help="profile one more step per row; top kernels to FILE")
    parser.add_argument("--profile-rows", type=int, default=40, help="kernels listed per profiled step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.answer_tokens, args.window, args.sink = [64], 8, 16, 2
        args.steps, args.warmup = 2, 1
    args.backends = args.backends or (["reference"] if args.smoke else ["auto", "flex", "flash"])
    return args


def build_model(args, device, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

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


def step_inputs(args, seq_len: int, vocab: int, device) -> dict:
    """The forward's keyword arguments: one sequence of ``seq_len`` tokens, its last ``--answer-tokens`` the
    answer (the only tokens with labels)."""
    import torch

    generator = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(1, vocab, (1, seq_len), generator=generator).to(device)
    prompt = seq_len - args.answer_tokens
    labels = ids.clone()
    labels[:, :prompt] = -100
    if args.logits == "all":
        return dict(input_ids=ids, labels=labels, use_cache=False)
    keep = args.answer_tokens + 1  # the last prompt token predicts the first answer token
    return dict(input_ids=ids, labels=labels[:, -keep:], logits_to_keep=keep, prompt_len=prompt, use_cache=False)


def training_step(model, optimizer, inputs: dict) -> None:
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_steps(model, args, inputs: dict, device):
    """Seconds per optimizer step (median of ``--steps``), peak memory in bytes (None on the CPU) and, with
    ``--profile``, a table of the top kernels of one more step (None without)."""
    import torch
    from torch.profiler import ProfilerActivity

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda device: None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        training_step(model, optimizer, inputs)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    table = None
    if args.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as profiler:
            training_step(model, optimizer, inputs)
            sync(device)
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=args.profile_rows, max_name_column_width=90)
    del optimizer
    return sorted(times)[len(times) // 2], peak, table


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
    import torch

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = build_model(args, device, dtype)
    vocab = model.get_base_model().config.vocab_size
    if args.profile:
        open(args.profile, "w").close()
    rows = []
    for seq_len in args.seq_lens:
        baseline = None
        inputs = step_inputs(args, seq_len, vocab, device)
        for name, config in attentions(args):
            row = dict(attention=name, seq_len=seq_len, answer_tokens=args.answer_tokens, status="ok")
            try:
                if config is None:
                    if swaa.is_patched(model):
                        swaa.unpatch_model(model)
                else:
                    swaa.patch_model(model, config)
                seconds, peak, table = time_steps(model, args, inputs, device)
                if table is not None:
                    with open(args.profile, "a") as file:
                        file.write(f"## {name}, {seq_len} tokens: {seconds:.3f} s per step (timed), one step profiled\n"
                                   f"{table}\n\n")
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
        logits=args.logits, torch=torch.__version__,
    )
    with open(args.json, "w") as file:
        json.dump(dict(meta=meta, rows=rows), file, indent=2)
    print(f"\n{meta['model']}, {meta['dtype']}, {meta['device']}; window {args.window}, sink {args.sink},"
          f" interleave {args.interleave}, FA decode {args.fa_decode}, logits over {args.logits} tokens;"
          " one step = fwd + bwd + AdamW (LoRA)\n")
    header = ["attention", "tokens", "step (s)", "tokens/s", "peak memory (GiB)", "speed vs full"]
    print(markdown_table(header, [table_row(row) for row in rows]))


def table_row(row: dict) -> list:
    """A row's cells in the printed table: a row that did not run shows its status as its time."""
    if row["status"] != "ok":
        return [row["attention"], row["seq_len"], row["status"], None, None, None]
    peak = None if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
    speed = None if row["speedup_vs_full"] is None else f"{row['speedup_vs_full']:.2f}x"
    return [row["attention"], row["seq_len"], f"{row['step_s']:.3f}", f"{row['tokens_per_s']:.0f}", peak, speed]


if __name__ == "__main__":
    main()

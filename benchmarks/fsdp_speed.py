"""Fine-tuning on one GPU against two with FSDP2 (accelerate): tokens per second and peak memory per GPU.

The step is ``train_speed.py``'s (Qwen3-4B-shaped random model, LoRA on q/k/v, gradient checkpointing, one
sequence of ``--seq-lens`` tokens per GPU, the last 512 the answer), run through accelerate with bf16 mixed
precision: on one GPU as a plain model, on N GPUs sharded by accelerate's FSDP2 plugin (every decoder layer
one unit, as ``examples/accelerate_fsdp2.yaml``). Each GPU count is a fresh ``torch.distributed.run``; the
script launches them itself, prints a markdown table last and writes the rows as JSON.

    python benchmarks/fsdp_speed.py --json fsdp_speed.json                  # 1 and 2 GPUs, 16k and 32k tokens
    python benchmarks/fsdp_speed.py --smoke --gpus 1 2 --json /tmp/f.json   # tiny model, CPU processes (test)

torch and accelerate are imported after the arguments are read: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_speed  # noqa: E402  (the model, its inputs and the training step)

import swaa  # noqa: E402
from swaa.tables import markdown_table  # noqa: E402

ATTENTIONS = ("full", "swaa")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, CPU processes (gloo), no FSDP: checks the script")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="process counts, one launch each")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768], help="tokens per GPU and step")
    parser.add_argument("--attentions", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--sink", type=int, default=100)
    parser.add_argument("--interleave", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default="fsdp_speed.json")
    parser.add_argument("--worker", metavar="RESULT", help=argparse.SUPPRESS)  # one launched process group
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.window, args.sink, args.steps = [64], 16, 2, 2
    # what train_speed's model and inputs read
    args.answer_tokens = 8 if args.smoke else 512
    args.logits, args.no_gradient_checkpointing = "answer", False
    return args


def worker(args) -> None:
    """One process of a launch: every (tokens, attention) row, timed; rank 0 writes the rows."""
    import torch
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    cuda = torch.cuda.is_available() and not args.smoke
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = None
    if cuda and world > 1:  # each decoder layer (the model's _no_split_modules) one unit, as in the example's yaml
        fsdp = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                              auto_wrap_policy="transformer_based_wrap")
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", fsdp_plugin=fsdp, cpu=not cuda)
    device = accelerator.device
    rows = []
    for attention in args.attentions:
        for seq_len in args.seq_lens:
            model = train_speed.build_model(args, device, torch.bfloat16 if cuda else torch.float32)
            if attention == "swaa":
                swaa.patch_model(model, window=args.window, sink=args.sink, interleave=args.interleave)
            inputs = train_speed.step_inputs(args, seq_len, model.get_base_model().config.vocab_size, device)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            model, optimizer = accelerator.prepare(model, optimizer)
            row = dict(attention=attention, gpus=world, seq_len=seq_len, fsdp=fsdp is not None, status="ok")
            try:
                row.update(step_seconds_and_peak(accelerator, model, optimizer, inputs, args, cuda))
                row["tokens_per_s"] = world * seq_len / row["step_s"]
            except torch.OutOfMemoryError:
                row["status"] = "OOM"
            rows.append(row)
            del model, optimizer
            accelerator.free_memory()
    if accelerator.is_main_process:
        with open(args.worker, "w") as file:
            json.dump(rows, file)
    accelerator.end_training()


def step_seconds_and_peak(accelerator, model, optimizer, inputs: dict, args, cuda: bool) -> dict:
    """Median seconds per optimizer step, and the largest peak memory of any GPU (GiB)."""
    import torch

    sync = torch.cuda.synchronize if cuda else lambda: None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        accelerator.wait_for_everyone()
        sync()
        start = time.perf_counter()
        accelerator.backward(model(**inputs).loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    mine = torch.tensor([sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0],
                        device=accelerator.device)
    seconds, peak = accelerator.gather(mine[None]).max(dim=0).values.tolist()  # the slowest rank, the fullest GPU
    return dict(step_s=seconds, peak_gib=peak if cuda else None)


def launch(args, gpus: int, result: str) -> list[dict]:
    """``torch.distributed.run`` over ``gpus`` processes of this script as worker; their rows."""
    forwarded = ["--seq-lens", *map(str, args.seq_lens), "--attentions", *args.attentions, "--window", str(args.window),
                 "--sink", str(args.sink), "--interleave", str(args.interleave), "--steps", str(args.steps),
                 "--warmup", str(args.warmup)] + (["--smoke"] if args.smoke else [])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--standalone",
               os.path.abspath(__file__), *forwarded, "--worker", result]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        log = f"{result}.log"
        with open(log, "w") as file:
            file.write(completed.stderr)
        errors = [line for line in completed.stderr.splitlines() if "Error" in line] or ["no error line"]
        return [dict(attention="all", gpus=gpus, seq_len=None, status=f"failed: {errors[0].strip()[:200]}", log=log)]
    with open(result) as file:
        return json.load(file)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for gpus in args.gpus:
            got = launch(args, gpus, os.path.join(scratch, f"{gpus}.json"))
            rows += got
            for row in got:
                print(json.dumps(row), flush=True)
    one_gpu = {(row["attention"], row["seq_len"]): row for row in rows if row.get("gpus") == 1 and "step_s" in row}
    for row in rows:
        base = one_gpu.get((row["attention"], row["seq_len"]))
        row["speedup_vs_1_gpu"] = base["step_s"] * row["gpus"] / row["step_s"] if base and "step_s" in row else None
    cuda = torch.cuda.is_available() and not args.smoke
    meta = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
        model="tiny" if args.smoke else "Qwen3-4B-shaped, random weights", precision="bf16 mixed" if cuda else "fp32",
        lora="q/k/v r=16 rsLoRA alpha=32", gradient_checkpointing=True, window=args.window, sink=args.sink,
        interleave=args.interleave, sharding="accelerate FSDP2 (every decoder layer a unit) on more than 1 GPU",
    )
    with open(args.json, "w") as file:
        json.dump(dict(meta=meta, rows=rows), file, indent=2)
    print(f"\n{meta['model']}, {meta['precision']}, {meta['device']}; one sequence per GPU and step; swaa: window"
          f" {args.window}, sink {args.sink}, interleave {args.interleave}, FA decode\n")
    shown = [dict(row, tokens_per_s=round(row["tokens_per_s"]) if "tokens_per_s" in row else None) for row in rows]
    print(markdown_table(["attention", "gpus", "seq_len", "status", "step_s", "tokens_per_s", "peak_gib",
                          "speedup_vs_1_gpu"], shown))


if __name__ == "__main__":
    main()

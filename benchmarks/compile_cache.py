"""What the compiled prefill's first call costs in a second process, with inductor's caches warm:
``python benchmarks/compile_cache.py --all --dir /tmp/compile_cache``.

Each mode runs in a process of its own (a fresh interpreter: nothing compiled in memory) and times the first and
the second ``generate`` of one token after a ``--length``-token prompt, Qwen3-4B-shaped model with random bf16
weights, swaa's every-layer SWA with ``compile_prefill=True``:

- ``cold``: empty caches (``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR`` in a new folder): what the first
  prompt of a fresh machine costs. Afterwards it saves ``torch.compiler.save_cache_artifacts()`` (the "mega-cache":
  inductor's FX graphs, AOTAutograd's entries, autotuning results, Triton's kernels) to a file.
- ``warm``: the same folders again: inductor's on-disk caches as a second process of the same machine finds them
  (FX graph cache, AOTAutograd cache, autotuning cache, Triton's kernels); dynamo still traces.
- ``load``: new empty folders, and the saved artifacts loaded with ``torch.compiler.load_cache_artifacts`` before
  the first call: what another machine gets from a file shipped with the job.

Each row says how long the eager prefill's first call takes in the same process state (after the compiled
rows: FlexAttention's own compilation is then cached too). Prints a table last; ``--out`` appends JSON rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODES = ("cold", "warm", "load")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help="one process of one mode (the caches' folders must be set)")
    parser.add_argument("--all", action="store_true", help="each of --modes in its own process, in order")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="with --all: which modes (default all three; warm and load need a cold run before)")
    parser.add_argument("--dir", default="/tmp/swaa_compile_cache", help="folder of the caches and the artifacts")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--smoke", action="store_true", help="a tiny model (on the CPU if there is no GPU), for tests")
    parser.add_argument("--out", default="compile_cache.json", help="JSON rows (appended to a list)")
    return parser


def cache_env(folder: Path) -> dict:
    """Environment variables that put every on-disk compile cache under ``folder``."""
    return dict(TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"), TRITON_CACHE_DIR=str(folder / "triton"))


def run_all(args) -> list[dict]:
    folder = Path(args.dir)
    rows = []
    for mode in args.modes:
        caches = folder / ("second" if mode == "load" else "first")  # load: folders nothing wrote before
        if mode in ("cold", "load"):  # empty, also when the script ran before with the same --dir
            shutil.rmtree(caches, ignore_errors=True)
        env = {**os.environ, **cache_env(caches)}
        command = [sys.executable, __file__, "--mode", mode, "--dir", str(folder), "--length", str(args.length),
                   "--out", args.out, *(["--smoke"] if args.smoke else [])]
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        rows.append(json.loads(Path(args.out).read_text())[-1] | dict(process_s=time.perf_counter() - started))
    return rows


def one_mode(args) -> dict:
    import torch
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import swaa
    from bench import QWEN3_4B, TINY, _timed_generate

    artifacts = Path(args.dir) / "artifacts.bin"
    loaded = None
    if args.mode == "load":
        started = time.perf_counter()
        loaded = torch.compiler.load_cache_artifacts(artifacts.read_bytes())
        load_s = time.perf_counter() - started
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(Qwen3Config(**(TINY if args.smoke else QWEN3_4B))).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    prompt = torch.randint(1, model.config.vocab_size, (1, args.length), device=device)
    swaa.patch_model(model, window=2048 if not args.smoke else 32, sink=100 if not args.smoke else 4,
                     fa_decode=False, compile_prefill=True)
    first = _timed_generate(model, prompt, 1).total
    second = _timed_generate(model, prompt, 1).total
    swaa.unpatch_model(model)
    swaa.patch_model(model, window=2048 if not args.smoke else 32, sink=100 if not args.smoke else 4, fa_decode=False)
    eager_first = _timed_generate(model, prompt, 1).total
    eager_second = _timed_generate(model, prompt, 1).total
    row = dict(mode=args.mode, length=args.length, first_call_s=first, second_call_s=second,
               eager_first_call_s=eager_first, eager_second_call_s=eager_second,
               gpu=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               transformers=transformers.__version__)
    if args.mode == "cold":
        data = torch.compiler.save_cache_artifacts()
        if data is not None:
            artifacts.parent.mkdir(parents=True, exist_ok=True)
            artifacts.write_bytes(data[0])
            row["artifacts_mib"] = len(data[0]) / 2**20
    if loaded is not None or args.mode == "load":
        row["load_s"] = load_s
        row["loaded"] = loaded is not None
    print(f"  {args.mode}: first call {first:.1f} s, second {second:.2f} s; eager first {eager_first:.1f} s", flush=True)
    out = Path(args.out)
    out.write_text(json.dumps([*(json.loads(out.read_text()) if out.exists() else []), row], indent=1))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.all == (args.mode is not None):
        parser.error("give --all or one --mode")
    if args.mode:
        return [one_mode(args)]
    rows = run_all(args)
    from bench import markdown_table  # noqa: PLC0415 - torch loads only here, after the child processes

    print(markdown_table(["mode", "length", "first_call_s", "second_call_s", "eager_first_call_s", "load_s",
                          "artifacts_mib", "process_s"], rows))
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

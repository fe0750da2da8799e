"""``python -m swaa.eval``: compare SWAA configs with full attention on a dataset or a synthetic task.

    python -m swaa.eval --model ./Qwen3-4B --synthetic needle,variable_tracking --length 8192 --num 20 \\
        --configs '[{"window": 2048, "sink": 100, "interleave": 2}]' --output out/eval
    python -m swaa.eval --model ./Qwen3-4B --data longmemeval.jsonl --configs settings.json --output out/lme \\
        --max-new-tokens 4096 --max-tokens 32768

    # on a CPU, offline: a tiny random model folder first (its accuracies are ~0: it shows the workflow)
    python -m swaa.tiny ./tiny-model
    python -m swaa.eval --model ./tiny-model --synthetic needle --length 512 --num 2 --configs '{"window": 64}' \\
        --output /tmp/swaa-eval

Without ``--configs`` the recommended config (window 2048, sink 100, interleave 2) runs beside full attention.

torch and transformers are imported after the arguments are read: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..config import load_config_list
from .configs import RECOMMENDED
from .scoring import SCORERS
from .synthetic import TASKS, synthetic_dataset


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m swaa.eval",
        description="Compare SWAA configs with full attention (always run, as the baseline): generate greedily,"
        " score, time; write results.csv, results.json, results.md, predictions.jsonl and accuracy_vs_time.png.",
    )
    parser.add_argument("--model", required=True, help="local model folder (save_pretrained), loaded offline;"
                        " `python -m swaa.tiny ./tiny-model` makes a tiny random one to try this on a CPU")
    parser.add_argument("--tokenizer", help="local tokenizer folder (default: the model's)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="dataset file: .jsonl, .json, .csv or .parquet with prompt, answer fields")
    source.add_argument("--synthetic", help=f"comma-separated synthetic tasks: {', '.join(TASKS)}")
    parser.add_argument("--length", default="4096", help="synthetic prompt length(s) in tokens, comma-separated")
    parser.add_argument("--num", type=int, default=10, help="synthetic examples per task and length")
    parser.add_argument("--seed", type=int, default=0, help="synthetic seed")
    parser.add_argument("--configs",
                        help="SWAA configs: inline JSON (a dict or a list; null = full attention) or a .json/.yaml"
                        " file, the authors' settings lists included (default: the recommended"
                        f" {json.dumps(RECOMMENDED)})")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--scorer", default="substring", choices=sorted(SCORERS), help="how predictions are scored")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--min-tokens", type=int, help="drop examples whose prompt has fewer tokens")
    parser.add_argument("--max-tokens", type=int, help="drop examples whose prompt has more tokens")
    parser.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"],
                        help="apply the tokenizer's chat template (auto: when it has one)")
    parser.add_argument("--template-kwargs", default="{}",
                        help='JSON for apply_chat_template, e.g. \'{"enable_thinking": false}\'')
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        template_kwargs = json.loads(args.template_kwargs)
        lengths = [int(part) for part in args.length.split(",") if part.strip()]
    except ValueError as error:
        raise SystemExit(f"swaa.eval: --template-kwargs / --length: {error}") from None
    chat_template = {"auto": "auto", "on": True, "off": False}[args.chat_template]
    if args.configs is None:
        args.configs = [RECOMMENDED]
        print(f"swaa.eval: no --configs: comparing full attention with the recommended config {json.dumps(RECOMMENDED)}",
              file=sys.stderr)
    try:  # everything that can be checked without the model, before loading it
        load_config_list(args.configs)
        unknown = [task.strip() for task in (args.synthetic or "").split(",") if task.strip() and task.strip() not in TASKS]
        if unknown:
            raise ValueError(f"--synthetic: unknown task(s) {unknown}; available: {', '.join(TASKS)}")
        import torch

        if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no CUDA GPU; use --device cpu")
    except (ValueError, TypeError, RuntimeError) as error:
        raise SystemExit(f"swaa.eval: {error}") from None
    from .runner import load_model, load_tokenizer, run_grid

    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        if args.synthetic:
            tasks = [task.strip() for task in args.synthetic.split(",") if task.strip()]
            dataset = synthetic_dataset(tokenizer, tasks, lengths, args.num, args.seed, chat_template,
                                        template_kwargs, progress=not args.quiet)
        else:
            dataset = args.data
        run_grid(model, tokenizer, dataset, args.configs, args.output, scorer=args.scorer,
                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, min_tokens=args.min_tokens,
                 max_tokens=args.max_tokens, chat_template=chat_template, system=args.system,
                 template_kwargs=template_kwargs, progress=not args.quiet, print_table=False, plot=not args.no_plot)
    except ValueError as error:
        print(f"swaa.eval: {error}", file=sys.stderr)
        return 2
    output = args.output.rstrip("/")
    print(f"results written to {output}/ (results.csv, results.json, results.md, predictions.jsonl"
          f"{'' if args.no_plot else ', accuracy_vs_time.png'})", file=sys.stderr)
    with open(f"{output}/results.md", encoding="utf-8") as file:
        print(file.read().rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())

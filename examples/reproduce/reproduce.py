"""Reproduce the paper's collapse-and-recovery (arXiv 2512.10411, Table 1) on a model trained here.

1. Trains a small Qwen3-architecture model from scratch, with full attention, on synthetic long-context
   key-value retrieval over a tokenizer-free integer vocabulary (a curriculum from short contexts up to
   ``--length`` tokens, bf16 autocast, AdamW). The checkpoint goes to ``--checkpoint`` (default
   ``OUT/model``); ``--skip-train`` reuses it.
2. Measures exact-match accuracy and time per example of that model under full attention and a grid of
   SWAA configs (plain SWA, FA decode, sinks, interleaved full layers of both parities, combinations), for
   two answer formats: "direct" (the value is the first generated tokens) and "think" (the model first
   restates the query key, a chain-of-thought analogue, then answers). Every row goes through
   ``swaa.patch_model`` / ``unpatch_model`` and ``generate`` (``swaa.eval.run_grid``).
3. Fine-tunes LoRA adapters (q/k/v, rsLoRA) SWA-aware through the library's training path
   (``swaa.train.PromptAnswerCollator``, prompt masked as -100, FA decode config) and measures the
   fine-tuned rows.
4. Writes ``results.md`` (also printed last), ``results.json``, ``accuracy_vs_time*.png`` and each grid's
   own files under ``grids/`` into ``--out``.

    PYTHONPATH=. python3 examples/reproduce/reproduce.py --out out/reproduce          # one H100, ~8 min
    PYTHONPATH=. python3 examples/reproduce/reproduce.py --smoke --out /tmp/swaa-smoke  # CPU, < 1 min

The task. One sequence (the prompt; ids in brackets are special tokens, the rest random content ids):

    <bos> (<key> k1 k2 <val> v1 v2) x N  <query> k1 k2 <answer>      -> v1 v2 <eos>               direct
    <bos> (<key> k1 k2 <val> v1 v2) x N  <query> k1 k2 <think>       -> k1 k2 </think> v1 v2 <eos>  think

Keys are unique within a sequence (multi-token, so a single token does not identify the pair); by default
the pair asked for lies wholly before the last ``window`` prompt tokens (``--needle far``), so a plain SWA
layer at the end of the prompt cannot see it. Training sequences carry many query blocks after the
context (dense supervision); evaluation prompts carry one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch loads after the arguments are read
    import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # run from anywhere without PYTHONPATH
    sys.path.insert(0, ROOT)

import swaa  # noqa: E402
from swaa.eval.configs import FULL_ATTENTION, config_name  # noqa: E402
from swaa.tables import markdown_table  # noqa: E402

logger = logging.getLogger("swaa.reproduce")

SPECIALS = ["<pad>", "<eos>", "<bos>", "<key>", "<val>", "<query>", "<answer>", "<think>", "</think>"]
PAD, EOS, BOS, KEY, VAL, QUERY, ANSWER, THINK, THINK_END = range(len(SPECIALS))
FORMATS = ("direct", "think")
TASK_FIELDS = ("vocab", "key_len", "val_len")
FT_TAG = "SWA-FT"

SMOKE = dict(  # a tiny model and task that run end to end on a CPU in well under a minute
    hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, intermediate=128, length=192, window=32, sinks="4,8",
    start_length=96, train_steps=30, train_tokens=2048, max_queries=4, eval_examples=6, eval_batch=6,
    ft_steps=4, ft_batch=2, train_time_limit=40, ft_time_limit=15, lr=3e-3,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (results.md, results.json, plots, grids/)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (< 1 min): checks the pipeline, not the science")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--backend", default="auto",  # names checked by SWAAConfig: listing them here imports torch
                   help="swaa attention backend: auto (the fastest exact one here) or a backend's name (flash, flex, ...)")

    m = p.add_argument_group("model (Qwen3 architecture, trained from scratch)")
    m.add_argument("--vocab", type=int, default=512, help="integer vocabulary, special ids included")
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--layers", type=int, default=6)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--head-dim", type=int, default=64)
    m.add_argument("--intermediate", type=int, default=1024)

    t = p.add_argument_group("task and pretraining")
    t.add_argument("--key-len", type=int, default=2, help="tokens per key")
    t.add_argument("--val-len", type=int, default=2, help="tokens per value")
    t.add_argument("--length", type=int, default=4096, help="prompt tokens at evaluation = last curriculum length")
    t.add_argument("--start-length", type=int, default=256, help="first curriculum length (doubles up to --length)")
    t.add_argument("--train-steps", type=int, default=2500, help="most optimizer steps of pretraining")
    t.add_argument("--train-time-limit", type=float, default=270, help="seconds: pretraining stops here at the latest")
    t.add_argument("--train-tokens", type=int, default=65536, help="tokens per pretraining batch")
    t.add_argument("--max-queries", type=int, default=32, help="query blocks per training sequence")
    t.add_argument("--advance-acc", type=float, default=0.9, help="curriculum: next length when query accuracy >= this")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--checkpoint", default=None, help="default OUT/model")
    t.add_argument("--skip-train", action="store_true", help="load --checkpoint if it exists instead of training")
    t.add_argument("--resume", action="store_true",
                   help="load --checkpoint if it exists and train it further (from the curriculum length it reached)")

    e = p.add_argument_group("evaluation")
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--sinks", default="16,64", help="two sink sizes, small,large")
    e.add_argument("--needle", choices=["far", "uniform"], default="far",
                   help="far: the asked pair lies before the last `window` prompt tokens; uniform: anywhere")
    e.add_argument("--eval-examples", type=int, default=192, help="per answer format")
    e.add_argument("--eval-batch", type=int, default=64)

    f = p.add_argument_group("SWA-aware LoRA fine-tune (swaa.train)")
    f.add_argument("--no-finetune", action="store_true")
    f.add_argument("--ft-steps", type=int, default=150)
    f.add_argument("--ft-batch", type=int, default=8)
    f.add_argument("--ft-lr", type=float, default=1e-4)
    f.add_argument("--ft-rank", type=int, default=16)
    f.add_argument("--ft-alpha", type=float, default=32, help="rsLoRA alpha (scale alpha / sqrt(r))")
    f.add_argument("--ft-sink", type=int, default=0, help="sink of the fine-tuning config (window + FA decode)")
    f.add_argument("--ft-time-limit", type=float, default=75, help="seconds: the fine-tune stops here at the latest")
    f.add_argument("--ft-eval", choices=["paper", "all"], default="paper",
                   help="configs measured after fine-tuning: the paper's fine-tuned rows, or the whole grid")
    args = p.parse_args(argv)
    if args.smoke:  # smoke sizes, unless given on the command line
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for name, value in SMOKE.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    args.sinks = sorted(int(s) for s in str(args.sinks).split(",") if s.strip())
    if len(args.sinks) != 2:
        p.error(f"--sinks={args.sinks}: give two sink sizes, e.g. 16,64")
    try:  # at once, not after training
        swaa.SWAAConfig(window=args.window, backend=args.backend)
    except ValueError as error:
        p.error(f"--backend: {error}")
    args.checkpoint = args.checkpoint or os.path.join(args.out, "model")
    return args


# ------------------------------------------------------------------------------------- task and data


def content_range(vocab: int) -> tuple[int, int]:
    return len(SPECIALS), vocab


def tokenizer_for(vocab: int):
    """The integer vocabulary as a word-level tokenizer (id i <-> the word str(i), specials by name), built in
    process: only the swaa.eval / swaa.train plumbing needs it, the model never sees text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [str(i) for i in range(len(SPECIALS), vocab)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    tokenizer.padding_side = "right"
    return tokenizer


def block_len(fmt: str, args) -> int:
    """Tokens of one query block, prompt part and answer (EOS included)."""
    answer = args.val_len + 1 + (args.key_len + 1 if fmt == "think" else 0)
    return 2 + args.key_len + answer


def sample_pairs(rows: int, pairs: int, args, gen: torch.Generator):
    """keys (rows, pairs, key_len), unique within a row; values (rows, pairs, val_len)."""
    import torch

    lo, hi = content_range(args.vocab)
    size = hi - lo
    space = size ** args.key_len
    keys = torch.empty(rows, pairs, args.key_len, dtype=torch.long)
    for row in range(rows):
        if space < 4 * pairs:
            codes = torch.randperm(space, generator=gen)[:pairs]
        else:
            codes = torch.unique(torch.randint(space, (pairs + pairs // 4 + 16,), generator=gen))
            codes = codes[torch.randperm(len(codes), generator=gen)[:pairs]]
        if len(codes) < pairs:
            raise ValueError(f"key_len={args.key_len}, vocab={args.vocab}: not enough distinct keys for {pairs} pairs")
        digits = [(codes // size**j) % size for j in range(args.key_len)]
        keys[row] = torch.stack(digits, -1) + lo
    values = torch.randint(lo, hi, (rows, pairs, args.val_len), generator=gen)
    return keys, values


def context_tokens(keys, values) -> torch.Tensor:
    """(rows, 1 + pairs * (2 + key_len + val_len)): <bos> then <key> k.. <val> v.. for each pair."""
    import torch

    rows, pairs, _ = keys.shape
    marker = lambda tok: torch.full((rows, pairs, 1), tok, dtype=torch.long)  # noqa: E731
    body = torch.cat([marker(KEY), keys, marker(VAL), values], -1).reshape(rows, -1)
    return torch.cat([torch.full((rows, 1), BOS, dtype=torch.long), body], 1)


def query_block(fmt: str, key, value) -> tuple[torch.Tensor, int]:
    """(rows, block_len) tokens of a query block and the length of its prompt part."""
    import torch

    rows = key.shape[0]
    col = lambda tok: torch.full((rows, 1), tok, dtype=torch.long)  # noqa: E731
    if fmt == "direct":
        prompt = [col(QUERY), key, col(ANSWER)]
        answer = [value, col(EOS)]
    else:
        prompt = [col(QUERY), key, col(THINK)]
        answer = [key, col(THINK_END), value, col(EOS)]
    prompt_len = sum(t.shape[1] for t in prompt)
    return torch.cat(prompt + answer, 1), prompt_len


def pairs_for(length: int, prompt_tail: int, args) -> int:
    pairs = (length - 1 - prompt_tail) // (2 + args.key_len + args.val_len)
    if pairs < 2:
        raise ValueError(f"length={length}: too short for the task (room for {pairs} pairs)")
    return pairs


def training_batch(length: int, rows: int, args, gen: torch.Generator):
    """input_ids (rows, T <= length) and labels (-100 except the answers of the query blocks)."""
    import torch

    pair_len = 2 + args.key_len + args.val_len
    queries = max(1, min(args.max_queries, (length // pair_len) // 4))
    formats = [FORMATS[int(i)] for i in torch.randint(2, (queries,), generator=gen)]  # shared by the rows
    tail = sum(block_len(f, args) for f in formats)
    pairs = pairs_for(length, tail, args)
    queries = min(queries, pairs)
    formats = formats[:queries]
    keys, values = sample_pairs(rows, pairs, args, gen)
    asked = torch.rand(rows, pairs, generator=gen).argsort(-1)[:, :queries]  # distinct pairs per row
    context = context_tokens(keys, values)
    parts, labels = [context], [torch.full_like(context, -100)]
    for j, fmt in enumerate(formats):
        index = asked[:, j]
        block, prompt_len = query_block(fmt, keys[torch.arange(rows), index], values[torch.arange(rows), index])
        label = block.clone()
        label[:, :prompt_len] = -100
        parts.append(block)
        labels.append(label)
    return torch.cat(parts, 1), torch.cat(labels, 1)


def eval_examples(fmt: str, count: int, args, seed: int) -> list[dict]:
    """Prompt/answer records in the swaa.eval format (text of integer ids), all prompts of one length."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    prompt_tail = 2 + args.key_len
    pairs = pairs_for(args.length, prompt_tail, args)
    pair_len = 2 + args.key_len + args.val_len
    prompt_tokens = 1 + pairs * pair_len + prompt_tail
    if args.needle == "far":  # the asked pair ends >= window tokens before the prompt's last token
        last = (prompt_tokens - 1 - args.window - pair_len) // pair_len
        if last < 0:
            raise ValueError(f"--length={args.length} is too short for --window={args.window} with --needle far")
    else:
        last = pairs - 1
    keys, values = sample_pairs(count, pairs, args, gen)
    asked = torch.randint(0, last + 1, (count,), generator=gen)
    context = context_tokens(keys, values)
    records = []
    for row in range(count):
        key, value = keys[row, asked[row]], values[row, asked[row]]
        block, prompt_len = query_block(fmt, key[None], value[None])
        ids = context[row].tolist() + block[0, :prompt_len].tolist()
        answer = block[0, prompt_len:-1]  # without the EOS
        gold = answer[-args.val_len:]
        records.append({
            "id": f"{fmt}-{row}", "question_type": fmt, "prompt": " ".join(_word(i) for i in ids),
            "answer": " ".join(_word(i) for i in gold.tolist()),
            "full_answer": " ".join(_word(i) for i in answer.tolist()),  # the think format's whole target
            "depth": int(asked[row]) / pairs,
        })
    return records


def _word(i: int) -> str:
    return SPECIALS[i] if i < len(SPECIALS) else str(i)


# ------------------------------------------------------------------------------------------ pretraining


def build_model(args):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(8192, 2 * args.length), tie_word_embeddings=True,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
    )
    config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(config)


def curriculum(args) -> list[int]:
    lengths, length = [], min(args.start_length, args.length)
    while length < args.length:
        lengths.append(length)
        length *= 2
    return lengths + [args.length]


def pretrain(model, args, device, first_stage: int = 0) -> dict:
    """Full-attention training from scratch; the loss covers the answers of the query blocks only."""
    import torch

    gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))  # from the seeded global generator
    amp = device.type == "cuda"
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.1,
                                  **({"fused": True} if amp else {}))
    stages = curriculum(args)
    stage, stage_steps, ema, warmup = min(first_stage, len(stages) - 1), 0, None, min(100, max(1, args.train_steps // 10))
    history, began = [], time.perf_counter()
    min_stage_steps = max(5, args.train_steps // 100)
    # the first length is where retrieval has to be discovered at all: it may take a larger share of the steps
    max_stage_steps = [max(min_stage_steps, args.train_steps * (2 if i == 0 else 1) // (len(stages) + 1))
                       for i in range(len(stages))]
    step = 0
    for step in range(1, args.train_steps + 1):
        elapsed = time.perf_counter() - began
        if elapsed > args.train_time_limit:
            logger.warning("pretraining stopped by --train-time-limit=%ss after %d steps", args.train_time_limit, step - 1)
            step -= 1
            break
        progress = max(step / args.train_steps, elapsed / args.train_time_limit)
        lr = args.lr * min(1.0, step / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        length = stages[stage]
        ids, labels = training_batch(length, max(1, args.train_tokens // length), args, gen)
        ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            targets = labels[:, 1:]
            where = targets != -100
            logits = model.lm_head(hidden[:, :-1][where]).float()
        loss = torch.nn.functional.cross_entropy(logits, targets[where])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        stage_steps += 1
        if step % 10 == 0 or step == 1 or stage_steps >= min_stage_steps:
            with torch.no_grad():  # per query block: every answer token right
                right = (logits.argmax(-1) == targets[where]).float()
                token_acc = float(right.mean())
                block_id = torch.cumsum(torch.nn.functional.pad(where[:, 1:] & ~where[:, :-1], (1, 0)), 1)
                block_id = (block_id + torch.arange(where.shape[0], device=device)[:, None] * 10_000)[where]
                wrong = torch.zeros(int(block_id.max()) + 1, device=device).index_add_(0, block_id, 1 - right)
                used = torch.zeros_like(wrong).index_add_(0, block_id, torch.ones_like(right)) > 0
                query_acc = float((wrong[used] == 0).float().mean())
            ema = query_acc if ema is None else 0.8 * ema + 0.2 * query_acc
            record = {"step": step, "length": length, "loss": round(float(loss.detach()), 4), "token_acc": round(token_acc, 4),
                      "query_acc": round(query_acc, 4), "lr": lr, "seconds": round(time.perf_counter() - began, 1)}
            if step % 10 == 0 or step == 1:
                history.append(record)
                if step % 50 == 0 or step == 1:
                    logger.info("pretrain %s", record)
            last = stage == len(stages) - 1
            if not last and stage_steps >= min_stage_steps and (ema >= args.advance_acc or stage_steps >= max_stage_steps[stage]):
                logger.info("curriculum: length %d -> %d at step %d (query accuracy %.3f)", length, stages[stage + 1],
                            step, ema)
                stage, stage_steps, ema = stage + 1, 0, None
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - began, 1), "curriculum": stages,
            "reached_length": stages[stage], "final_query_acc_ema": None if ema is None else round(ema, 4), "history": history}


def load_or_train(args, device):
    """The trained model (float32, on ``device``) and its training log."""
    import torch
    from transformers import AutoModelForCausalLM

    ckpt = args.checkpoint
    if args.skip_train and args.resume:
        raise SystemExit("--skip-train and --resume: give one (skip: evaluate the checkpoint; resume: train it further)")
    if (args.skip_train or args.resume) and os.path.exists(os.path.join(ckpt, "config.json")):
        with open(os.path.join(ckpt, "task.json")) as file:
            saved = json.load(file)
        for name in TASK_FIELDS:
            if getattr(args, name) != saved[name]:
                logger.warning("--%s=%s differs from the checkpoint's %s: using the checkpoint's", name.replace("_", "-"),
                               getattr(args, name), saved[name])
                setattr(args, name, saved[name])
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()
        log = saved.get("train", {})
        log["loaded_from"] = ckpt
        logger.info("loaded the trained model from %s (%s)", ckpt, "--resume" if args.resume else "--skip-train")
        if not args.resume:
            return model, log
        stages = curriculum(args)
        reached = log.get("reached_length", stages[0])
        first = max([i for i, length in enumerate(stages) if length <= reached] or [0])
        logger.info("pretraining further from length %d (--resume)", stages[first])
        torch.manual_seed(args.seed + 1)
        log = {"earlier": log, **pretrain(model, args, device, first_stage=first)}
    else:
        if args.skip_train or args.resume:
            logger.warning("--skip-train/--resume: no checkpoint at %s, training one", ckpt)
        torch.manual_seed(args.seed)
        model = build_model(args).to(device)
        logger.info("pretraining %.1fM parameters, curriculum %s", sum(p.numel() for p in model.parameters()) / 1e6,
                    curriculum(args))
        log = pretrain(model, args, device)
    os.makedirs(ckpt, exist_ok=True)
    model.save_pretrained(ckpt)
    tokenizer_for(args.vocab).save_pretrained(ckpt)
    with open(os.path.join(ckpt, "task.json"), "w") as file:
        json.dump({**{name: getattr(args, name) for name in TASK_FIELDS}, "train": log}, file, indent=1)
    return model, log


# --------------------------------------------------------------------------------- SWA-aware fine-tune


def finetune(model, tokenizer, args, device) -> tuple[object, dict]:
    """LoRA (q/k/v, rsLoRA) on the model patched with window + FA decode, trained through the library's
    collator (prompt labels -100, so the patched model finds where answers start); returns the merged,
    unpatched model and a log."""
    import torch
    from peft import LoraConfig, get_peft_model

    from swaa.train import PromptAnswerCollator

    # bf16 weights on the GPU, as the library's training path runs: under autocast alone, Qwen3's q/k norms
    # (float32 weights) would hand float32 queries and keys, but bfloat16 values, to swaa's attention kernels
    model = copy.deepcopy(model).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = swaa.SWAAConfig(window=args.window, sink=args.ft_sink, fa_decode=True, backend=args.backend)
    swaa.patch_model(model, config)
    peft_model = get_peft_model(model, LoraConfig(
        r=args.ft_rank, lora_alpha=args.ft_alpha, use_rslora=True, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM",
    ))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.ft_lr, weight_decay=0.0)
    collator = PromptAnswerCollator(tokenizer, chat_template=False)  # appends EOS to each answer
    amp = device.type == "cuda"
    peft_model.train()
    history, began, step = [], time.perf_counter(), 0
    for step in range(1, args.ft_steps + 1):
        if time.perf_counter() - began > args.ft_time_limit:
            logger.warning("fine-tune stopped by --ft-time-limit=%ss after %d steps", args.ft_time_limit, step - 1)
            step -= 1
            break
        lr = args.ft_lr * min(1.0, step / max(1, args.ft_steps // 10))
        for group in optimizer.param_groups:
            group["lr"] = lr
        records = []
        for i, fmt in enumerate(FORMATS * ((args.ft_batch + 1) // 2)):
            if len(records) < args.ft_batch:  # ground-truth answers: the full-attention teacher's, when it is right
                record = eval_examples(fmt, 1, args, seed=10_000_000 + args.seed * 100_000 + step * 64 + i)[0]
                records.append({"prompt": record["prompt"], "answer": record["full_answer"]})
        batch = {k: v.to(device) for k, v in collator(records).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = peft_model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        if step % 10 == 0 or step == 1:
            history.append({"step": step, "loss": round(float(loss.detach()), 4), "seconds": round(time.perf_counter() - began, 1)})
            logger.info("fine-tune %s", history[-1])
    peft_model.eval()
    swaa.unpatch_model(peft_model)
    merged = peft_model.merge_and_unload()
    log = {"config": config.to_dict(), "steps": step, "seconds": round(time.perf_counter() - began, 1),
           "lora": {"r": args.ft_rank, "alpha": args.ft_alpha, "rslora": True, "targets": "q,k,v", "lr": args.ft_lr,
                    "batch": args.ft_batch}, "history": history}
    return merged, log


# ------------------------------------------------------------------------------------------ evaluation


def grid_configs(args, which: str = "all") -> list:
    """The SWAA configs of the table (full attention, the baseline, is added by run_grid)."""
    w, small, large, b = args.window, args.sinks[0], args.sinks[1], args.backend
    c = lambda **f: swaa.SWAAConfig(window=w, backend=b, **f)  # noqa: E731
    if which == "paper":  # the fine-tuned rows of the paper's Table 1, with both parities
        return [c(fa_decode=False), c(), c(sink=large), c(sink=large, interleave=2, interleave_offset=0),
                c(sink=large, interleave=2, interleave_offset=1)]
    configs = [c(fa_decode=False), c(fa_decode=False, sink=small), c(fa_decode=False, sink=large),
               c(), c(sink=small), c(sink=large)]
    for n in (2, 4):
        configs += [c(fa_decode=False, interleave=n, interleave_offset=o) for o in (0, 1)]
    for n, sinks in ((2, (small, large)), (4, (large,))):
        configs += [c(sink=s, interleave=n, interleave_offset=o) for s in sinks for o in (0, 1)]
    return configs


def evaluate(model, tokenizer, args, configs, datasets: dict, tag: str, device) -> list[dict]:
    """One swaa.eval grid per answer format; rows {model, format, config, accuracy, ...}."""
    import torch

    from swaa.eval import run_grid

    model = copy.deepcopy(model).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    rows = []
    for fmt, data in datasets.items():
        max_new = block_len(fmt, args) - 2 - args.key_len
        out_dir = os.path.join(args.out, "grids", f"{tag}_{fmt}")
        kwargs = dict(scorer="exact", max_new_tokens=max_new, batch_size=args.eval_batch, chat_template=False,
                      progress=False, print_table=False, plot=True)
        began = time.perf_counter()
        try:
            summary = run_grid(model, tokenizer, data, configs, out_dir, **kwargs).summary
        except Exception as error:  # one failing config must not cost the others: run them one by one
            logger.exception("grid %s/%s failed (%s); running its configs one at a time", tag, fmt, error)
            summary = []
            for i, config in enumerate([None] + list(configs)):
                try:
                    part = run_grid(model, tokenizer, data, [config], os.path.join(out_dir, f"config_{i}"), **kwargs)
                    summary.append(part.summary[0 if config is None else 1])
                except Exception as error2:  # noqa: BLE001
                    logger.exception("config %s failed", config_name(config))
                    summary.append({"config": config_name(config), "accuracy": float("nan"), "n": 0,
                                    "seconds_per_example": float("nan"), "new_tokens_per_example": float("nan"),
                                    "swaa_config": None if config is None else config.to_dict(),
                                    "error": f"{type(error2).__name__}: {error2}"})
        logger.info("grid %s/%s: %d configs in %.1f s", tag, fmt, len(summary), time.perf_counter() - began)
        for row in summary:
            rows.append({"model": tag, "format": fmt, **row})
    return rows


# --------------------------------------------------------------------------------------------- output


def _cell(value, fmt="{:.1f}", scale=1.0) -> str | None:
    return None if value is None or value != value else fmt.format(scale * value)


def results_table(rows: list[dict], finetuned: bool) -> str:
    names = list(dict.fromkeys(r["config"] for r in rows if r["model"] == "base"))
    names += [n for n in dict.fromkeys(r["config"] for r in rows) if n not in names]
    get = {(r["model"], r["format"], r["config"]): r for r in rows}
    header = ["config", "direct (%)", "think (%)"]
    if finetuned:
        header += [f"direct, {FT_TAG} (%)", f"think, {FT_TAG} (%)"]
    header += ["ms / example direct", "ms / example think"]
    body = []
    for name in names:
        cells = [name]
        models = ["base"] + (["finetuned"] if finetuned else [])
        for model in models:
            for fmt in FORMATS:
                row = get.get((model, fmt, name))
                cells.append(_cell(row and row["accuracy"], scale=100))
        for fmt in FORMATS:
            row = get.get(("base", fmt, name)) or get.get(("finetuned", fmt, name))
            cells.append(_cell(row and row["seconds_per_example"], "{:.2f}", 1000))
        body.append(cells)
    return markdown_table(header, body)


def write_plots(rows: list[dict], out: str) -> list[str]:
    try:
        from swaa.eval.plot import plot_accuracy_vs_time
    except ImportError:
        return []
    paths = []
    groups = {f"_{fmt}": [r for r in rows if r["format"] == fmt] for fmt in FORMATS}  # one plot per format
    for suffix, group in groups.items():
        summary = []
        for r in group:
            if r["accuracy"] != r["accuracy"]:
                continue
            label = r["config"]
            if r["model"] == "finetuned":
                label += f" [{FT_TAG}]"
            if r["model"] == "base" and r["config"] == FULL_ATTENTION:
                label = FULL_ATTENTION  # the baseline marker
            summary.append({**r, "config": label})
        if not summary:
            continue
        path = os.path.join(out, f"accuracy_vs_time{suffix}.png")
        title = f"toy Qwen3 key-value retrieval, {suffix[1:]} format"
        try:
            paths.append(plot_accuracy_vs_time(summary, path, title=title))
        except ImportError as error:
            logger.warning("no plot written (%s)", error)
            return paths
    return paths


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch  # after the arguments: --help answers at once

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("swaa").setLevel(logging.WARNING)  # the library's per-config chatter
    logger.setLevel(logging.INFO)
    for name in ("recompile_limit", "cache_size_limit"):  # one flex kernel per shape family: allow many
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: more threads only wait on each other (30x slower on a busy machine)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    began = time.perf_counter()
    tokenizer = tokenizer_for(args.vocab)

    model, train_log = load_or_train(args, device)
    tokenizer = tokenizer_for(args.vocab)  # the checkpoint's vocabulary under --skip-train
    trained = time.perf_counter()

    datasets = {fmt: eval_examples(fmt, args.eval_examples, args, seed=1_000_000 + args.seed * 10 + i)
                for i, fmt in enumerate(FORMATS)}
    rows = evaluate(model, tokenizer, args, grid_configs(args), datasets, "base", device)
    evaluated = time.perf_counter()
    ft_log = None
    if not args.no_finetune:
        tuned, ft_log = finetune(model, tokenizer, args, device)
        ft_done = time.perf_counter()
        rows += evaluate(tuned, tokenizer, args, grid_configs(args, args.ft_eval), datasets, "finetuned", device)
        ft_log["eval_seconds"] = round(time.perf_counter() - ft_done, 1)
    table = results_table(rows, finetuned=not args.no_finetune)
    for row in rows:
        if row["model"] == "base" and row["config"] == FULL_ATTENTION and not row["accuracy"] >= 0.9 and not args.smoke:
            logger.warning("full attention gets only %.1f%% on the %s format: the model has not learned retrieval well;"
                           " train longer (--resume with a larger --train-time-limit) before reading the SWA rows",
                           100 * row["accuracy"], row["format"])
    seconds = {"train_or_load": round(trained - began, 1), "eval_base": round(evaluated - trained, 1),
               "total": round(time.perf_counter() - began, 1)}
    settings = {k: v for k, v in vars(args).items()}
    settings.update(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    torch=torch.__version__, parameters=sum(p.numel() for p in model.parameters()),
                    eval_prompt_tokens=len(datasets["direct"][0]["prompt"].split()))
    import transformers

    settings["transformers"] = transformers.__version__
    result = {"settings": settings, "seconds": seconds, "train": train_log, "finetune": ft_log, "rows": rows}
    with open(os.path.join(args.out, "results.json"), "w") as file:
        json.dump(result, file, indent=1, default=str)
    with open(os.path.join(args.out, "results.md"), "w") as file:
        file.write(table + "\n")
    plots = write_plots(rows, args.out)
    logger.info("wrote %s, %s, %s (%.0f s in all: %s)", os.path.join(args.out, "results.md"),
                os.path.join(args.out, "results.json"), ", ".join(plots) or "no plot", seconds["total"], seconds)
    print(f"\nswaa reproduce: {settings['parameters'] / 1e6:.1f}M-parameter Qwen3, prompts of"
          f" {settings['eval_prompt_tokens']} tokens, window {args.window}, {args.eval_examples} examples per format,"
          f" needle {args.needle}; accuracy = exact match of the value; {FT_TAG}: LoRA fine-tuned with"
          f" window {args.window} + FA decode{f' + sink {args.ft_sink}' if args.ft_sink else ''}\n")
    print(table, flush=True)
    return {**result, "table": table, "plots": plots}


if __name__ == "__main__":
    main()

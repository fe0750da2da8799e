"""The compiled prefill's fault with left-padded batches, reduced: ``python benchmarks/padded_prefill_fault.py``.

On an H200 (torch 2.11) the compiled prefill gave a left-padded batch of three rows (300, 211, 40 tokens) logits
0.12 away from the eager forward's, while single rows matched to 4e-7 (docs/performance.md). Three levels, each
against a float64 reference on the same inputs, errors over real tokens and over padding separately:

1. one attention call (an SWA rule and a full one, swaa's block mask over a padded plan): FlexAttention eager (as
   the eager prefill runs it), compiled with dynamic shapes and the block mask built inside the graph (as the
   compiled prefill runs it), and compiled with the block mask built outside;
2. the whole model's forward (tiny Llama and Qwen3, float32): eager against the compiled prefill made to take
   padded batches (``prefill.compiles`` widened for this script only);
3. the same with the padding rows' inputs changed: real tokens must not move.

Prints a table last; ``--out`` writes the rows as JSON. Needs a CUDA GPU (on the CPU the kernels differ).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import swaa  # noqa: E402
from swaa import prefill  # noqa: E402
from swaa.backends import flex  # noqa: E402
from swaa.plan import plan_forward  # noqa: E402
from swaa.rules import LayerRule  # noqa: E402
from swaa.tables import markdown_table  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, eos_token_id=None, bos_token_id=None,
             pad_token_id=0)
FAMILIES = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)), "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE))}
CONFIG = dict(window=48, sink=5, interleave=2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to check this script runs
CASES = {"one row [300]": [300], "two rows [300, 300]": [300, 300], "one padded row [211] of 300": [211],
         "padded [300, 211, 40]": [300, 211, 40]}


def padded(rows: list[int], total: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SHAPE["vocab_size"], (len(rows), total), generator=generator)
    mask = (torch.arange(total) >= total - torch.tensor(rows)[:, None]).long()
    return ids.masked_fill(mask == 0, 0).to(DEVICE), mask.to(DEVICE)


def errors(out: torch.Tensor, ref: torch.Tensor, real: torch.Tensor) -> dict:
    """Largest absolute error over real rows and over padding rows (out, ref: (batch, len, ...); real: (batch, len))."""
    diff = (out.double() - ref.double()).abs().flatten(2).amax(-1)
    return dict(real_err=diff[real].max().item(), pad_err=diff[~real].max().item() if (~real).any() else 0.0,
                nan=bool(out.isnan().any()))


def attention_rows(rows: list[int], total: int) -> list[dict]:
    """One attention call per rule, three ways, against float64."""
    mask = padded(rows, total)[1]
    batch, heads, kv_heads, dim = len(rows), 8, 2, 64
    torch.manual_seed(0)
    q = torch.randn(batch, heads, total, dim, device=DEVICE)
    k, v = torch.randn(2, batch, kv_heads, total, dim, device=DEVICE).unbind(0)
    scale = dim**-0.5

    def plan():
        return plan_forward(batch_size=batch, q_len=total, past_len=0, device=q.device, attention_mask=mask)

    def inside(q, k, v, rule):  # the compiled prefill's way: the block mask built in the graph
        return flex.attend(q, k, v, rule=rule, plan=plan(), scaling=scale)[0]

    compiled_inside = torch.compile(inside, dynamic=True)
    compiled_kernel = torch.compile(flex_attention, dynamic=True)
    out = []
    for rule in (LayerRule(CONFIG["window"], CONFIG["sink"]), LayerRule(None)):
        dense = plan().mask(rule)  # (batch, q, kv)
        scores = (q.double() @ k.double().repeat_interleave(heads // kv_heads, 1).transpose(-1, -2)) * scale
        weights = scores.masked_fill(~dense[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        ref = (weights @ v.double().repeat_interleave(heads // kv_heads, 1)).transpose(1, 2)
        real = mask.bool()
        block_mask = flex.block_mask(rule, plan())
        per_head = per_head_block_mask(block_mask, heads)
        ways = {
            "eager (compiled kernel, static shapes)": lambda: flex.attend(q, k, v, rule=rule, plan=plan(), scaling=scale)[0],
            "compiled dynamic, block mask in graph": lambda: compiled_inside(q, k, v, rule),
            "compiled dynamic kernel, block mask outside": lambda: compiled_kernel(
                q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True,
                kernel_options={"FORCE_USE_FLEX_ATTENTION": True}).transpose(1, 2),
            # a candidate workaround: block lists of every head, contiguous, instead of one broadcast over heads
            "compiled dynamic kernel, per-head block mask outside": lambda: compiled_kernel(
                q, k, v, block_mask=per_head, scale=scale, enable_gqa=True,
                kernel_options={"FORCE_USE_FLEX_ATTENTION": True}).transpose(1, 2),
        }
        if DEVICE == "cpu":  # inductor's CPU FlexAttention template refuses these shapes: the eager way alone
            ways = dict(list(ways.items())[:1])
        for way, call in ways.items():
            out.append(dict(level="attention", rule="full" if rule.is_full else "window+sink", rows=str(rows), way=way,
                            **errors(call(), ref, real)))
    return out


def per_head_block_mask(block_mask: BlockMask, heads: int) -> BlockMask:
    """``block_mask`` (block lists shared by the heads: (batch, 1, ...)) with a contiguous copy for each head."""
    def spread(tensor):
        return None if tensor is None else tensor.expand(-1, heads, *tensor.shape[2:]).contiguous()

    return BlockMask.from_kv_blocks(
        spread(block_mask.kv_num_blocks), spread(block_mask.kv_indices), spread(block_mask.full_kv_num_blocks),
        spread(block_mask.full_kv_indices), BLOCK_SIZE=flex.BLOCK, mask_mod=block_mask.mask_mod,
        seq_lengths=block_mask.seq_lengths)


def model_rows(family: str, rows: list[int], total: int) -> list[dict]:
    """The whole forward, eager and with the compiled prefill (padded batches let through), against float64."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        base = FAMILIES[family]().float().eval()
    reference = swaa.patch_model(FAMILIES[family]().to(DEVICE).double().eval(), **CONFIG)
    reference.load_state_dict({name: t.double() for name, t in base.state_dict().items()})
    eager = swaa.patch_model(base, **CONFIG)
    ids, mask = padded(rows, total)
    real = mask.bool()
    out = []
    with torch.no_grad():
        ref = reference(ids, attention_mask=mask, use_cache=False).logits
        logits = {"eager": eager(ids, attention_mask=mask, use_cache=False).logits}
        swaa.unpatch_model(base)
        compiled = swaa.patch_model(base, **CONFIG, compile_prefill=True)
        logits["compiled prefill"] = compiled(ids, attention_mask=mask, use_cache=False).logits
        # padding must not reach real tokens: other pad ids (the mask unchanged)
        other = ids.masked_fill(mask == 0, 7)
        logits["compiled prefill, other pad ids"] = compiled(other, attention_mask=mask, use_cache=False).logits
        swaa.unpatch_model(base)
    for way, value in logits.items():
        out.append(dict(level=f"model ({family})", rule="interleave 2", rows=str(rows), way=way, **errors(value, ref, real)))
    return out


def widened_compiles(plan) -> bool:
    """``prefill.compiles`` without its routing of batches and padding to the eager forward (this script only)."""
    rows, queries = plan.query_pos.shape
    if queries == 1 or plan.kv_len != queries or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    plan.plain()  # answered before the graph, as for a plain row: a constant of the graph
    return True


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON rows")
    parser.add_argument("--families", nargs="*", default=["llama"], choices=list(FAMILIES),
                        help="whole-model checks in these families (none: the attention level alone)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="attention-level cases")
    parser.add_argument("--model-cases", nargs="+", default=["one row [300]", "padded [300, 211, 40]"],
                        choices=list(CASES), help="whole-model cases (each compiles the prefill once more)")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name in args.cases:
        rows += attention_rows(CASES[name], 300)
        print(markdown_table(["level", "rule", "rows", "way", "real_err", "pad_err", "nan"], rows[-8:]), flush=True)
    prefill.compiles = widened_compiles
    for family in args.families:
        for name in args.model_cases:
            rows += model_rows(family, CASES[name], 300)
            print(markdown_table(["level", "rows", "way", "real_err", "pad_err", "nan"], rows[-3:]), flush=True)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"\n{gpu}, torch {torch.__version__}; float32, TF32 off; errors against float64\n")
    print(markdown_table(["level", "rule", "rows", "way", "real_err", "pad_err", "nan"], rows))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(gpu=gpu, torch=torch.__version__, rows=rows),
                                             indent=1))
    return rows


if __name__ == "__main__":
    main()

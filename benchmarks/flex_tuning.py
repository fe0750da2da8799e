"""FlexAttention kernel options for window 2048 + 100 sinks on the GPU, one table per section.

``forward``: a 128k prompt's forward with static- and dynamic-shape kernels and two block sizes, and whether
fresh layouts (a new mask_mod each forward) recompile. ``backward``: one training layer's attention, forward
and backward (the training layout: the last ``--answer`` tokens are the answer and, under FA decode, see
every key), at ``--length`` tokens, for the default kernel options, each candidate in ``BACKWARD_CANDIDATES``
and inductor's own search (``max-autotune``), beside PyTorch's fused causal attention (cuDNN on Hopper) over
all keys: the ratio is what a windowed layer costs against a full one. Writes the rows as JSON.

    python benchmarks/flex_tuning.py --sections backward --length 32768 --json flex_tuning.json

torch and swaa's kernels are imported after the arguments are read: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import time

from swaa.tables import markdown_table

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
WINDOW, SINK = 2048, 100
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, stages, warps): PyTorch's sm90 default for head_dim 128 is
# (64, 128, 128, 64, 3, 8); the others are its autotuning space's neighbours that fit the 128-token blocks.
BACKWARD_CANDIDATES = {
    "default": {},
    "TMA": {"USE_TMA": True},
    "64/64/64/64 s3 w4": dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64, bwd_num_stages=3, bwd_num_warps=4),
    "64/64/64/64 s2 w8": dict(BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64, bwd_num_stages=2, bwd_num_warps=8),
    "64/128/128/64 s2 w8": dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64, bwd_num_stages=2,
                                bwd_num_warps=8),
    "32/128/128/32 s3 w4": dict(BLOCK_M1=32, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=32, bwd_num_stages=3,
                                bwd_num_warps=4),
    "64/128/128/64 s3 w8 TMA": dict(BLOCK_M1=64, BLOCK_N1=128, BLOCK_M2=128, BLOCK_N2=64, bwd_num_stages=3,
                                    bwd_num_warps=8, USE_TMA=True),
}


def inputs(length, batch=1, grad=False):
    import torch

    q = torch.randn(batch, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    return q, k, torch.randn_like(k, requires_grad=grad)


def forward_rows() -> list[dict]:
    import torch
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from swaa.backends import flex
    from bench import cuda_seconds
    from swaa.plan import plan_forward
    from swaa.rules import LayerRule

    rule = LayerRule(WINDOW, SINK)
    rows = []
    length = 131072
    q, k, v = inputs(length)
    layout = plan_forward(batch_size=1, q_len=length, past_len=0, device=torch.device("cuda"))
    mask = flex.block_mask(rule, layout)
    for dynamic in (False, True):
        for name, options in {"default": None, "BLOCK_M/N 128": {"BLOCK_M": 128, "BLOCK_N": 128}}.items():
            compiled = torch.compile(flex_attention, dynamic=dynamic)
            if dynamic:  # let it see another length first, as in real use
                q2, k2, v2 = inputs(40960)
                layout2 = plan_forward(batch_size=1, q_len=40960, past_len=0, device=torch.device("cuda"))
                compiled(q2, k2, v2, block_mask=flex.block_mask(rule, layout2), scale=HEAD_DIM**-0.5,
                         enable_gqa=True, kernel_options=options)
            ms = 1e3 * cuda_seconds(lambda: compiled(q, k, v, block_mask=mask, scale=HEAD_DIM**-0.5, enable_gqa=True,
                                                     kernel_options=options))
            rows.append(dict(section="forward 128k", options=f"{name}, dynamic={dynamic}", ms=ms))
            print(rows[-1], flush=True)
    for name, batch_lengths in [("plain rows", [8192]), ("padded rows", [8192, 6000])]:
        before = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        for _ in range(4):
            total = max(batch_lengths)
            attention_mask = torch.zeros(len(batch_lengths), total, dtype=torch.long, device="cuda")
            for row, n in enumerate(batch_lengths):
                attention_mask[row, total - n:] = 1
            fresh = plan_forward(batch_size=len(batch_lengths), q_len=total, past_len=0, device=torch.device("cuda"),
                                 attention_mask=attention_mask)
            q, k, v = inputs(total, len(batch_lengths))
            flex.attend(q, k, v, rule=rule, plan=fresh, scaling=HEAD_DIM**-0.5)
        torch.cuda.synchronize()
        rows.append(dict(section="fresh layouts", options=name,
                         new_graphs=counters["stats"]["unique_graphs"] - before, ms=1e3 * (time.perf_counter() - start)))
        print(rows[-1], flush=True)
    return rows


def _forward_backward(attend, q, k, v, grad):
    def step():
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(grad)
    return step


def backward_rows(length: int, answer: int, save) -> list[dict]:
    """Forward + backward of one layer's attention per kernel option set; the windowed rule over the
    training layout, and cuDNN's causal attention over all keys for comparison. ``save(rows)`` after each
    row: an autotuning search cut short by a time limit keeps the rows before it."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from swaa.backends import flex
    from bench import cuda_seconds
    from swaa.plan import plan_forward
    from swaa.rules import LayerRule

    q, k, v = inputs(length, grad=True)
    grad = torch.randn_like(q)
    rule = LayerRule(WINDOW, SINK, True)
    layout = plan_forward(batch_size=1, q_len=length, past_len=0, device=torch.device("cuda"),
                          prompt_len=length - answer)
    mask = flex.block_mask(rule, layout)
    scale = HEAD_DIM**-0.5

    def full(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    rows = [dict(section=f"fwd+bwd {length}", options="full causal (sdpa)",
                 ms=1e3 * cuda_seconds(_forward_backward(full, q, k, v, grad)))]
    print(rows[-1], flush=True)
    candidates = {name: (dict(options, FORCE_USE_FLEX_ATTENTION=True), "default")
                  for name, options in BACKWARD_CANDIDATES.items()}
    candidates["max-autotune"] = ({"FORCE_USE_FLEX_ATTENTION": True}, "max-autotune-no-cudagraphs")
    for name, (options, mode) in candidates.items():
        torch._dynamo.reset()
        compiled = torch.compile(flex_attention, mode=mode)

        def windowed(q, k, v):
            return compiled(q, k, v, block_mask=mask, scale=scale, enable_gqa=True, kernel_options=options)

        row = dict(section=f"fwd+bwd {length}", options=name, kernel_options=options)
        try:
            start = time.perf_counter()
            windowed(q, k, v).backward(grad)  # compiles (and, for max-autotune, searches)
            row["compile_s"] = time.perf_counter() - start
            row["ms"] = 1e3 * cuda_seconds(_forward_backward(windowed, q, k, v, grad))
        except Exception as error:  # noqa: BLE001 - an option set this GPU cannot run is a row, not the end
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        row["vs_full"] = row["ms"] / rows[0]["ms"] if "ms" in row else None
        rows.append(row)
        print(row, flush=True)
        save(rows)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=["forward", "backward"], default=["forward", "backward"])
    parser.add_argument("--length", type=int, default=32768, help="tokens of the backward section")
    parser.add_argument("--answer", type=int, default=512, help="answer tokens of the backward section's layout")
    parser.add_argument("--json", default="flex_tuning.json")
    args = parser.parse_args(argv)
    import torch

    def save(rows):
        with open(args.json, "w") as file:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), file, indent=1)

    rows = forward_rows() if "forward" in args.sections else []
    if "backward" in args.sections:
        rows += backward_rows(args.length, args.answer, lambda backward: save(rows + backward))
    save(rows)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(markdown_table(["section", "options", "ms", "vs_full", "compile_s", "new_graphs", "error"], rows))


if __name__ == "__main__":
    main()

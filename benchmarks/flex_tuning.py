"""FlexAttention on the H100 for window 2048 + 100 sinks: static vs dynamic-shape kernels, block sizes, and
whether fresh layouts (a new mask_mod each forward) recompile. Run on the GPU machine; prints a line per item."""

import time

import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import flex_attention

from swaa.backends import flex
from swaa.bench import cuda_seconds
from swaa.layout import Layout
from swaa.rules import LayerRule

heads, kv_heads, d = 32, 8, 128
rule = LayerRule(2048, 100)


def inputs(length, batch=1):
    q = torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, length, d, device="cuda", dtype=torch.bfloat16)
    return q, k, torch.randn_like(k)


length = 131072
q, k, v = inputs(length)
layout = Layout.build(batch_size=1, q_len=length, past_len=0, device=torch.device("cuda"))
mask = flex.block_mask(rule, layout)
for dynamic in (False, True):
    for options in (None, {"BLOCK_M": 128, "BLOCK_N": 128}):
        compiled = torch.compile(flex_attention, dynamic=dynamic)
        if dynamic:  # let it see another length first, as in real use
            q2, k2, v2 = inputs(40960)
            layout2 = Layout.build(batch_size=1, q_len=40960, past_len=0, device=torch.device("cuda"))
            compiled(q2, k2, v2, block_mask=flex.block_mask(rule, layout2), scale=d**-0.5, enable_gqa=True,
                     kernel_options=options)
        ms = 1e3 * cuda_seconds(lambda: compiled(q, k, v, block_mask=mask, scale=d**-0.5, enable_gqa=True, kernel_options=options))
        print(f"128k dynamic={dynamic} options={options}: {ms:.2f} ms", flush=True)

for name, batch_lengths in [("plain rows", [8192]), ("padded rows", [8192, 6000])]:
    before = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    for trial in range(4):
        total = max(batch_lengths)
        attention_mask = torch.zeros(len(batch_lengths), total, dtype=torch.long, device="cuda")
        for row, n in enumerate(batch_lengths):
            attention_mask[row, total - n:] = 1
        fresh = Layout.build(batch_size=len(batch_lengths), q_len=total, past_len=0, device=torch.device("cuda"),
                             attention_mask=attention_mask)
        q, k, v = inputs(total, len(batch_lengths))
        flex.attend(q, k, v, rule=rule, layout=fresh, scaling=d**-0.5)
    torch.cuda.synchronize()
    print(f"fresh layouts, {name}: {counters['stats']['unique_graphs'] - before} new graphs in 4 forwards,"
          f" {time.perf_counter() - start:.1f} s", flush=True)

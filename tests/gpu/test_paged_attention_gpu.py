"""``swaa.paged.paged_attention`` on CUDA, bf16 and float16, against the float64 rule (skipped without CUDA): the
mixed-batch grid of tests/paged_cases.py (window, sink, FA decode, block sizes 16-64, prefilling, decoding and
recomputing requests in one batch) and a longer batch. Tolerance rule of tests/gpu/test_backends_gpu.py: the
error against float64 at most twice plain dense attention's error at the same precision, plus a small floor."""

from __future__ import annotations

import pytest
import torch
from paged_cases import CASES, PagedCase, Request, make_inputs

from swaa.paged import paged_attention
from swaa.rules import LayerRule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LONG = [PagedCase((Request(1500, 700, 1500), Request(900, 1, 600), Request(1200, 300, 1000), Request(64, 64, 64)),
                  rule, block_size, heads=8, kv_heads=2, head_dim=64)
        for rule in (LayerRule(256, 16, True), LayerRule(100, 0, False), LayerRule(None)) for block_size in (16, 64)]


def error(output, expected):
    return ((output.double().cpu() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES + LONG, ids=str)
def test_paged_attention_equals_the_rule_on_cuda(case, dtype):
    inputs, expected, plain = make_inputs(case, device="cuda", dtype=dtype)
    output = paged_attention(**inputs, rule=case.rule, scaling=case.head_dim**-0.5)
    assert output.device.type == "cuda" and not output.isnan().any()
    assert error(output, expected) <= 2 * error(plain, expected) + 1e-3, (error(output, expected),
                                                                         error(plain, expected))

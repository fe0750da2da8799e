"""GPU backends against the float64 reference (run on the H100; skipped without CUDA).

Tolerance rule (flash-attn's tests): a backend's error against float64 is at most twice the error of plain
PyTorch attention (dense mask, same low precision) for outputs, three times for dq, dk and dv, plus a small
floor. The flash backend runs twice where the flash-attn package is installed: through the package and
through PyTorch's own FA2 kernels."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from kernel_cases import CASES, GRADIENT_CASES, Case, make_inputs, output_and_gradients, reference_output, takes
from reference import attention as plain_attention

import swaa
from swaa.backends import Call, flash, flex, reference, sdpa
from swaa.plan import Plan, plan_forward
from swaa.rules import LayerRule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FLASH_PACKAGE = importlib.util.find_spec("flash_attn") is not None
BACKENDS = ["flex", "flash-torch", "flash-package"]


@pytest.fixture
def attend(backend, monkeypatch):
    """The attend function of ``backend``; flash-torch: PyTorch's FA2 kernels even where flash-attn is installed."""
    if backend == "flex":
        return flex.attend
    if backend == "flash-package" and not FLASH_PACKAGE:
        pytest.skip("the flash-attn package is not installed (benchmarks/build_flash_attn.sh builds it)")
    if backend == "flash-torch":
        monkeypatch.setattr(flash, "_has_package", lambda: False)
    return flash.attend


def error(output, expected):
    output, expected = output.double().cpu(), expected.double().cpu()
    return ((output - expected).norm() / expected.norm()).item()


def check(attend, case, dtype, seed=0, baseline=None):
    """``attend``'s output against float64, within twice the error of plain attention at ``dtype``: the
    reference backend's, or ``baseline(query, key, value, mask, scaling)``'s."""
    query, key, value, plan, expected_mask = make_inputs(case, device="cuda", dtype=dtype, seed=seed)
    scaling = case.head_dim**-0.5
    expected = reference_output(query.double(), key.double(), value.double(), expected_mask, scaling)
    output, _ = attend(query, key, value, rule=case.rule, plan=plan, scaling=scaling)
    if baseline is None:
        plain, _ = reference.attend(query, key, value, rule=case.rule, plan=plan, scaling=scaling)
    else:
        plain = baseline(query, key, value, expected_mask.to(query.device), scaling)
    assert not output.isnan().any()
    assert error(output, expected) <= 2 * error(plain, expected) + 1e-3, (error(output, expected), error(plain, expected))


def check_gradients(attend, case, dtype, seed=0):
    """Output within 2x and dq, dk, dv within 3x plain PyTorch attention's error at ``dtype``."""
    query, key, value, plan, expected_mask = make_inputs(case, device="cuda", dtype=dtype, seed=seed)
    scaling = case.head_dim**-0.5
    upstream = torch.randn(query.shape[0], query.shape[2], query.shape[1], query.shape[3],
                           generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    expected = output_and_gradients(lambda q, k, v: reference_output(q, k, v, expected_mask, scaling),
                                    query.double(), key.double(), value.double(), upstream)
    inputs = (query, key, value, upstream.to("cuda"))
    got = output_and_gradients(lambda q, k, v: attend(q, k, v, rule=case.rule, plan=plan, scaling=scaling)[0],
                               *inputs)
    plain = output_and_gradients(
        lambda q, k, v: reference.attend(q, k, v, rule=case.rule, plan=plan, scaling=scaling)[0], *inputs)
    for name, factor, actual, baseline, wanted in zip(["output", "dq", "dk", "dv"], [2, 3, 3, 3], got, plain, expected):
        assert not actual.isnan().any(), name
        assert error(actual, wanted) <= factor * error(baseline, wanted) + 1e-3, (name, error(actual, wanted),
                                                                                 error(baseline, wanted))


GPU_CASES = [
    Case(c.lengths, c.q_len, c.rule, c.prompt_end, heads=h, kv_heads=h // g, head_dim=d, packed=c.packed)
    for c in CASES
    for (h, g, d) in [(8, 4, 64), (8, 8, 128), (4, 1, 128)]
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_reference(attend, case, dtype):
    check(attend, case, dtype)


# Training calls: GQA 4 at head dim 128 (Qwen3-4B's shape), one key head per query head at 64, and the
# call where dropping the sink merge's gradient was measured (window 64, sink 16, 512 tokens: 1.5e-1 error).
GPU_GRADIENT_CASES = [
    Case(c.lengths, c.q_len, c.rule, c.prompt_end, heads=h, kv_heads=h // g, head_dim=d, packed=c.packed)
    for c in GRADIENT_CASES
    for (h, g, d) in [(8, 4, 128), (4, 1, 64)]
] + [
    Case((512,), None, LayerRule(64, sink=16), heads=8, kv_heads=2, head_dim=128),
    Case((512, 301), None, LayerRule(64, sink=16), heads=8, kv_heads=2, head_dim=64),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_GRADIENT_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_gradients_equal_reference(attend, case, dtype):
    check_gradients(attend, case, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c for c in GPU_CASES if c.q_len == 1 or c.rule.is_full], ids=str)
def test_sdpa_paths_equal_reference(case, dtype):
    query, key, value, plan, expected = make_inputs(case, device="cuda", dtype=dtype)
    reason = sdpa.refuses(Call(query, key, value, case.rule, plan))
    assert (reason is None) == takes(sdpa.BACKEND, case, expected.cpu()), reason
    if reason is None:
        check(sdpa.attend, case, dtype)


def dense_attention(query, key, value, mask, scaling):
    """The rules' plain attention at the inputs' precision over the expected ``mask`` (batch, q, k): the
    baseline of a path that is itself plain PyTorch attention."""
    return plain_attention(query, key, value, mask, scaling, dtype=query.dtype)[0].transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [c for c in GPU_CASES if c.q_len == 1], ids=str)
def test_a_decode_step_over_a_mask_is_as_exact_as_dense_attention(case, dtype):
    """A decode step whose token needs a mask runs ``reference.attend`` (PyTorch's fused attention over the
    plan's mask: cuDNN on Hopper), a runtime path on the GPU, so its baseline here is plain dense attention at
    the same precision, not itself."""
    check(reference.attend, case, dtype, baseline=dense_attention)


def long_case(length, rule, batch_lengths=None, q_len=None, prompt_end=None):
    lengths = batch_lengths or (length,)
    return Case(tuple(lengths), q_len, rule, prompt_end, heads=4, kv_heads=1, head_dim=128)


def blockwise_reference(query, key, value, plan, rule, scaling, rows=2048):
    """Float64 reference of long calls, a block of query rows at a time (the dense mask per block only)."""
    out = []
    for start in range(0, query.shape[2], rows):
        part = Plan(plan.query_pos[:, start : start + rows], plan.key_pos,
                      plan.query_generated[:, start : start + rows])
        o, _ = reference.attend(query[:, :, start : start + rows].double(), key.double(), value.double(), rule=rule,
                                plan=part, scaling=scaling)
        out.append(o)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("length", [4096, 32768])
@pytest.mark.parametrize("rule", [LayerRule(2048, 100), LayerRule(2048, 0), LayerRule(1000, 4), LayerRule(None)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequences(attend, rule, length):
    torch.manual_seed(0)
    batch, heads, kv_heads, d = 1, 4, 1, 128
    q = torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, length, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, length, d, device="cuda", dtype=torch.bfloat16)
    plan = plan_forward(batch_size=1, q_len=length, past_len=0, device=torch.device("cuda"))
    scaling = d**-0.5
    expected = blockwise_reference(q, k, v, plan, rule, scaling)
    output, _ = attend(q, k, v, rule=rule, plan=plan, scaling=scaling)
    relative_error = ((output.double() - expected).norm() / expected.norm()).item()
    assert relative_error < 1e-2, relative_error  # bf16 operands: between 1e-3 and 1e-2


def tiny_gpu_model(dtype=torch.bfloat16):
    """A tiny Qwen3 with head_dim 64 (FlexAttention wants 16 or more; the trimmed flash-attn build of
    benchmarks/build_flash_attn.sh has 64 and 128 only)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=61, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, eos_token_id=None, pad_token_id=0)
    return Qwen3ForCausalLM(config).to(dtype).cuda().eval()


@pytest.mark.parametrize("fields", [dict(window=3, sink=1, interleave=2), dict(window=4, fa_decode=False),
                                    dict(window=2, sink=2, fa_decode=[0, 2])], ids=str)
def test_generate_equal_across_backends(fields):
    """Every backend's generate (chunked prefill, padding, decode) and teacher-forced forward agree with the
    reference backend; logits are compared while a row's greedy tokens still agree (bf16 ties may differ)."""
    from tiny import left_padded

    ids, mask = left_padded([20, 13], total=20, seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    runs, forced = {}, {}
    for backend in ["reference", "flex", "flash", "auto"]:
        model = swaa.patch_model(tiny_gpu_model(), backend=backend, **fields)
        runs[backend] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True, prefill_chunk_size=7)
        sequence = runs["reference"].sequences
        full_mask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype, device="cuda")], dim=1)
        with torch.no_grad():
            forced[backend] = model(sequence, attention_mask=full_mask, prompt_len=mask.sum(1)).logits.float()
    real = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype, device="cuda")], dim=1).bool()
    for backend in runs:
        torch.testing.assert_close(forced[backend][real], forced["reference"][real], rtol=3e-2, atol=3e-2,
                                   msg=lambda m: f"{backend}, teacher forced: {m}")
        same_so_far = torch.ones(2, dtype=torch.bool, device="cuda")
        for step, logits in enumerate(runs[backend].logits):
            torch.testing.assert_close(logits[same_so_far], runs["reference"].logits[step][same_so_far], rtol=3e-2,
                                       atol=3e-2, msg=lambda m: f"{backend}, step {step}: {m}")
            same_so_far &= runs[backend].sequences[:, 20 + step] == runs["reference"].sequences[:, 20 + step]


def test_unpatch_flex_attention_model_is_bit_identical():
    model = tiny_gpu_model()
    model.set_attn_implementation("flex_attention")
    ids = torch.randint(1, 50, (1, 33), device="cuda")
    with torch.no_grad():
        before = model(ids).logits
        swaa.patch_model(model, window=4, sink=1)
        model(ids)
        swaa.unpatch_model(model)
        after = model(ids).logits
    assert torch.equal(before, after)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_generate_the_same_tokens():
    from tiny import left_padded

    ids, mask = left_padded([30, 21], total=30, seed=2)
    one = swaa.patch_model(tiny_gpu_model(torch.float32), window=5, sink=2, interleave=2)
    expected = one.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8, do_sample=False)
    model = tiny_gpu_model(torch.float32).cpu()
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    from accelerate import dispatch_model

    spread = swaa.patch_model(dispatch_model(model, device_map=device_map), window=5, sink=2, interleave=2)
    got = spread.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=8, do_sample=False)
    assert torch.equal(got.cpu(), expected.cpu())


def test_heads_below_flex_minimum_run_exactly_on_auto_and_are_refused_by_flex():
    """head_dim 8 (the CPU tests' tiny models): 'auto' takes the exact dense path for prompts instead of a
    FlexAttention kernel that cannot compile; backend='flex' says why it cannot run."""
    from tiny import left_padded, tiny_model

    ids, mask = left_padded([12, 7], total=12, seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    expected_model = swaa.patch_model(tiny_model("qwen3").float().cuda(), window=3, sink=1, backend="reference")
    expected = expected_model(ids, attention_mask=mask).logits
    model = swaa.patch_model(tiny_model("qwen3").float().cuda(), window=3, sink=1)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected)
    swaa.patch_model(model, window=3, sink=1, backend="flex")
    with pytest.raises(ValueError, match="head_dim 8 .* below FlexAttention's minimum of 16"):
        model(ids, attention_mask=mask)

"""Static cache and compiled decoding on the GPU (skipped without CUDA): what ``generate(...,
cache_implementation="static")`` compiles is exact (the eager path's tokens), has no graph breaks, no host
syncs, no recompilation over hundreds of steps and prompts of other lengths, and replays CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import Qwen3Config, Qwen3ForCausalLM

import swaa
from swaa.caches import SWAAStaticCache
from swaa.rules import layer_rules

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIGS = {
    "interleave2_fa_decode_sink": dict(window=48, sink=5, interleave=2),
    "every_layer_swa_bounded": dict(window=48, sink=5, fa_decode=False),
    "fa_decode_every_layer": dict(window=40, sink=3),
    "unbounded_no_fa_decode": dict(window=48, sink=5, fa_decode=False, bounded_cache=False),
    # backend="flex": FlexAttention for the prompt, the masked fused call for the decode steps (compiled)
    "interleave2_flex": dict(window=48, sink=5, interleave=2, backend="flex"),
}


def small_model(dtype=torch.float32, head_dim=64):
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096,
                         eos_token_id=None, bos_token_id=None, pad_token_id=0)
    with torch.device("cuda"):
        return Qwen3ForCausalLM(config).to(dtype).eval()


def prompts(lengths, total, seed):
    """Left-padded rows of the given real lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (len(lengths), total), generator=generator)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, total - length:] = 1
    return ids.masked_fill(mask == 0, 0).cuda(), mask.cuda()


def run(model, ids, mask, new, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          **kwargs)


@pytest.mark.parametrize("rows,head_dim", [((150, 97, 20), 64), ((150,), 128)], ids=["padded_batch3_d64", "batch1_d128"])
@pytest.mark.parametrize("config", CONFIGS)
def test_static_compiled_generate_equals_eager(config, rows, head_dim):
    """Windows shorter than the prompt, sinks, left padding, chunked prefill, one row (indices the compiler
    sees as constants): the compiled static path (transformers compiles the decode step and the prefill
    chunks) gives the eager dynamic path's tokens."""
    torch._dynamo.reset()
    model = small_model(head_dim=head_dim)
    swaa.patch_model(model, **CONFIGS[config])
    ids, mask = prompts(list(rows), 150, seed=1)
    eager = run(model, ids, mask, 40)
    compiled = run(model, ids, mask, 40, cache_implementation="static")
    chunked = run(model, ids, mask, 40, cache_implementation="static", prefill_chunk_size=64)
    assert torch.equal(eager, compiled) and torch.equal(eager, chunked)


def test_a_long_static_cache_of_an_odd_length_compiled_equals_eager():
    """A static cache mostly unwritten, of a length that is no multiple of 8: cuDNN's masked decode kernel."""
    torch._dynamo.reset()
    model = small_model()
    swaa.patch_model(model, **CONFIGS["interleave2_fa_decode_sink"])
    ids, mask = prompts([150, 97], 150, seed=5)
    assert torch.equal(run(model, ids, mask, 40),
                       run(model, ids, mask, 40, cache_implementation="static", max_cache_len=40 * 256 + 7))


def test_decode_step_has_no_graph_break_and_no_host_sync():
    model = small_model(torch.bfloat16)
    swaa.patch_model(model, window=48, sink=5, interleave=2, fa_decode=[0])
    ids, mask = prompts([100, 60], 100, seed=2)
    cache = SWAAStaticCache(layer_rules(swaa.get_config(model), 4), 160)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        token = out.logits[:, -1:].argmax(-1)
        full_mask = torch.nn.functional.pad(mask, (0, 60))
        full_mask[:, 100] = 1
        position = mask.sum(-1, keepdim=True)

        def step(token, full_mask, position):
            return model(token, attention_mask=full_mask, past_key_values=cache, position_ids=position).logits

        explanation = torch._dynamo.explain(step)(token, full_mask, position)
        assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
        compiled = torch.compile(step, fullgraph=True)
        compiled(token, full_mask, position)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                full_mask[:, 100 + _ + 1] = 1
                compiled(token, full_mask, position + _ + 1)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_512_steps_and_other_prompt_lengths_do_not_recompile_and_replay_cuda_graphs():
    torch._dynamo.reset()
    counters.clear()
    model = small_model(torch.bfloat16)
    swaa.patch_model(model, window=48, sink=5, interleave=2)
    first, _ = prompts([64], 64, seed=3)
    run(model, first, None, 8, cache_implementation="static", max_cache_len=1024)  # compiles and captures
    graphs = counters["stats"]["unique_graphs"]
    ids, _ = prompts([64], 64, seed=4)
    assert run(model, ids, None, 512, cache_implementation="static", max_cache_len=1024).shape[1] == 64 + 512
    assert counters["stats"]["unique_graphs"] == graphs, "512 steps recompiled"
    for length in (100, 333):
        ids, _ = prompts([length], length, seed=length)
        # a prompt of a new length compiles FlexAttention's prefill kernel for it (a graph of its own, the
        # prefill being eager): one token first, so that only the decode step could add graphs below
        run(model, ids, None, 1, cache_implementation="static", max_cache_len=1024)
        graphs = counters["stats"]["unique_graphs"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            run(model, ids, None, 16, cache_implementation="static", max_cache_len=1024)
        assert counters["stats"]["unique_graphs"] == graphs, f"a {length}-token prompt recompiled the decode step"
        launches = sum(event.count for event in profile.key_averages() if event.key == "cudaGraphLaunch")
        assert launches >= 15, f"{launches} CUDA graph replays"
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])

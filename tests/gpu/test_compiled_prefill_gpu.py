"""The compiled prefill on the GPU (skipped without CUDA): inductor's Triton kernels, FlexAttention and sdpa
inside one graph, in every family the GPU tests build: the eager prefill's tokens for prompts of one row, no
graph break, no recompilation for another prompt length; batches, padding and chunks take the eager prefill."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import swaa
from swaa import prefill
from tiny import left_padded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, eos_token_id=None,
              bos_token_id=None, pad_token_id=0)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_SHAPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_SHAPE, sliding_window=7)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_SHAPE, use_sliding_window=True, sliding_window=7)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_SHAPE)),
}
CONFIG = dict(window=48, sink=5, interleave=2)


def model_of(family):
    torch.manual_seed(0)
    with torch.device("cuda"):
        return FAMILIES[family]().float().eval()


def run(model, rows, total, seed, **kwargs):
    ids, mask = (tensor.cuda() for tensor in left_padded(rows, total, seed))
    return model.generate(ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False, **kwargs)


def pair(family):
    torch._dynamo.reset()
    counters.clear()
    prefill._compiled_forward.cache_clear()
    compiled, eager = model_of(family), model_of(family)
    swaa.patch_model(compiled, **CONFIG, compile_prefill=True)
    swaa.patch_model(eager, **CONFIG)
    return compiled, eager


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_of_one_row_gives_the_eager_tokens_in_one_graph(family):
    """Lengths 300 and 517 (the window's edge, sinks, a partial last FlexAttention block) in one graph."""
    compiled, eager = pair(family)
    assert torch.equal(run(compiled, [300], 300, 1), run(eager, [300], 300, 1))
    graphs = int(counters["stats"]["unique_graphs"])
    assert graphs >= 1 and not counters["graph_break"]
    assert torch.equal(run(compiled, [517], 517, 2), run(eager, [517], 517, 2))
    assert int(counters["stats"]["unique_graphs"]) == graphs


def test_batches_padding_and_later_chunks_take_the_eager_prefill():
    compiled, eager = pair("qwen3")
    for rows in ([300, 211, 40], [300, 300], [250]):
        assert torch.equal(run(compiled, rows, 300, 1), run(eager, rows, 300, 1))
    assert int(counters["stats"]["unique_graphs"]) == 0
    # chunks among a static cache's slots (generate then compiles its decode step, so no graph count here)
    static = dict(cache_implementation="static", prefill_chunk_size=128, max_cache_len=600)
    assert torch.equal(run(compiled, [300], 300, 1, **static), run(eager, [300], 300, 1, **static))

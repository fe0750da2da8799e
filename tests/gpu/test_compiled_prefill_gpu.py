"""The compiled prefill on the GPU (skipped without CUDA): inductor's Triton kernels, FlexAttention and sdpa
inside one graph per kind of call, in every family the GPU tests build: the eager prefill's tokens, with left
padding and chunks, no graph break, and no recompilation for another prompt length."""

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


def check(family, kinds):
    torch._dynamo.reset()
    counters.clear()
    prefill._compiled_forward.cache_clear()
    compiled, eager = model_of(family), model_of(family)
    swaa.patch_model(compiled, **CONFIG, compile_prefill=True)
    swaa.patch_model(eager, **CONFIG)
    # one row (plain: sdpa in the full layers) and a left-padded batch (flex everywhere)
    first = [(kind, rows, 300, 1) for kind in kinds for rows in ([300], [300, 211, 40])]
    later = [(kind, rows, 517, 2) for kind in kinds for rows in ([517], [517, 400, 130])]
    expected = [run(eager, rows, total, seed, **kind) for kind, rows, total, seed in first + later]
    counters.clear()
    tokens = [run(compiled, rows, total, seed, **kind) for kind, rows, total, seed in first]
    graphs = int(counters["stats"]["unique_graphs"])
    tokens += [run(compiled, rows, total, seed, **kind) for kind, rows, total, seed in later]
    assert all(torch.equal(got, want) for got, want in zip(tokens, expected))
    assert int(counters["stats"]["unique_graphs"]) == graphs  # other lengths, chunk counts: nothing new
    assert not counters["graph_break"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_whole_prompt_gives_the_eager_tokens_in_one_graph_per_batch_kind(family):
    check(family, [dict()])


def test_chunks_onto_a_static_cache_give_the_eager_tokens():
    """A static cache of one size throughout: generate's compiled decode step is not compiled again for the
    second length, so every new graph would be the prefill's."""
    check("qwen3", [dict(cache_implementation="static", prefill_chunk_size=128, max_cache_len=600)])

"""Tiny random models of each family the tests cover, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 61
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None, bos_token_id=None, pad_token_id=0,
    tie_word_embeddings=False,
)

FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON)),
    # A native sliding window smaller than the prompts: once patched, the SWAA config must rule instead.
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=3)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=3, max_window_layers=2)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=8)),
    # The grouped-mm experts kernel has no float64: the eager experts loop does.
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            **_COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            experts_implementation="eager",
        )
    ),
}


def tiny_model(family: str = "qwen3", seed: int = 0, dtype=torch.float64, **overrides):
    """A tiny model of ``family`` with random weights, in eval mode."""
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    for key, value in overrides.items():
        setattr(model.config, key, value)
    return model.to(dtype).eval()


def left_padded(batch_lengths, total, seed=0):
    """Random input_ids and a left-padding attention mask for rows of the given real lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(batch_lengths), total), generator=generator)
    mask = torch.zeros(len(batch_lengths), total, dtype=torch.long)
    for row, length in enumerate(batch_lengths):
        mask[row, total - length :] = 1
    return ids.masked_fill(mask == 0, 0), mask

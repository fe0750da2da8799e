"""What the tests build, shared: tiny random models of each family they cover, built from configs (no download),
their one config (``TINY_CONFIG``), inputs, and the two tokenizers (the library's byte-level chat tokenizer and
its model; a word-level tokenizer over ``tiny_model``'s vocabulary). ``tests/conftest.py`` hands them out as
fixtures where a test only needs one."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
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
    PreTrainedTokenizerFast,
)

import swaa.tiny

VOCAB = 61
TINY_CONFIG = dict(  # every tiny model's shape; tests that build one of another class start from it
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None, bos_token_id=None, pad_token_id=0,
    tie_word_embeddings=False,
)

FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)),
    # A native sliding window smaller than the prompts: once patched, the SWAA config must rule instead.
    "mistral": lambda: MistralForCausalLM(MistralConfig(**TINY_CONFIG, sliding_window=3)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY_CONFIG, use_sliding_window=True, sliding_window=3, max_window_layers=2)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY_CONFIG, head_dim=8)),
    # The grouped-mm experts kernel has no float64: the eager experts loop does.
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            **TINY_CONFIG, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            experts_implementation="eager",
        )
    ),
}


def tiny_model(family: str = "qwen3", seed: int = 0, dtype=torch.float64, **overrides):
    """A tiny model of ``family`` with random weights, in eval mode, float64: the tests' model. (``chat_model``
    is the library's, for a tokenizer's vocabulary.)"""
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


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``tiny_model``'s vocabulary: <pad>=0, <eos>=1, <unk>=2, w3 ... w60."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


chat_tokenizer = swaa.tiny.tiny_tokenizer  # one token per byte, role markers and a chat template
chat_model = swaa.tiny.tiny_model  # a tiny float32 Qwen3 whose vocabulary fits a chat_tokenizer

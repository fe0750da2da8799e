"""A tiny random Qwen3 and a byte-level tokenizer with a chat template, built in-process: a model folder to
try ``python -m swaa.eval`` on a CPU, offline, in seconds (random weights: accuracies near 0).

    python -m swaa.tiny ./tiny-model
    python -m swaa.eval --model ./tiny-model --synthetic needle --length 512 --num 2 --configs '{"window": 64}' \\
        --output /tmp/swaa-eval
"""

from __future__ import annotations

import argparse
import os

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True):
    """One token per byte, plus <pad>, <eos>, role markers and <think> </think> (not special, as in Qwen3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.add_tokens(["<|user|>", "<|system|>", "<|assistant|>"], special_tokens=True)
    tokenizer.add_tokens(["<think>", "</think>"])
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer, seed: int = 0, layers: int = 4):
    """A tiny Qwen3 with random weights whose vocabulary fits ``tokenizer``, float32, eval mode."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32768,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config).eval()


def save_tiny_model(folder: str | os.PathLike, seed: int = 0, layers: int = 4) -> str:
    """Write the tiny model and its tokenizer to ``folder`` with ``save_pretrained``; returns the folder."""
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer, seed, layers).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return os.fspath(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swaa.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to write the model and tokenizer (created if absent)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = save_tiny_model(args.folder, args.seed, args.layers)
    print(f"tiny Qwen3 and tokenizer written to {folder}; try:\n"
          f"    python -m swaa.eval --model {folder} --synthetic needle --length 512 --num 2"
          """ --configs '{"window": 64}' --output /tmp/swaa-eval""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

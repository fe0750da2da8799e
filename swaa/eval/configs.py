"""The configs a grid compares: full attention first, and a short readable name for each. ``None`` stands for
full attention (the unpatched model); ``swaa.config.load_config_list`` reads the lists."""

from __future__ import annotations

from ..config import SWAAConfig, load_config_list

FULL_ATTENTION = "full attention"
RECOMMENDED = {"window": 2048, "sink": 100, "interleave": 2}  # the README's starting point (Which strategy to pick)
parse_configs = load_config_list  # the name swaa.eval first exported for the config-list reader


def with_baseline(configs: list[SWAAConfig | None]) -> list[SWAAConfig | None]:
    """Full attention first (exactly once), then the SWAA configs in their order, duplicates dropped."""
    seen = [None]
    for config in configs:
        if config not in seen:
            seen.append(config)
    return seen


def covers_every_key(config: SWAAConfig, longest_prompt: int, max_new_tokens: int) -> bool:
    """Whether ``config``'s window reaches every earlier token of prompts of at most ``longest_prompt`` tokens and
    ``max_new_tokens`` generated ones: its attention is then full attention's. With FA decode on in every SWA
    layer only the prompt's queries use the window."""
    return config.window >= longest_prompt + (0 if config.fa_decode is True else max_new_tokens)


def config_name(config: SWAAConfig | None) -> str:
    """A short name: "full attention", "SWA 2048 + FA decode + sink 100 + full 1::2"."""
    if config is None:
        return FULL_ATTENTION
    parts = [f"SWA {config.window}"]
    if config.fa_decode is True:
        parts.append("FA decode")
    elif config.fa_decode:
        parts.append(f"FA decode {list(config.fa_decode)}")
    if config.sink:
        parts.append(f"sink {config.sink}")
    if config.interleave is not None:
        parts.append(f"full {config.interleave_offset}::{config.interleave}")
    elif config.full_attention_layers:
        parts.append(f"full {list(config.full_attention_layers)}")
    if config.backend != "auto":
        parts.append(config.backend)
    return " + ".join(parts)

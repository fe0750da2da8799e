"""The list of SWAA configs a grid compares: parsing (objects, inline JSON, JSON or YAML files, the authors'
settings lists) and short readable names. ``None`` stands for full attention (the unpatched model)."""

from __future__ import annotations

import json
import os

from ..config import SWAAConfig, load_config_list

FULL_ATTENTION = "full attention"


def config_from_entry(entry, index: int = 0) -> SWAAConfig | None:
    """One entry: a SWAAConfig, None, a dict of our or the authors' fields, or ``{"swaa_config": {...}}``.
    The authors' ``sliding_window_size: null`` means full attention, as do ``"full"`` and ``None``."""
    if entry is None or isinstance(entry, SWAAConfig):
        return entry
    if isinstance(entry, str) and entry.strip().lower() in ("full", "full attention", "none", "null"):
        return None
    if isinstance(entry, dict):
        if "swaa_config" in entry:
            return config_from_entry(entry["swaa_config"], index)
        if "sliding_window_size" in entry and entry["sliding_window_size"] is None:
            return None
        try:
            return SWAAConfig.from_dict(entry)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config {index}: {error}") from None
    raise ValueError(
        f"config {index}: {entry!r}: must be a dict of SWAAConfig fields (window, sink, interleave, ...),"
        " a SWAAConfig, or None / 'full' for full attention"
    )


def parse_configs(configs) -> list[SWAAConfig | None]:
    """A list of configs from a list (or one entry), inline JSON text, or a .json / .yaml / .yml file."""
    if isinstance(configs, (str, os.PathLike)):
        text = os.fspath(configs)
        stripped = text.strip()
        if stripped[:1] in ("[", "{"):
            try:
                configs = json.loads(stripped)
            except json.JSONDecodeError as error:
                raise ValueError(f"configs: inline JSON does not parse ({error.msg} at char {error.pos})") from None
        elif stripped.lower() in ("full", "none", "null"):
            configs = [None]
        elif not os.path.exists(text):
            raise ValueError(f"configs={text!r}: neither inline JSON nor an existing .json/.yaml file")
        elif text.lower().endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"configs={text!r}: reading YAML needs pyyaml (pip install pyyaml)") from None
            with open(text, encoding="utf-8") as file:
                configs = yaml.safe_load(file)
        elif text.lower().endswith(".json"):
            return load_config_list(text)
        else:
            raise ValueError(f"configs={text!r}: unknown file type; allowed: .json, .yaml, .yml")
    if isinstance(configs, (dict, SWAAConfig)) or configs is None:
        configs = [configs]
    return [config_from_entry(entry, index) for index, entry in enumerate(configs)]


def with_baseline(configs: list[SWAAConfig | None]) -> list[SWAAConfig | None]:
    """Full attention first (exactly once), then the SWAA configs in their order, duplicates dropped."""
    seen = [None]
    for config in configs:
        if config not in seen:
            seen.append(config)
    return seen


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

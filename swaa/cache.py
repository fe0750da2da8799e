"""KV caches for patched models.

A patched model always gets a plain ``DynamicCache`` that keeps every token, whatever sliding window its
own config declares (Mistral-style configs would otherwise drop keys that FA decode still needs).
"""

from __future__ import annotations

from transformers import DynamicCache

from .rules import LayerRule


def new_cache(rules: tuple[LayerRule, ...]) -> DynamicCache:
    """An empty cache for a model patched with ``rules``."""
    return DynamicCache()

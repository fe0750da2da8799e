"""Attention backends: each computes exactly the SWAA rule for one layer, and says when it cannot run.

A backend is a function ``attend(query, key, value, *, rule, layout, scaling, dropout, need_weights)``
returning ``(output, weights)``; see ``reference.attend`` for the shapes. Backends know nothing about
models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from . import reference

logger = logging.getLogger("swaa")
_announced: set = set()


def _announce(name: str, device: torch.device, why: str) -> None:
    if (name, device.type) not in _announced:
        _announced.add((name, device.type))
        logger.info("swaa: attention backend %r on %s (%s)", name, device.type, why)


def check_available(name: str, device: torch.device) -> None:
    """Raise if backend ``name`` cannot run on ``device``: never fall back to another pattern silently."""
    if name in ("flash", "flex") and device.type != "cuda":
        raise RuntimeError(
            f"backend={name!r} cannot run on {device.type}: it needs a CUDA GPU; use backend='reference' or 'auto'"
        )


def select(name: str, device: torch.device, need_weights: bool) -> Callable:
    """The attend function for backend ``name`` on ``device``; "auto" picks the fastest exact path."""
    if need_weights and name not in ("auto", "reference"):
        raise ValueError(f"output_attentions=True needs backend='reference' (or 'auto'); backend={name!r} returns no weights")
    if name == "auto":
        _announce("reference", device, "auto: the exact dense path")
        return reference.attend
    if name == "reference":
        _announce(name, device, "requested")
        return reference.attend
    check_available(name, device)
    raise NotImplementedError(f"backend={name!r} is not implemented yet")

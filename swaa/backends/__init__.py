"""Attention backends: each computes exactly the SWAA rule for one layer, and says when it cannot run.

A backend is a function ``attend(query, key, value, *, rule, plan, scaling, dropout, need_weights)``
returning ``(output, weights)``; see ``reference.attend`` for the shapes. Backends know nothing about
models. ``select`` picks one per call; "auto" takes the fastest exact path measured on the device; "flex"
runs FlexAttention on calls of several queries and auto's path on decode steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..plan import Plan
from ..rules import LayerRule
from . import flash, flex, reference, sdpa

logger = logging.getLogger("swaa")
_announced: set = set()


def _announce(name: str, device: torch.device, why: str) -> None:
    if torch.compiler.is_compiling():  # a log call would break the compiled graph; eager calls say it
        return
    if (name, device.type, why) not in _announced:
        _announced.add((name, device.type, why))
        logger.info("attention backend %r on %s (%s)", name, device.type, why)


def check_available(name: str, device: torch.device) -> None:
    """Raise if backend ``name`` cannot run on ``device``: never fall back to another pattern silently."""
    works_here = "'auto' or 'flex'" if device.type == "cuda" else "'auto' or 'reference'"
    if name == "flex" and device.type != "cuda":
        raise RuntimeError(f"backend='flex' cannot run on {device.type}: it needs a CUDA GPU; use backend={works_here}")
    if name == "flash" and (reason := flash.available(device)):
        raise RuntimeError(f"backend='flash' cannot run on {device.type}: {reason}; use backend={works_here}")


def select(name: str, query: torch.Tensor, value: torch.Tensor, rule: LayerRule, plan: Plan,
           need_weights: bool) -> Callable:
    """The attend function for backend ``name`` and this call."""
    device = query.device
    if need_weights and name not in ("auto", "reference"):
        raise ValueError(f"output_attentions=True needs backend='reference' (or 'auto'); {name!r} returns no weights")
    if name == "reference" or (name == "auto" and (device.type != "cuda" or need_weights)):
        _announce("reference", device, "requested" if name == "reference" else "auto: exact dense path")
        return reference.attend
    check_available(name, device)
    if name == "flash":
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "backend='flash' plans its FA2 calls on the host and cannot run in a compiled step; use backend="
                "'auto' or 'flex' for compiled decoding (generate with cache_implementation='static')"
            )
        return flash.attend
    if name == "flex" and query.shape[2] > 1:
        return flex.attend
    # auto, and a decode step (one query per row) under flex: FlexAttention's decoding kernel read a half-written
    # static cache of 128k slots in 525 us on an H200 (the grouped matrix products swaa used then took 350), and
    # inductor (torch 2.11) failed to build it inside a compiled decode step
    if sdpa.handles(query, rule, plan):
        _announce("sdpa", device, f"{name}: the query sees every key, no mask needed")
        return sdpa.attend
    if query.shape[2] == 1:
        _announce("reference", device, f"{name}: one query per row with a mask, fused attention over the mask")
        return reference.attend
    if reason := flex.unsupported(query, value):
        _announce("reference", device, f"auto: {reason}")
        return reference.attend
    _announce("flex", device, "auto: window, sinks, padding and cache slots in one block-sparse kernel")
    return flex.attend

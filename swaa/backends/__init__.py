"""Attention backends: each computes exactly the SWAA rule for one layer, and declares when it cannot.

Each backend is one module of this package holding an ``attend`` function and a ``BACKEND`` record
(``base.Backend``): its name, its place in auto's order, why it cannot run on a device, why it does not take
a call. ``select`` walks the records and decides nothing itself:

- ``backend="auto"``: the first record in order that can run here and takes the call. The reference takes
  every call, last.
- a named backend: that record. A device it cannot run on, or a call it does not take, is an error with its
  reason; never a silent switch to another backend. The one exception is declared on the record:
  ``prefill_only`` backends hand decode steps to auto's path (every backend is exact, so the pattern is
  the same).

``SWAAConfig.backend`` accepts "auto" and the names of the records marked ``nameable``.

How to add a backend:

1. Write ``swaa/backends/<name>.py`` with ``attend(query, key, value, *, rule, plan, scaling, dropout=0.0,
   need_weights=False) -> (output, weights)`` (shapes and conventions: ``reference.attend``) and at its end
   ``BACKEND = Backend(name=..., order=..., attend=attend, unavailable=..., refuses=...)``. ``unavailable``
   says why it cannot run on a device; ``refuses`` why it does not take a ``Call`` (weights, dropout, dtype,
   head_dim, gradients, a mask it cannot apply...): each reason said there and nowhere else; ``attend``
   checks nothing. See ``base.Backend`` for the other fields.
2. Add its module name to ``_MODULES`` below: one line.
3. tests/test_backends.py runs it on every kernel case it takes, against the float64 reference, and asserts
   that it refuses the others; say which those are in ``tests/kernel_cases.takes`` (by default: none).
"""

from __future__ import annotations

import importlib
import logging

import torch

from .base import Backend, Call

_MODULES = (  # one line per backend module; the records give the order
    "sdpa",
    "flex",
    "flash",
    "windowed",
    "reference",
)

RECORDS: tuple[Backend, ...] = tuple(sorted(
    (importlib.import_module(f"{__name__}.{module}").BACKEND for module in _MODULES), key=lambda record: record.order
))
NAMES: tuple[str, ...] = ("auto", *(record.name for record in RECORDS if record.nameable))  # SWAAConfig.backend

logger = logging.getLogger("swaa")
_announced: set = set()

__all__ = ["NAMES", "RECORDS", "Backend", "Call", "check_available", "get", "select"]


def get(name: str) -> Backend:
    """The record named ``name`` (nameable or not)."""
    for record in RECORDS:
        if record.name == name:
            return record
    raise ValueError(f"no attention backend {name!r}; registered: {', '.join(r.name for r in RECORDS)}")


def _announce(record: Backend, device: torch.device, why: str) -> None:
    if torch.compiler.is_compiling():  # a log call would break the compiled graph; eager calls say it
        return
    if (record.name, device.type, why) not in _announced:
        _announced.add((record.name, device.type, why))
        logger.info("attention backend %r on %s (%s)", record.name, device.type, why)


def _runs_here(device: torch.device) -> str:
    names = ["auto", *(r.name for r in RECORDS if r.nameable and not r.unavailable(device))]
    return ", ".join(map(repr, names[:-1])) + f" or {names[-1]!r}" if len(names) > 1 else repr(names[0])


def check_available(name: str, device: torch.device) -> None:
    """Raise if backend ``name`` cannot run on ``device`` at all (checked when a model is patched)."""
    if name != "auto" and (reason := get(name).unavailable(device)):
        raise RuntimeError(f"backend={name!r} cannot run on {device.type}: {reason}; use backend={_runs_here(device)}")


def _auto(call: Call) -> Backend:
    for record in RECORDS:
        if record.auto and not record.refusal(call):
            return record
    reasons = "; ".join(f"{r.name}: {r.refusal(call)}" for r in RECORDS if r.auto)
    raise RuntimeError(f"no attention backend takes this call ({reasons})")


def select(name: str, call: Call) -> Backend:
    """The record whose ``attend`` runs ``call`` under ``SWAAConfig.backend == name``."""
    if name == "auto":
        record = _auto(call)
        _announce(record, call.device, f"auto: {record.about}")
        return record
    record = get(name)
    check_available(name, call.device)
    if call.q_len == 1 and record.prefill_only:
        chosen = _auto(call)
        _announce(chosen, call.device, f"{name} hands decode steps to auto's path: {chosen.about}")
        return chosen
    if reason := record.refusal(call):
        takers = [r.name for r in RECORDS if r.nameable and not r.refusal(call)]
        raise ValueError(
            f"backend={name!r} does not take this call: {reason}; backends that do: 'auto', "
            + ", ".join(map(repr, takers))
        )
    _announce(record, call.device, "requested")
    return record

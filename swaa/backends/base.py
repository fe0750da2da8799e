"""What a backend declares about itself (``Backend``) and what it is asked about (``Call``).

Kept apart from the package's ``__init__`` so that each backend module can import these without importing
the registry that imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..plan import Plan
from ..rules import LayerRule


class Call(NamedTuple):
    """One layer's attention call, as a backend's ``refuses`` sees it (a named tuple: a compiled step traces
    it without a graph break).

    query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim); rule and plan
    as ``attend`` gets them; dropout: the attention dropout probability; need_weights: the caller wants the
    attention weights (``output_attentions=True``); compiling: the call runs inside ``torch.compile``. A
    backend without a backward refuses where ``torch.is_grad_enabled()`` and a tensor ``requires_grad``.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    rule: LayerRule
    plan: Plan
    dropout: float = 0.0
    need_weights: bool = False
    compiling: bool = False

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def q_len(self) -> int:
        """Queries per row: 1 for a decode step."""
        return self.query.shape[2]


def _runs_anywhere(device: torch.device) -> None:
    return None


def _takes_every_call(call: Call) -> None:
    return None


@dataclass(frozen=True)
class Backend:
    """A backend's declaration: the registry (``swaa.backends``) reads nothing else about it.

    name: what ``SWAAConfig.backend`` says to ask for it (when ``nameable``), and what the log names.
    order: ``backend='auto'`` tries the backends in increasing order and takes the first that can run
        here and takes the call; ``auto=False`` keeps it out of that walk (it runs only when named).
    attend: ``attend(query, key, value, *, rule, plan, scaling, dropout=0.0, need_weights=False)`` ->
        ``(output (batch, q_len, heads, head_dim), weights (batch, heads, q_len, kv_len) or None)``; exact
        on every call that ``unavailable`` and ``refuses`` let through (it checks nothing itself).
    unavailable: ``(device) -> str | None``: why it cannot run on this device at all, None when it can.
    refuses: ``(Call) -> str | None``: why it does not take this call (dtype, head_dim, dropout, weights
        requested, a mask it cannot apply...), None when it takes it. Every reason is said once, here.
    uncompilable: None, or why it cannot run inside a ``torch.compile``'d forward; also what
        ``SWAAConfig(compile_prefill=True)`` refuses it for.
    prefill_only: None, or why a decode step (one query per row) runs auto's path even when this backend is
        named: named, it serves the calls of several queries. No pattern changes: every backend is exact.
    nameable: a value of ``SWAAConfig.backend``; False for a path that only ``auto`` picks.
    auto: ``auto`` may pick it.
    about: what the log says when ``auto`` picks it (why it is fast here).
    """

    name: str
    order: int
    attend: Callable
    unavailable: Callable[[torch.device], str | None] = _runs_anywhere
    refuses: Callable[[Call], str | None] = _takes_every_call
    uncompilable: str | None = None
    prefill_only: str | None = None
    nameable: bool = True
    auto: bool = True
    about: str = ""

    def refusal(self, call: Call) -> str | None:
        """Why this backend does not run ``call``, None when it does: every check a record declares, in one
        place (device, compiling, decode steps, then the backend's own ``refuses``)."""
        if reason := self.unavailable(call.device):
            return reason
        if call.compiling and self.uncompilable:
            return self.uncompilable
        if call.q_len == 1 and self.prefill_only:
            return f"decode steps run auto's path: {self.prefill_only}"
        return self.refuses(call)

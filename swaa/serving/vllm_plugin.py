"""swaa as a vLLM plugin: a model whose config has ``swaa`` attends by swaa's rule in every layer, exactly; any
other model is left to vLLM.

vLLM runs ``register`` in each of its processes (front end, engine core, workers) through the
``vllm.general_plugins`` entry point ``swaa``. Everything that knows vLLM is in ``vllm_adapter``; this module
holds what the plugin decides, in swaa's own terms: which rule each layer follows, whether requests' prompt
lengths are needed, and the attention of one request's new tokens over its keys, through the per-forward plan
(``swaa.plan``) and the dense reference backend, as a patched transformers model computes it.
"""

from __future__ import annotations

import torch

from ..backends import reference
from ..config import SWAAConfig
from ..plan import plan_forward
from ..rules import LayerRule, layer_rules


def register() -> None:
    """The entry point vLLM calls in each process."""
    from . import vllm_adapter

    vllm_adapter.register()


def checkpoint_rules(hf_config, num_layers: int) -> tuple[LayerRule, ...] | None:
    """One rule per layer from the checkpoint's ``config.swaa``, or None for a model swaa does not serve."""
    data = getattr(hf_config, "swaa", None)
    if data is None:
        return None
    return layer_rules(SWAAConfig.from_dict(dict(data)), num_layers)


def needs_prompt_lengths(rules: tuple[LayerRule, ...]) -> bool:
    """FA decode makes a query's keys depend on whether it is a prompt or a generated token."""
    return any(rule.fa_decode and not rule.is_full for rule in rules)


def request_attention(rule: LayerRule, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      prompt_len: int, scaling: float) -> torch.Tensor:
    """One request's attention under ``rule``: ``query`` (q_len, heads, d) holds its newest tokens, ``keys`` and
    ``values`` (seq_len, kv_heads, d) every token so far, the queries' own included; tokens at positions
    ``prompt_len`` and beyond are generated. Returns (q_len, heads, d)."""
    q_len, seq_len = query.shape[0], keys.shape[0]
    plan = plan_forward(batch_size=1, q_len=q_len, past_len=seq_len - q_len, device=query.device,
                        generate=prompt_len)
    output, _ = reference.attend(query.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                 values.transpose(0, 1)[None], rule=rule, plan=plan, scaling=scaling)
    return output[0]

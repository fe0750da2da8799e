"""The compiled prefill (``SWAAConfig.compile_prefill``): the decoder's forward over a prompt of one row runs
through ``torch.compile`` with dynamic shapes.

An option, off by default: on an H200 (Qwen3-4B shape, 36 layers) the first prompt costs about 3 minutes of
compilation, and prompts then reach their first token 20-25% sooner at 16k, 10-25% at 128k
(docs/performance.md).

transformers compiles only the decode step (one query, static shapes) and runs the prompt eagerly, where the
model outside attention (norms, rotary, activations, residual adds: one kernel each, each reading and writing
every token's states) costs as much as its matrix products at long contexts. Compiled, those fuse.

Only the calls checked against the eager prefill on a GPU compile: one row that holds one sequence, no
padding, no packed sequences, no keys before it (a whole prompt, or a chunked prompt's first chunk:
``compiles``). On an H200 (torch 2.11) the same graph gave a left-padded batch of three rows logits 0.12 away
from the eager forward's while single plain rows matched to 4e-7; the cause is not found, and the CPU's kernels
give the eager logits in every case. Batches of several rows, padding, the later chunks of a prompt
(``prefill_chunk_size``) and continued caches run the eager forward: the same attention.

One compiled forward per decoder class and process (``torch.compile`` of the class's forward, ``dynamic=True``)
serves every prompt length, cache kind and instance of the class: lengths are symbolic, and the weights are the
graph's inputs. Kinds of call compile once each (a dynamic or a static cache, a prompt shorter than one
FlexAttention block of 128 tokens); ``RECOMPILE_LIMIT`` leaves room for them (torch's default of 8 is shared by
every transformers forward, which run one decorator's code). Inside it, swaa's attention runs as in the eager
forward (the plan is built before, by the patch's pre-hook; the backends build their masks from it in the
graph), so the result is the eager forward's. Forwards that record gradients (training) and single-query steps
(decoding, which ``generate`` compiles itself with a static cache) stay eager.
"""

from __future__ import annotations

import functools

import torch

from .attention import CONTEXT_KWARG
from .caches import mark_fixed_addresses
from .compat import cache_argument


# A ring layer's cache write has no user but the graph's output, and reads the keys; moved later, it keeps them
# alive. inductor's locality pass moved every layer's write next to the output (+13 GiB at 128k on a 36-layer
# model); its horizontal fusion joined each layer's write to the next layer's (they share the write index: with
# CPU kernels, 8 layers of 1024 tokens peaked at 1.6x the eager forward, 16 layers at 1.9x). Neither runs here:
# kernels fuse horizontally only if they share 1 GiB or more (such a fusion saves one read of what they share).
COMPILE_OPTIONS = {"dynamic": True,
                   "options": {"reorder_for_locality": False, "score_fusion_memory_threshold": 1 << 30}}
RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_forward(decoder_type: type):
    return torch.compile(decoder_type.forward, **COMPILE_OPTIONS)


def compiles(plan) -> bool:
    """Whether the forward ``plan`` describes, under the current grad mode, takes the compiled forward (when the
    patch asks for it): one plain row with no keys before its queries, no gradients, not inside another
    compiled call."""
    rows, queries = plan.query_pos.shape
    if rows != 1 or queries == 1 or plan.kv_len != queries or torch.is_grad_enabled():
        return False
    return not torch.compiler.is_compiling() and plan.plain()


def decoder_forward(decoder: torch.nn.Module, state, *args, **kwargs):
    """Installed as the decoder's ``forward`` (after the patch's pre-hook, which put the plan in ``kwargs``)."""
    plan = kwargs[CONTEXT_KWARG].plan
    if not compiles(plan):
        return type(decoder).forward(decoder, *args, **kwargs)
    plan.any_generated()  # looked at once here, as the eager forward does (plain() by compiles): full layers keep sdpa
    # no duck sizing: a prompt as long as another size of the first call (a static cache's slots) is not that size
    # (each equal pair seen at the first compilation would become a guard, and another length a recompilation)
    with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)), \
            torch.fx.experimental._config.patch(use_duck_shape=False):
        output = _compiled_forward(type(decoder))(decoder, *args, **kwargs)
    mark_fixed_addresses(cache_argument(kwargs))  # a fresh static cache's layers were made inside the graph
    return output

"""The compiled prefill (``SWAAConfig.compile_prefill``): the decoder's forward over several queries (a prompt,
a chunk of one, a scoring forward) runs through ``torch.compile`` with dynamic shapes.

An option, off by default: on an H200 (Qwen3-4B shape, 36 layers) the first prompt costs about 3 minutes of
compilation, and prompts then reach their first token 20-25% sooner at 16k, 11-23% at 128k
(docs/performance.md).

transformers compiles only the decode step (one query, static shapes) and runs the prompt eagerly, where the
model outside attention (norms, rotary, activations, residual adds: one kernel each, each reading and writing
every token's states) costs as much as its matrix products at long contexts. Compiled, those fuse.

One compiled forward per decoder class and process (``torch.compile`` of the class's forward, ``dynamic=True``)
serves every prompt length, chunk size, cache length and instance of the class: lengths are symbolic, and the
weights are the graph's inputs. Kinds of call compile once each: a whole prompt, a first and a later chunk, a
dynamic or a static cache, one row or several (torch specializes sizes of 1), a prompt shorter than one
FlexAttention block (128 tokens); ``RECOMPILE_LIMIT`` leaves room for all of them (torch's default of 8 is
shared by every transformers forward, which run one decorator's code). Inside it, swaa's attention runs as in
the eager forward (the plan is built before, by the patch's pre-hook; the backends build their masks from it in
the graph), so the result is the eager forward's. Forwards that record gradients (training) and single-query
steps (decoding, which ``generate`` compiles itself with a static cache) stay eager.
"""

from __future__ import annotations

import functools

import torch

from .attention import CONTEXT_KWARG


# inductor's locality pass moves a node next to its first user; a ring layer's cache write has none but the graph's
# output, so it moved every layer's write to the end, and every layer's keys and values stayed alive until then
# (+13 GiB at 128k on a 36-layer model). Without the pass each layer's keys are freed with the layer.
COMPILE_OPTIONS = {"dynamic": True, "options": {"reorder_for_locality": False}}
RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_forward(decoder_type: type):
    return torch.compile(decoder_type.forward, **COMPILE_OPTIONS)


def runs_compiled(query_count: int) -> bool:
    """Whether a forward of ``query_count`` queries per row, under the current grad mode, takes the compiled
    forward (when the patch asks for it)."""
    return query_count > 1 and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def decoder_forward(decoder: torch.nn.Module, state, *args, **kwargs):
    """Installed as the decoder's ``forward`` (after the patch's pre-hook, which put the plan in ``kwargs``)."""
    if not runs_compiled(kwargs[CONTEXT_KWARG].plan.query_pos.shape[1]):
        return type(decoder).forward(decoder, *args, **kwargs)
    # a chunk's positions and mask are slices of the whole prompt's: contiguous, their strides do not differ
    # between the first chunk and the next (each difference would be one more compiled variant)
    kwargs = {name: value.contiguous() if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    plan = kwargs[CONTEXT_KWARG].plan
    plan.plain(), plan.any_generated()  # looked at once here, as the eager forward does: plain full layers keep sdpa
    # no duck sizing: a batch of 2 is not the model's 2 KV heads, nor a chunk of 16 a cache of 16 (each equal pair
    # seen at the first compilation would become a guard, and another chunk size a recompilation)
    with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)), \
            torch.fx.experimental._config.patch(use_duck_shape=False):
        return _compiled_forward(type(decoder))(decoder, *args, **kwargs)

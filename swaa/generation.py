"""What a patch changes in ``generate``: the cache it makes, and where its prompt ends.

Inside ``generate`` every token handed to it is a prompt token and every token it produces is generated.
swaa learns the boundary where ``generate`` itself does, and hands it to the decoder as a forward keyword
argument (``plan.GENERATE_KWARG``), never on the model or the cache, so concurrent calls and copies each
keep their own:

- ``_prefill`` (every decoding loop but assisted decoding reads its prompt there, in one forward or in
  chunks): while it runs, ``Prefill()``: every token is prompt, virtual tokens added on the way (peft's
  prompt learning) included; after it, the cache index where generated tokens start is the number of slots
  read so far: the cache's length, or the slots of the one forward without a cache.
- assisted decoding has no prefill (its first forward checks candidates too): the boundary is the length of
  the prompt ``generate`` got, set once the candidate generator has copied generate's arguments (an assistant
  must not get swaa's argument).

The wrapped methods are in ``compat.GENERATION_METHODS``; ``InstanceMethod`` puts them on one instance.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from . import compat
from .caches import SWAAStaticCache, check_cache, new_cache
from .plan import GENERATE_ADVICE, GENERATE_KWARG, Prefill, check_one_sequence_per_row

CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")  # what swaa's caches honour exactly


class InstanceMethod:
    """A function installed as a method of one model instance (``patch`` sets it as an attribute), called with
    the model and its patch state, and bound in a way that survives ``copy.deepcopy`` (bound to the copy) and
    pickling (bound to the loaded model)."""

    __slots__ = ("function", "model", "state")

    def __init__(self, function, model, state):
        self.function, self.model, self.state = function, model, state

    def __call__(self, *args, **kwargs):
        return self.function(self.model, self.state, *args, **kwargs)


def prepare_cache_for_generation(model, state, generation_config, model_kwargs: dict, generation_mode, *args):
    """transformers makes the cache for ``generate`` here: make it swaa's. A dynamic cache is bounded where
    exact (never when the call rolls back, as assisted decoding does); a static one comes from
    ``prepare_static_cache``; one passed by the user is checked."""
    implementation = generation_config.cache_implementation
    if implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"cache_implementation={implementation!r}: swaa runs exactly on {CACHE_IMPLEMENTATIONS[1:]} (or None,"
            " the default dynamic cache); offloaded, quantized, paged and model-specific caches are not supported"
        )
    keeps_every_key = compat.rolls_back(generation_config, generation_mode) or not state.config.bounded_cache
    type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, generation_mode, *args)
    cache = compat.cache_argument(model_kwargs)
    made_here = cache is not None and not compat.is_user_cache(cache)
    if type(cache) is DynamicCache and made_here:
        compat.set_cache_argument(model_kwargs, new_cache(state.rules, not keeps_every_key))
    elif isinstance(cache, SWAAStaticCache) and cache.ring is not None and keeps_every_key and made_here:
        # allocated at its first forward (a chunked prefill may then compile once more)
        compat.set_cache_argument(model_kwargs, SWAAStaticCache(state.rules, cache.get_max_length(), False))
    elif cache is not None:
        check_cache(cache, state.rules, needed=generation_config.max_length - 1)


def get_candidate_generator(model, state, *args, **kwargs):
    """Assisted decoding makes its candidate generator (which copies generate's arguments for the assistant),
    then checks prompt + candidates in one forward: generated tokens start at the prompt's length."""
    method = compat.peft_prompt_learning(model)
    if method is not None:
        raise ValueError(
            f"assisted decoding with peft's {method}: its virtual tokens enter the cache in the same forward as the"
            " first candidates, so swaa cannot tell where the prompt ends; generate without an assistant"
        )
    candidate_generator = type(model)._get_candidate_generator(model, *args, **kwargs)
    input_ids, model_kwargs = compat.candidate_generator_arguments(args, kwargs)
    model_kwargs[GENERATE_KWARG] = torch.full((input_ids.shape[0], 1), input_ids.shape[1], dtype=torch.long,
                                              device=input_ids.device)
    return candidate_generator


def prepare_static_cache(model, state, cache_implementation: str, batch_size: int, max_cache_len: int,
                         prefill_chunk_size: int | None, model_kwargs: dict):
    """``cache_implementation="static"``: swaa's static cache, sized as transformers sizes its own (at least the
    largest size asked for so far, so that a compiled step is reused across calls)."""
    max_cache_len = compat.remember_static_cache_length(model, max_cache_len)
    cache = SWAAStaticCache(state.rules, max_cache_len, state.config.bounded_cache)
    # chunks may run compiled: allocate now, as transformers does
    if prefill_chunk_size is not None and (shape := compat.static_cache_shape(model)) is not None:
        cache.early_initialization(batch_size, *shape, model.dtype, model.device)
    return cache


def prefill(model, state, input_ids: torch.Tensor, generation_config, model_kwargs: dict, *args, **kwargs):
    """generate reads its prompt: every token is prompt; afterwards generated tokens start where it ended.
    Position ids passed to generate are checked here, once: its chunks may run compiled, without looking."""
    position_ids = model_kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor):
        mask = model_kwargs.get("attention_mask")  # None when every token is real
        real = torch.ones_like(position_ids, dtype=torch.bool) if mask is None else mask.bool()
        check_one_sequence_per_row(position_ids, real[:, -position_ids.shape[-1]:], GENERATE_ADVICE)
    reading = model_kwargs[GENERATE_KWARG] = Prefill()
    outputs = type(model)._prefill(model, input_ids, generation_config, model_kwargs, *args, **kwargs)
    cache = compat.cache_argument(model_kwargs)
    end = int(cache.get_seq_length()) if cache is not None else reading.slots
    model_kwargs[GENERATE_KWARG] = torch.full((input_ids.shape[0], 1), end, dtype=torch.long, device=input_ids.device)
    return outputs


def refuse_attention_switch(model, state, *args, **kwargs):
    raise ValueError(
        f"{type(model).__name__} is patched by swaa, which owns its attention implementation: call"
        " swaa.unpatch_model(model) first, then set_attn_implementation"
    )


def refuse_continuous_batching(model, state, *args, **kwargs):
    raise NotImplementedError(
        "transformers' continuous batching (generate_batch, init_continuous_batching, transformers serve"
        " --continuous-batching) runs attention through its own paged cache, which swaa does not patch yet:"
        " use model.generate on a batch (left padded), or swaa.unpatch_model(model) for full attention"
    )


# name on the model -> the function installed there
INSTALLED = {
    "_prepare_cache_for_generation": prepare_cache_for_generation,
    "_prepare_static_cache": prepare_static_cache,
    "_prefill": prefill,
    "_get_candidate_generator": get_candidate_generator,
    "set_attn_implementation": refuse_attention_switch,
    **{name: refuse_continuous_batching for name in compat.CONTINUOUS_BATCHING_METHODS},
}

"""Every place swaa touches transformers' internals (and peft's), so that the next rename is one file.

- the cache argument's name (``past_key_values`` until transformers 5.24, ``cache`` since);
- the private generation methods swaa wraps on a patched instance (``GENERATION_METHODS``) and the public
  ones it refuses (continuous batching);
- private model attributes: attention backend support, the default cache, the static cache's shape, the
  attention implementation field of a config;
- source and signature inspection of a layer's forward;
- whether a forward runs inside transformers' generation loop, and peft's prompt learning inside it.

``tests/test_compat.py`` lists these touch points and checks each against the installed transformers.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
from collections.abc import Mapping

from transformers import GenerationMixin, cache_utils
from transformers.generation import utils as generation_utils
from transformers.generation.configuration_utils import GenerationMode

# --------------------------------------------------------------------------------- the cache argument

# transformers 5.24 renamed the cache argument of forward and generate (and the outputs' field) from
# `past_key_values` to `cache`, still accepting the old name; swaa reads either and writes the name the
# receiver takes: generate's (the installed version's) or, for a forward, that forward's own.
CACHE_NAMES = ("cache", "past_key_values")


def cache_kwarg(function) -> str:
    """The name under which ``function`` (a forward, or generate's input preparation) takes its cache."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


CACHE_KWARG = cache_kwarg(GenerationMixin.prepare_inputs_for_generation)


def cache_argument(kwargs: Mapping):
    """The cache handed to a forward or ``generate`` (or held by an output), under either name."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def set_cache_argument(kwargs: dict, cache, name: str = CACHE_KWARG) -> None:
    for other in CACHE_NAMES:
        kwargs.pop(other, None)
    kwargs[name] = cache


def stores_nothing(layer) -> bool:
    """A cache layer with no keys of its own (transformers 5.2x's ``DummyLayer``: a layer without attention, a
    consumer of another layer's shared keys, Dory's read-only view of another layer)."""
    dummy = getattr(cache_utils, "DummyLayer", None)
    return dummy is not None and isinstance(layer, dummy)


def layer_read(layer):
    """The cache layer a layer that stores nothing reads its keys from (Dory's ``DoryPastReader.layer``), or None."""
    return getattr(layer, "layer", None)


def is_user_cache(cache) -> bool:
    """Whether ``generate`` got this cache from its caller (it marks such caches) rather than making it."""
    return bool(getattr(cache, "_is_user_defined", False))


# ------------------------------------------------------------------------------- generation internals

# Private methods of GenerationMixin that swaa wraps on a patched instance, with the arguments it relies on
# (the same in transformers 5.17 to 5.25): where generate makes its cache, where it makes a static one, where
# it reads the prompt (every path but assisted decoding), and where assisted decoding sets up its assistant.
GENERATION_METHODS = {
    "_prepare_cache_for_generation": ("generation_config", "model_kwargs", "generation_mode"),
    "_prepare_static_cache": ("cache_implementation", "batch_size", "max_cache_len", "prefill_chunk_size",
                              "model_kwargs"),
    "_prefill": ("input_ids", "generation_config", "model_kwargs"),
    "_get_candidate_generator": ("input_ids", "model_kwargs"),
}
# Public entry points of transformers' continuous batching, which runs attention through its own paged cache.
CONTINUOUS_BATCHING_METHODS = ("generate_batch", "init_continuous_batching", "continuous_batching_context_manager")
# Where packed sequences start, as DataCollatorWithFlattening(return_flash_attn_kwargs=True) hands them to FA2.
PACKED_LENGTHS_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k")


def rolls_back(generation_config, generation_mode) -> bool:
    """Whether this generate call crops its cache after rejected tokens (assisted decoding, or the model is
    itself the assistant), so the cache must keep every token."""
    return generation_mode == GenerationMode.ASSISTED_GENERATION or bool(getattr(generation_config, "is_assistant", False))


def remember_static_cache_length(model, max_cache_len: int) -> int:
    """The static cache length transformers would use (the largest asked for so far on this model, so that a
    compiled step is reused across calls), recorded as transformers records it."""
    max_cache_len = max(max_cache_len, getattr(model, "_previous_max_cache_length", -1))
    model._previous_max_cache_length = max_cache_len
    return max_cache_len


def static_cache_shape(model):
    """(kv heads, head dim) for allocating a static cache before the first forward, or None."""
    return model._get_static_cache_init_shape()


@functools.cache
def _generation_files() -> frozenset:
    folder = os.path.dirname(generation_utils.__file__)
    return frozenset(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".py"))


def inside_generation() -> bool:
    """Whether the caller runs inside transformers' generation code (``generate`` and its loops): a forward
    found there without swaa's boundary comes from a ``generate`` swaa does not control."""
    files = _generation_files()
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename in files:
            return True
        frame = frame.f_back
    return False


def candidate_generator_arguments(args: tuple, kwargs: dict) -> tuple:
    """(input_ids, model_kwargs) of a ``_get_candidate_generator`` call, however they were passed."""
    bound = inspect.signature(GenerationMixin._get_candidate_generator).bind(None, *args, **kwargs).arguments
    return bound["input_ids"], bound["model_kwargs"]


def peft_prompt_learning(model) -> str | None:
    """The peft method adding virtual tokens to this ``generate`` call (peft's generate puts its own input
    preparation on the base model while it runs), or None."""
    prepare = model.__dict__.get("prepare_inputs_for_generation")
    owner = getattr(prepare, "__self__", None)
    config = getattr(owner, "active_peft_config", None)
    if owner is None or not type(owner).__module__.startswith("peft") or not getattr(config, "is_prompt_learning", False):
        return None
    return str(config.peft_type)


# ------------------------------------------------------------------------------------- model internals


def set_attention_implementation(config, name: str) -> None:
    """Set a config's attention implementation without transformers' checks (swaa registers its own)."""
    config._attn_implementation_internal = name


def attention_implementation(config) -> str | None:
    return config._attn_implementation


def supports_attention_interface(model) -> bool:
    """Whether ``model`` computes attention through transformers' AttentionInterface (and may switch it)."""
    return bool(model._supports_attention_backend and model._can_set_attn_implementation())


def supports_default_dynamic_cache(model) -> bool:
    return getattr(type(model), "_supports_default_dynamic_cache", lambda: True)()


def drops_queries_before_shared_layers(model) -> bool:
    """Whether the model's decoder runs its KV-shared layers on the last tokens' queries only (Gemma 4 from
    transformers 5.2x, ``_maybe_slice_kv_shared_inputs``), slicing the masks it was handed as 4D masks."""
    return getattr(model.config.get_text_config(), "num_kv_shared_layers", 0) > 0 and any(
        hasattr(module, "_maybe_slice_kv_shared_inputs") for module in model.modules())


@functools.cache
def forward_source(module_type: type) -> str | None:
    """The source of ``module_type.forward``, or None where there is none to read (built at run time)."""
    try:
        return inspect.getsource(module_type.forward)
    except (OSError, TypeError):
        return None


def drops_kwargs(module_type: type) -> bool:
    """Whether ``module_type.forward`` takes no ``**kwargs`` or never passes them to a call (read from its
    source: a layer that drops them would run attention without swaa's context)."""
    var_keyword = next((p.name for p in inspect.signature(module_type.forward).parameters.values()
                        if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_keyword is None:
        return True
    source = forward_source(module_type)  # without a source, assume it hands them on
    return source is not None and source.count(f"**{var_keyword}") < 2  # the signature's, and a call's


def makes_its_own_mask(module_type: type) -> bool:
    """Whether ``module_type.forward`` hands the attention function a mask other than the ``attention_mask`` it
    was given (read from its source, as Doge's dynamic mask: ``attention_interface(..., attention_mask=attn_mask)``)."""
    calls = re.findall(r"attention_interface\((.*?)\)\n", forward_source(module_type) or "", flags=re.S)
    return any(argument != "attention_mask" for call in calls
               for argument in re.findall(r"attention_mask\s*=\s*(\w+)", call))


# Names under which an attention forward takes states other than its own tokens' to attend to.
_OTHER_KEYS = ("cross_attention_states", "encoder_hidden_states", "key_value_states", "kv_states")


def attends_to_other_states(module) -> bool:
    """Whether the attention ``module`` is a cross-attention module: its keys are not the text's own tokens.

    A module that records which it is when built is taken at its word: GPT-2's and GPTBigCode's attention class
    serves both, with ``is_cross_attention`` set on the second module a layer gets under ``add_cross_attention``,
    while its forward takes ``encoder_hidden_states`` either way. Otherwise its class name or its forward's
    parameters for other states to attend to say it."""
    declared = getattr(module, "is_cross_attention", None)
    if isinstance(declared, bool):
        return declared
    module_type = type(module)
    parameters = inspect.signature(module_type.forward).parameters
    return "CrossAttention" in module_type.__name__ or any(name in parameters for name in _OTHER_KEYS)

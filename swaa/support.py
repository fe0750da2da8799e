"""Which model families swaa may patch, and where their decoder is: one place for a family's support or refusal.

``check_supported`` refuses, before anything changes, every model whose attention swaa's rules cannot follow
exactly (encoder-decoders, multimodal and hybrid models, cross-attention, bidirectional layers, masks a model
builds itself, soft-capping, learned sinks...), each with the reason; what it asks of transformers' classes
goes through ``compat``. A new family is supported, or refused, here.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from . import compat

ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}  # swaa replaces all three


def check_supported(model: PreTrainedModel) -> int:
    """Raise if swaa cannot patch ``model`` exactly, naming what it has that swaa cannot follow; return its
    number of layers."""
    name = type(model).__name__
    config = model.config
    if config.is_encoder_decoder:
        raise ValueError(f"{name} is an encoder-decoder model; swaa patches decoder-only language models")
    if config.get_text_config() is not config:
        raise ValueError(f"{name} is a multimodal model; swaa patches text decoder models only")
    other_layers = sorted(set(getattr(config, "layer_types", None) or []) - ATTENTION_LAYER_TYPES)
    if other_layers:  # first: a hybrid's reason, before transformers' flag that it has no AttentionInterface
        raise ValueError(
            f"{name} has layers of type {other_layers}, which swaa's rules do not cover: linear attention and"
            " convolutions keep a state swaa's caches do not hold, sparse-attention indexers choose keys themselves"
        )
    if not compat.supports_attention_interface(model):
        raise ValueError(
            f"{name} ({config.model_type}) does not compute attention through transformers' AttentionInterface,"
            " so swaa cannot replace it"
        )
    num_layers = getattr(config, "num_hidden_layers", None)
    attention_modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    cross = sorted({m.layer_idx for m in attention_modules if compat.attends_to_other_states(m)})
    if cross:
        raise ValueError(
            f"{name} has cross-attention layers {cross}: their keys are not the text's own tokens (an image's or an"
            " encoder's states), and swaa's rule is defined over the text's positions; swaa cannot patch it"
        )
    attention_layers = {module.layer_idx for module in attention_modules}
    if not num_layers or attention_layers != set(range(num_layers)):
        raise ValueError(
            f"{name}: could not match its attention modules {sorted(attention_layers)} to its"
            f" num_hidden_layers={num_layers}; swaa cannot tell which layer is which"
        )
    layers = [m for m in model.modules() if any(child in attention_modules for child in m.children())]
    dropping = next((type(m).__name__ for m in [*layers, *attention_modules] if compat.drops_kwargs(type(m))), None)
    if dropping:
        raise ValueError(
            f"{name}: {dropping}.forward does not hand its keyword arguments on, so swaa's per-call context"
            " (positions, padding, prompt boundary) cannot reach its attention"
        )
    own_mask = next((type(m).__name__ for m in attention_modules if compat.makes_its_own_mask(type(m))), None)
    if own_mask:
        raise ValueError(
            f"{name}: {own_mask} hands attention a mask it builds itself (a learned bias or a key selection),"
            " which swaa's rules would replace"
        )
    bidirectional = [type(m).__name__ for m in model.modules() if getattr(m, "is_causal", True) is False]
    if bidirectional:
        raise ValueError(f"{name} has bidirectional attention ({bidirectional[0]}); swaa patches causal decoders")
    if compat.drops_queries_before_shared_layers(model):
        raise ValueError(
            f"{name} runs its KV-shared layers (num_kv_shared_layers={config.num_kv_shared_layers}) on the last"
            " tokens' queries only, slicing its masks by query, which swaa's per-forward plan and 2D masks do not"
            " follow; swaa cannot patch it with this transformers version"
        )
    if not compat.supports_default_dynamic_cache(model):
        raise ValueError(f"{name} keeps a cache of its own, which swaa's caches cannot stand in for")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"{name} soft-caps its attention logits (attn_logit_softcapping={config.attn_logit_softcapping}),"
            " which swaa's kernels do not implement"
        )
    learned_sinks = [type(m).__name__ for m in model.modules() if isinstance(getattr(m, "sinks", None), torch.Tensor)]
    if learned_sinks:
        raise ValueError(f"{name} has learned attention sinks ({learned_sinks[0]}), which swaa does not implement")
    return num_layers


def decoder_of(model: PreTrainedModel) -> torch.nn.Module:
    """The module that holds the layers: its forward gets swaa's hooks, and a model head around it passes its
    labels down. Some heads are their own ``base_model`` (Llama4ForCausalLM): their decoder is then the one
    child model they hold."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, torch.nn.Module) or decoder is model:
        decoder = model.base_model
    children = [child for child in model.children() if isinstance(child, PreTrainedModel)]
    return children[0] if decoder is model and len(children) == 1 else decoder

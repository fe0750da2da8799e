"""A patch is all or nothing, belongs to one model, and refuses bad input up front."""

from __future__ import annotations

import json
import warnings

import numpy
import pytest
import torch
from tiny import TINY_CONFIG, chat_tokenizer, left_padded, tiny_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

import swaa
from swaa import SWAAConfig


def snapshot(model):
    """What a patch may change: attention implementations, hooks, instance attributes, config objects."""
    return (
        [(m.config._attn_implementation, id(m.config)) for m in model.modules() if hasattr(m, "config")],
        [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
        sorted(vars(model)), getattr(model.config, "swaa", None),
    )


def gemma2():
    config = Gemma2Config(**{**TINY_CONFIG, "head_dim": 8}, attn_logit_softcapping=50.0)
    return Gemma2ForCausalLM(config).double().eval()


class LayerThatDropsKwargs(LlamaDecoderLayer):
    """A decoder layer that calls its attention without the keyword arguments it was given (as Nemotron's)."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                     position_embeddings=position_embeddings, past_key_values=past_key_values)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def drops_kwargs():
    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).double().eval()
    for layer in model.model.layers:
        layer.__class__ = LayerThatDropsKwargs
    return model


class MaskMakingAttention(LlamaAttention):
    """An attention module that hands the attention function a mask of its own (as Doge's learned dynamic mask)."""

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        bias = attention_mask + self.o_proj.weight.mean()  # information swaa's rules would drop
        attention_interface = lambda *args, **kw: (hidden_states, None)  # noqa: E731 - never reached
        output, weights = attention_interface(self, hidden_states, hidden_states, hidden_states, attention_mask=bias, **kwargs)
        return output, weights


def makes_its_own_mask():
    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).double().eval()
    for layer in model.model.layers:
        layer.self_attn.__class__ = MaskMakingAttention
    return model


@pytest.mark.parametrize("make,call,message", [
    (tiny_model, dict(window=0), "window=0"),
    (tiny_model, dict(windw=16), "unknown SWAA config field"),
    (tiny_model, dict(window=4, backend="flex"), "backend='flex' cannot run on cpu"),
    (tiny_model, dict(window=4, interleave=2, interleave_offset=4), "interleave_offset=4"),
    (tiny_model, dict(window=4, full_attention_layers=[9]), "do not exist"),
    (gemma2, dict(window=4), "attn_logit_softcapping=50.0"),
    (drops_kwargs, dict(window=4), "LayerThatDropsKwargs.forward does not hand its keyword arguments on"),
    (makes_its_own_mask, dict(window=4), "MaskMakingAttention hands attention a mask it builds itself"),
], ids=["bad_value", "unknown_field", "backend", "offset_beyond_depth", "layer_beyond_depth", "softcapping",
        "layer_drops_kwargs", "attention_makes_its_own_mask"])
@pytest.mark.parametrize("patched_before", [False, True], ids=["fresh", "patched_before"])
def test_a_refused_patch_leaves_the_model_as_it_was(make, call, message, patched_before):
    model = make()
    if patched_before and make is tiny_model:
        swaa.patch_model(model, window=3, sink=1)
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        swaa.patch_model(model, **call)
    assert snapshot(model) == before


def test_two_models_built_from_one_config_object_are_patched_apart():
    config = LlamaConfig(**TINY_CONFIG)
    torch.manual_seed(0)
    first, second = LlamaForCausalLM(config).double().eval(), LlamaForCausalLM(config).double().eval()
    ids, mask = left_padded([9, 5], total=9, seed=40)
    expected = second(ids, attention_mask=mask).logits
    swaa.patch_model(first, window=2, sink=1)
    assert not swaa.is_patched(second) and getattr(second.config, "swaa", None) is None
    torch.testing.assert_close(second(ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
    swaa.patch_model(second, window=3)
    swaa.unpatch_model(first)
    assert swaa.get_config(second) == SWAAConfig(window=3)
    second(ids, attention_mask=mask)  # still patched and running


def test_a_bare_decoder_without_generate_is_patched_whole():
    model = LlamaModel(LlamaConfig(**TINY_CONFIG)).double().eval()
    ids, mask = left_padded([9, 5], total=9, seed=41)
    full = model(ids, attention_mask=mask).last_hidden_state
    swaa.patch_model(model, window=2)
    assert swaa.is_patched(model) and "generate" not in vars(model)
    assert not torch.allclose(model(ids, attention_mask=mask).last_hidden_state, full)
    swaa.unpatch_model(model)
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, full, rtol=0, atol=0)


def test_integer_like_fields_become_ints_and_survive_save(tmp_path):
    config = SWAAConfig(window=numpy.int64(8), sink=numpy.int32(2), interleave=numpy.int64(2))
    assert type(config.window) is int and type(config.sink) is int and type(config.interleave) is int
    model = swaa.patch_model(tiny_model("qwen3"), window=numpy.int64(8))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["swaa"]["window"] == 8


@pytest.mark.parametrize("prompt_len", [-1, 2.5, [3, 4, 5], True, "5", [None, 1], 2**70, [2**70, 1]], ids=str)
def test_bad_prompt_len_is_named(prompt_len):
    model = swaa.patch_model(tiny_model("qwen3"), window=2, sink=1)
    ids, mask = left_padded([6, 4], total=6, seed=42)
    with pytest.raises(ValueError, match="prompt_len="):
        model(ids, attention_mask=mask, prompt_len=prompt_len)


def test_labels_without_a_masked_prompt_warn_that_training_is_full_attention():
    """A plain language-model collator masks padding (or each packed sequence's first token) and no prompt:
    the FA-decode layers then train full attention, which is said; a masked prompt is not warned about."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening

    model = swaa.patch_model(tiny_model("qwen3"), window=2, sink=1).train()
    tokenizer = chat_tokenizer()
    tokenizer.pad_token_id = 0  # inside the tiny model's vocabulary
    examples = [{"input_ids": list(range(5, 5 + n))} for n in (8, 5)]
    for side in ("right", "left"):
        tokenizer.padding_side = side
        with pytest.warns(UserWarning, match="mask the prompt as -100"):
            model(**DataCollatorForLanguageModeling(tokenizer, mlm=False)(examples))
    flattened = DataCollatorWithFlattening()([{**e, "labels": e["input_ids"]} for e in examples], return_tensors="pt")
    with pytest.warns(UserWarning, match="mask the prompt as -100"):
        model(**flattened)
    ids = torch.randint(5, 50, (2, 8), generator=torch.Generator().manual_seed(43))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids, labels=ids.masked_fill(torch.arange(8) < 2, -100))


def test_state_api_and_the_scoped_patch():
    model = tiny_model("qwen3")
    assert not swaa.is_patched(model) and swaa.get_config(model) is None
    with swaa.patched(model, window=3, sink=1) as inside:
        assert inside is model and swaa.get_config(model) == SWAAConfig(window=3, sink=1)
    assert not swaa.is_patched(model)
    swaa.patch_model(model, window=5)
    with pytest.raises(RuntimeError, match="boom"), swaa.patched(model, window=2):
        raise RuntimeError("boom")
    assert swaa.get_config(model) == SWAAConfig(window=5)


def test_a_model_that_makes_its_own_attention_mask_is_refused_not_silently_changed(monkeypatch):
    """A model that adds a bias (or selects keys) in the mask it hands its attention: swaa's rule would drop
    that information, so the call fails instead of returning something else."""
    from transformers.models.qwen3 import modeling_qwen3

    forward = modeling_qwen3.Qwen3Attention.forward

    def with_a_bias(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask[:, None, None, :].to(hidden_states.dtype) * 0.5  # a "learned" bias
        return forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)

    monkeypatch.setattr(modeling_qwen3.Qwen3Attention, "forward", with_a_bias)
    model = swaa.patch_model(tiny_model("qwen3"), window=2, sink=1)
    ids, mask = left_padded([6, 4], total=6, seed=44)
    with pytest.raises(NotImplementedError, match="mask of its own making"):
        model(ids, attention_mask=mask)


def test_labels_reach_the_decoder_of_a_model_that_is_its_own_base_model():
    """Llama4ForCausalLM is its own base_model: its labels must still say where answers start."""
    from test_family_sweep import tiny as tiny_family

    model = tiny_family("llama4_text")
    assert model.base_model is model
    swaa.patch_model(model, window=2, sink=1).train()
    ids = torch.randint(3, 60, (1, 10), generator=torch.Generator().manual_seed(45))
    labels = ids.masked_fill(torch.arange(10) < 6, -100)
    assert model(ids, labels=labels).loss.isfinite()

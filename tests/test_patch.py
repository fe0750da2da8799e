"""patch_model / unpatch_model: in place, reversible, saved with checkpoints, loud on what it cannot do."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from reference import logits as reference_logits
from reference import reference_model
from tiny import left_padded, tiny_model
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, T5Config, T5ForConditionalGeneration

import swaa


def forward_logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


# flex_attention is covered in tests/gpu: on the CPU transformers' own flex path differs between two calls.
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_unpatch_is_bit_identical_to_never_patched(implementation):
    model = tiny_model("qwen3", dtype=torch.float32)
    model.set_attn_implementation(implementation)
    ids, mask = left_padded([8, 5], total=8)
    before = forward_logits(model, ids, mask)
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    swaa.patch_model(model, window=2, sink=1, interleave=2)
    assert not torch.allclose(forward_logits(model, ids, mask), before)
    swaa.unpatch_model(model)
    assert model.config._attn_implementation == implementation
    assert torch.equal(forward_logits(model, ids, mask), before)
    assert not hasattr(model.config, "swaa") and "generate" not in model.__dict__
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())


def test_patch_never_changes_weights():
    model = tiny_model("llama")
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    swaa.patch_model(model, window=3)
    model.generate(torch.ones(1, 5, dtype=torch.long), max_new_tokens=3)
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize(
    "fields",
    [dict(window=64), dict(window=2, sink=64, fa_decode=False), dict(window=2, full_attention_layers=[0, 1, 2, 3]),
     dict(window=1, interleave=1, interleave_offset=0)],
    ids=["window_longer_than_sequence", "sink_longer_than_sequence", "every_layer_listed_full", "interleave_1"],
)
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_no_effective_window_equals_the_unpatched_model(family, fields):
    model = tiny_model(family)
    ids, mask = left_padded([12, 7], total=12, seed=3)
    before = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
    swaa.patch_model(model, **fields)
    after = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    assert torch.equal(before.sequences, after.sequences)
    for old, new in zip(before.logits, after.logits):
        torch.testing.assert_close(new, old, rtol=1e-9, atol=1e-9)


def test_save_and_reload_reapplies_the_config(tmp_path):
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=3, sink=1, interleave=2, interleave_offset=0, fa_decode=[1, 3])
    ids, mask = left_padded([9, 6], total=9)
    expected = forward_logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.config.swaa == model.config.swaa
    swaa.patch_model(loaded)
    torch.testing.assert_close(forward_logits(loaded, ids, mask), expected, rtol=0, atol=0)


def test_patch_without_config_and_nothing_saved_says_what_to_do():
    with pytest.raises(ValueError, match=r"re-applies the config saved in model.config.swaa, and this model has none"):
        swaa.patch_model(tiny_model("qwen3"))


def test_patching_again_replaces_the_config():
    model = tiny_model("qwen3")
    ids, mask = left_padded([9, 6], total=9)
    swaa.patch_model(model, window=2)
    swaa.patch_model(model, window=4, sink=1)
    twice = forward_logits(model, ids, mask)
    fresh = tiny_model("qwen3")
    swaa.patch_model(fresh, window=4, sink=1)
    assert torch.equal(twice, forward_logits(fresh, ids, mask))
    assert model.config.swaa["window"] == 4
    assert len(model.base_model._forward_pre_hooks) == 1  # the first patch's hooks are gone
    # docs/rules.md, "Patching a patched model": fields alone make the whole new config, nothing carries over;
    # the current config with one field changed is patch_model(model, swaa.get_config(model), field=...)
    swaa.patch_model(model, swaa.get_config(model), interleave=2)
    assert swaa.get_config(model) == swaa.SWAAConfig(window=4, sink=1, interleave=2)
    swaa.patch_model(model, window=4)
    assert swaa.get_config(model) == swaa.SWAAConfig(window=4)
    swaa.unpatch_model(model)  # the original attention, not an earlier config
    assert not hasattr(model.config, "swaa") and not swaa.is_patched(model)
    assert torch.equal(forward_logits(model, ids, mask), forward_logits(tiny_model("qwen3"), ids, mask))


def test_config_object_dict_and_field_overrides():
    model = tiny_model("qwen3")
    swaa.patch_model(model, swaa.SWAAConfig(window=5, sink=2), sink=3)
    assert model.config.swaa["sink"] == 3 and model.config.swaa["window"] == 5
    swaa.patch_model(model, {"sliding_window_size": 5, "keep_first": 2, "non_sliding_layers": [1, 3, 5, 7]})
    assert "layers [1, 3]: full attention" in swaa.describe(model)


def test_unpatch_restores_a_saved_config_that_was_there_before(tmp_path):
    model = tiny_model("qwen3")
    model.config.swaa = {"window": 7}
    swaa.patch_model(model)
    swaa.patch_model(model, window=3)
    swaa.unpatch_model(model)
    assert model.config.swaa == {"window": 7}


class _NoInterfaceModel(PreTrainedModel):
    config_class = PretrainedConfig

    def __init__(self):
        super().__init__(PretrainedConfig(num_hidden_layers=1))
        self.linear = torch.nn.Linear(2, 2)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: torch.nn.Linear(2, 2), TypeError, "swaa patches transformers models (PreTrainedModel); got Linear"),
        (lambda: T5ForConditionalGeneration(T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=4, vocab_size=8)),
         ValueError, "T5ForConditionalGeneration is an encoder-decoder model"),
        (_NoInterfaceModel, ValueError, "does not compute attention through transformers' AttentionInterface"),
    ],
    ids=["not_transformers", "encoder_decoder", "no_attention_interface"],
)
def test_unsupported_models_are_named(make, error, message):
    with pytest.raises(error, match=_escaped(message)):
        swaa.patch_model(make(), window=4)


def _escaped(text):
    import re

    return re.escape(text)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: swaa.patch_model(m, window=0), ValueError, "window=0: must be an int from 1 to 2**63 - 1"),
        (lambda m: swaa.patch_model(m, window=4, full_attention_layers=[2, 7]), ValueError,
         "layer(s) [7] do not exist; this model has layers 0..3"),
        (lambda m: swaa.patch_model(m, window=4, interleave=2, full_attention_layers=[1]), ValueError,
         "give one or the other"),
        (lambda m: swaa.patch_model(m, window=4, backend="cuda"), ValueError, "backend='cuda': must be one of"),
        (lambda m: swaa.patch_model(m, window=4, backend="flash"), RuntimeError,
         "backend='flash' cannot run on cpu: FA2 needs a CUDA GPU, not cpu"),
        (lambda m: swaa.patch_model(m, window=4, backend="flex"), RuntimeError,
         "backend='flex' cannot run on cpu: it needs a CUDA GPU"),
        (lambda m: swaa.patch_model(m, config=[4]), TypeError, "config must be a SWAAConfig or a dict, got list"),
        (lambda m: swaa.patch_model(m, config=4), TypeError, "config must be a SWAAConfig or a dict, got int"),
        (lambda m: swaa.unpatch_model(m), ValueError, "is not patched by swaa; nothing to unpatch"),
    ],
    ids=["window", "layer_out_of_range", "interleave_and_list", "unknown_backend", "flash_on_cpu", "flex_on_cpu",
         "config_list", "config_int", "unpatch_unpatched"],
)
def test_bad_input_names_field_value_and_what_is_allowed(call, error, message):
    model = tiny_model("qwen3")
    with pytest.raises(error, match=_escaped(message)):
        call(model)
    assert not swaa.is_patched(model)  # a failed patch leaves the model untouched


def test_prepared_4d_mask_is_refused():
    model = swaa.patch_model(tiny_model("qwen3"), window=3)
    with pytest.raises(ValueError, match="swaa builds its own masks from a 2D padding mask"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 1, 4, 4))


def test_mask_that_does_not_cover_the_cache_is_refused():
    model = swaa.patch_model(tiny_model("qwen3"), window=3)
    out = model(torch.ones(1, 4, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match=r"needs a 2D padding mask of shape \(batch, cached \+ new tokens\) = \(1, 5\)"):
        model(torch.ones(1, 1, dtype=torch.long), attention_mask=torch.ones(1, 1), past_key_values=out.past_key_values)


def test_output_attentions_are_exact():
    model = swaa.patch_model(tiny_model("qwen3"), window=3, sink=1, interleave=2)
    ids, mask = left_padded([7, 4], total=7)
    out = model(ids, attention_mask=mask, output_attentions=True)
    generated = torch.zeros(2, 7, dtype=torch.bool)
    from reference import layer_masks

    masks = layer_masks(mask, generated, 4, dict(window=3, sink=1, interleave=2))
    for layer, weights in enumerate(out.attentions):
        assert torch.equal(weights[:, 0] > 0, masks[layer])
        real = mask.bool()
        torch.testing.assert_close(weights.sum(-1)[real[:, None].expand_as(weights.sum(-1))], torch.ones(()).double()
                                   .expand(int(real.sum()) * 4))


def test_causality_probe():
    """Changing token t+1 changes no logit at positions <= t."""
    model = swaa.patch_model(tiny_model("mistral"), window=3, sink=1, interleave=2)
    ids, mask = left_padded([10], total=10, seed=8)
    for t in range(9):
        changed = ids.clone()
        changed[0, t + 1] = (changed[0, t + 1] % 50) + 1
        a, b = forward_logits(model, ids, mask), forward_logits(model, changed, mask)
        assert torch.equal(a[:, : t + 1], b[:, : t + 1])
        assert not torch.equal(a[:, t + 1 :], b[:, t + 1 :])


def test_teacher_forced_labels_mark_where_answers_start():
    """Labels with the prompt masked as -100 give the same logits as prompt_len, and as generate."""
    fields = dict(window=3, sink=1, interleave=3)
    model = tiny_model("qwen3")
    ref = reference_model(model)
    swaa.patch_model(model, **fields)
    ids, mask = left_padded([12, 9], total=12, seed=9)
    prompt_len = torch.tensor([8, 4])
    labels = ids.clone().masked_fill(mask == 0, -100)
    generated = torch.zeros_like(mask, dtype=torch.bool)
    for row, length in enumerate(prompt_len):
        pad = int((mask[row] == 0).sum())
        labels[row, : pad + length] = -100
        generated[row, pad + length :] = True
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate builds them; the reference uses the same
    by_labels = model(ids, attention_mask=mask, position_ids=position_ids, labels=labels).logits
    by_length = model(ids, attention_mask=mask, position_ids=position_ids, prompt_len=prompt_len).logits
    expected = reference_logits(ref, ids, mask, generated, fields)
    real = mask.bool()
    torch.testing.assert_close(by_length[real], expected[real], rtol=1e-9, atol=1e-9)
    # with labels, transformers hands out float32 logits
    torch.testing.assert_close(by_labels[real], expected[real].to(by_labels.dtype), rtol=1e-5, atol=1e-5)


def test_training_with_fa_decode_and_no_boundary_is_an_error():
    model = swaa.patch_model(tiny_model("qwen3"), window=3).train()
    with pytest.raises(ValueError, match="training with fa_decode .* needs to know where each answer starts"):
        model(torch.ones(1, 6, dtype=torch.long))
    swaa.patch_model(model, window=3, fa_decode=False)
    model(torch.ones(1, 6, dtype=torch.long))  # no FA decode: nothing to know


def test_import_initialises_no_cuda_and_no_optional_package():
    code = (
        "import sys, torch, swaa\n"
        "assert not torch.cuda.is_initialized()\n"
        "heavy = [m for m in ('flash_attn', 'peft', 'matplotlib', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dir_lists_the_public_api_before_its_first_use():
    code = "import swaa\nassert set(swaa.__all__) <= set(dir(swaa)), dir(swaa)\n"  # tab completion reads dir()
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attn_implementation_swaa_alone_says_to_call_patch_model(tmp_path):
    """``from_pretrained(..., attn_implementation="swaa")`` patches nothing: the first forward says what to do
    (swaa registers its name as soon as it is imported beside transformers)."""
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path)
    code = (
        "import sys, torch, transformers, swaa\n"
        f"model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, attn_implementation='swaa')\n"
        "try:\n"
        "    model(torch.ones(1, 4, dtype=torch.long))\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "call swaa.patch_model(model)" in result.stdout, result.stderr[-2000:]

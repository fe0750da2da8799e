"""peft LoRA on a patched model: either order, training, generate, merge_and_unload, and saving."""

from __future__ import annotations

import json

import peft  # the [test] extra installs it
import pytest
import torch
from tiny import left_padded, tiny_model
from transformers import AutoModelForCausalLM

import swaa
from swaa.train import IGNORE_INDEX, load_adapter, save_swaa_config

FIELDS = dict(window=3, sink=1, interleave=2)


def lora_config():
    # the paper's recipe (q/k/v, rsLoRA), tiny rank; non-zero B so that the adapter changes the outputs at once
    return peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"],
                           init_lora_weights=False)


def adapted(order, seed=0):
    base = tiny_model("qwen3", seed=seed)
    torch.manual_seed(1)
    if order == "peft_first":
        return swaa.patch_model(peft.get_peft_model(base, lora_config()), **FIELDS)
    return peft.get_peft_model(swaa.patch_model(base, **FIELDS), lora_config())


def batch(seed=0):
    ids, mask = left_padded([10, 7], total=10, seed=seed)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :7] = IGNORE_INDEX  # prompts: 7 and 4 real tokens
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), labels=labels)


def logits(model, inputs):
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}, prompt_len=torch.tensor([7, 4])).logits


def train_steps(model, steps=5):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def test_peft_before_or_after_patch_gives_the_same_model():
    inputs = batch()
    first, second = adapted("peft_first"), adapted("patch_first")
    torch.testing.assert_close(logits(first, inputs), logits(second, inputs), rtol=0, atol=0)
    assert swaa.describe(first) == swaa.describe(second)
    assert first.get_base_model().config.swaa == second.get_base_model().config.swaa


@pytest.mark.parametrize("order", ["peft_first", "patch_first"])
def test_lora_trains_only_the_adapter_under_the_swaa_mask(order):
    model = adapted(order)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    _, losses = train_steps(model)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_generate_through_peft_equals_teacher_forcing():
    model = adapted("patch_first").eval()
    ids, mask = left_padded([9, 6], total=9, seed=4)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)
    labels = out.sequences.clone()
    labels[:, :9] = IGNORE_INDEX
    forced = model(input_ids=out.sequences, attention_mask=full_mask, labels=labels,
                   position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    for step in range(5):
        torch.testing.assert_close(out.logits[step], forced[:, 8 + step].to(out.logits[step].dtype), rtol=1e-5, atol=1e-5)


def test_merge_and_unload_save_and_patch_again_reproduce_the_adapter_model(tmp_path):
    model, _ = train_steps(adapted("patch_first"), steps=3)
    inputs = batch(seed=5)
    expected = logits(model, inputs)
    merged = model.merge_and_unload()
    assert merged.config.swaa == swaa.SWAAConfig(**FIELDS).to_dict()  # merged model stays patched
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-9, atol=1e-9)
    merged.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["swaa"]["window"] == 3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    swaa.patch_model(reloaded)  # re-applies the saved config.swaa
    torch.testing.assert_close(logits(reloaded, inputs), expected, rtol=1e-9, atol=1e-9)


def test_adapter_directory_keeps_the_swaa_config_beside_the_adapter(tmp_path):
    model, _ = train_steps(adapted("peft_first"), steps=3)
    inputs = batch(seed=6)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    save_swaa_config(model, tmp_path)
    # peft saves the adapter only; the SWAA config is the file beside it
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "swaa_config.json").exists()
    loaded = load_adapter(tiny_model("qwen3"), tmp_path)
    assert loaded.get_base_model().config.swaa == swaa.SWAAConfig(**FIELDS).to_dict()
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=1e-9, atol=1e-9)

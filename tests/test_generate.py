"""generate on a patched model follows the rules: each step's logits equal the float64 reference's."""

from __future__ import annotations

import pytest
import torch
from reference import logits as reference_logits
from reference import reference_model
from tiny import FAMILIES, left_padded, tiny_model

import swaa

NEW = 6

CONFIGS = {
    "plain_swa": dict(window=3, fa_decode=False),
    "fa_decode": dict(window=4),
    "sink1": dict(window=3, sink=1),
    "sink3_no_decode": dict(window=2, sink=3, fa_decode=False),
    "interleave2_odd": dict(window=3, sink=2, interleave=2),
    "interleave2_even": dict(window=3, sink=1, interleave=2, interleave_offset=0),
    "interleave3": dict(window=4, interleave=3, fa_decode=False),
    "decode_list": dict(window=3, sink=1, full_attention_layers=[2], fa_decode=[0, 3]),
    "window1": dict(window=1, fa_decode=False),
}


def assert_logits_equal(actual, expected):
    """generate hands out float32 logits; the float64 computation must agree to float32 rounding."""
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=1e-5)


def generated_flags(total_len, prompt_end):
    flags = torch.zeros(total_len, dtype=torch.bool)
    flags[prompt_end:] = True
    return flags


def run_and_compare(model, ref, fields, ids, mask, new=NEW, reference_fields=None, **generate_kwargs):
    """Generate greedily with the patched model and compare every step with the reference."""
    swaa.patch_model(model, **fields)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **generate_kwargs,
    )
    sequences = out.sequences
    prompt = ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(len(ids), new, dtype=mask.dtype)], dim=1)
    generated = generated_flags(sequences.shape[1], prompt).expand(len(ids), -1)
    expected = reference_logits(ref, sequences, full_mask, generated, reference_fields or fields)
    for step, step_logits in enumerate(out.logits):
        assert_logits_equal(step_logits, expected[:, prompt - 1 + step])
    assert torch.equal(sequences[:, prompt:], expected[:, prompt - 1 : -1].argmax(-1))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_generate_equals_reference(family, config):
    model = tiny_model(family)
    ref = reference_model(model)
    ids, mask = left_padded([9, 7, 5], total=9, seed=1)
    run_and_compare(model, ref, CONFIGS[config], ids, mask)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_chunked_prefill_equals_reference(family):
    model = tiny_model(family)
    ref = reference_model(model)
    ids, mask = left_padded([11, 8], total=11, seed=2)
    fields = dict(window=3, sink=1, interleave=2)
    chunked = run_and_compare(model, ref, fields, ids, mask, prefill_chunk_size=4)
    one_shot = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(chunked.sequences, one_shot)


def test_reused_cache_second_turn_follows_rules():
    """Turn 2 on turn 1's cache: its new input (last turn-1 token included) is prompt, its output generated; the
    turn-1 answer already in the cache stays generated. A fresh generate on the same text reads all of it as
    prompt, and differs (docs/rules.md, "A chat's second turn")."""
    model = tiny_model("qwen3")
    ref = reference_model(model)
    fields = dict(window=3, sink=1, interleave=3)
    ids, mask = left_padded([8, 6], total=8, seed=3)
    swaa.patch_model(model, **fields)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    follow_up = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(4))
    turn2_ids = torch.cat([first.sequences, follow_up], dim=1)
    turn2_mask = torch.cat([mask, torch.ones(2, 4 + 5, dtype=mask.dtype)], dim=1)
    second = model.generate(
        turn2_ids, attention_mask=turn2_mask, past_key_values=first.past_key_values, max_new_tokens=NEW,
        do_sample=False, output_logits=True, return_dict_in_generate=True,
    )
    total = second.sequences.shape[1]
    generated = torch.zeros(total, dtype=torch.bool)
    generated[8 : 8 + 3] = True  # turn-1 tokens fed as generated; the 4th is fed in turn 2 as prompt
    generated[turn2_ids.shape[1] :] = True
    full_mask = torch.cat([turn2_mask, torch.ones(2, NEW, dtype=mask.dtype)], dim=1)
    expected = reference_logits(ref, second.sequences, full_mask, generated.expand(2, -1), fields)
    for step, step_logits in enumerate(second.logits):
        assert_logits_equal(step_logits, expected[:, turn2_ids.shape[1] - 1 + step])
    fresh = model.generate(turn2_ids, attention_mask=turn2_mask, max_new_tokens=1, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    as_prompt = reference_logits(ref, turn2_ids, turn2_mask, torch.zeros_like(turn2_mask, dtype=torch.bool), fields)
    assert_logits_equal(fresh.logits[0], as_prompt[:, -1])
    assert (fresh.logits[0] - second.logits[0]).abs().max() > 1e-3


def test_left_padded_batch_equals_rows_alone():
    model = tiny_model("llama")
    swaa.patch_model(model, window=3, sink=2, interleave=2, interleave_offset=0)
    ids, mask = left_padded([10, 6, 3], total=10, seed=5)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    for row in range(3):
        real = mask[row].bool()
        alone = model.generate(ids[row : row + 1, real], max_new_tokens=NEW, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        for step in range(NEW):
            assert_logits_equal(batch.logits[step][row], alone.logits[step][0])


def test_teacher_forced_forward_equals_generate():
    """The logits generate produces equal one teacher-forced forward over prompt + answer (prompt_len given)."""
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=3, sink=1, interleave=2)
    ids, mask = left_padded([9, 6], total=9, seed=6)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(2, NEW, dtype=mask.dtype)], dim=1)
    forced = model(out.sequences, attention_mask=full_mask, prompt_len=mask.sum(1)).logits
    for step in range(NEW):
        assert_logits_equal(out.logits[step], forced[:, 9 - 1 + step])


def test_beam_search_and_sampling_run():
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=3, sink=1)
    ids, mask = left_padded([7, 5], total=7, seed=7)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5)
    assert beams.shape == sampled.shape == (2, 11)


@pytest.mark.parametrize("wrong", [dict(window=4), dict(window=2), dict(sink=2), dict(interleave_offset=0), dict(fa_decode=False)],
                         ids=str)
def test_comparison_detects_an_off_by_one_rule(wrong):
    """The reference comparison can fail: a rule one step off gives different logits."""
    fields = dict(window=3, sink=1, interleave=2, fa_decode=True)
    model = tiny_model("qwen3")
    ref = reference_model(model)
    ids, mask = left_padded([9, 7], total=9, seed=1)
    with pytest.raises(AssertionError):
        run_and_compare(model, ref, fields, ids, mask, reference_fields={**fields, **wrong})

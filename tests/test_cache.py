"""Bounded KV cache: SWA layers without FA decode keep only their sinks and last window - 1 keys, and
generation stays exactly what it is with a cache that keeps every token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import reference_model
from test_generate import assert_logits_equal, run_and_compare
from tiny import left_padded, tiny_model
from transformers import DynamicCache

import swaa
from swaa import SWAAConfig
from swaa import backends
from swaa.caches import SWAACache, new_cache
from swaa.plan import plan_forward
from swaa.rules import FULL_ATTENTION, LayerRule, layer_rules

NEW = 6

CONFIGS = {
    "plain_swa": dict(window=3, fa_decode=False),
    "sink2": dict(window=3, sink=2, fa_decode=False),
    "window1_sink1": dict(window=1, sink=1, fa_decode=False),
    "interleave2_no_decode": dict(window=2, sink=1, interleave=2, fa_decode=False),
    "decode_list": dict(window=3, sink=1, full_attention_layers=[2], fa_decode=[0]),  # layers 1, 3 bounded
}


def generate(model, fields, ids, mask, bounded, new=NEW, **kwargs):
    swaa.patch_model(model, **fields, bounded_cache=bounded)
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kwargs)


def assert_same_generation(actual, expected):
    """The same tokens, and each step's logits equal."""
    assert torch.equal(actual.sequences, expected.sequences)
    for step_actual, step_expected in zip(actual.logits, expected.logits):
        assert_logits_equal(step_actual, step_expected)


@pytest.mark.parametrize("chunk", [None, 3, 5], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_bounded_generation_equals_unbounded(config, family, chunk):
    """Windows smaller than the prompt, sinks 0 and > 0, a left-padded batch whose shortest row is shorter
    than sink + window, one-shot and chunked prefill."""
    model = tiny_model(family)
    ids, mask = left_padded([13, 9, 2], total=13, seed=11)
    bounded = generate(model, CONFIGS[config], ids, mask, True, prefill_chunk_size=chunk)
    assert isinstance(bounded.past_key_values, SWAACache)
    unbounded = generate(model, CONFIGS[config], ids, mask, False, prefill_chunk_size=chunk)
    assert type(unbounded.past_key_values) is DynamicCache
    assert_same_generation(bounded, unbounded)


@pytest.mark.parametrize("fields", [dict(window=3, sink=1, fa_decode=False),
                                    dict(window=2, sink=2, interleave=2, fa_decode=False)], ids=str)
@pytest.mark.parametrize("chunk", [None, 4], ids=lambda c: f"chunk{c}")
def test_bounded_generation_equals_float64_reference(fields, chunk):
    model = tiny_model("qwen3")
    ids, mask = left_padded([12, 8, 3], total=12, seed=12)
    out = run_and_compare(model, reference_model(model), fields, ids, mask, prefill_chunk_size=chunk)
    assert isinstance(out.past_key_values, SWAACache)


def test_stored_length_per_layer_is_what_the_rule_says():
    """Bounded layers: sink + window - 1 keys after a long prompt; full and FA-decode layers: every token."""
    model = tiny_model("qwen3")
    fields = dict(window=4, sink=2, interleave=2, fa_decode=[0])  # 0 FA decode, 1 and 3 full, 2 bounded
    ids, mask = left_padded([20, 20], total=20, seed=13)
    out = generate(model, fields, ids, mask, True, new=3)
    cache = out.past_key_values
    seen = 20 + 3 - 1  # the last generated token is never fed back
    assert cache.get_seq_length() == seen
    assert cache.stored_lengths() == [seen, seen, 2 + 4 - 1, seen]
    assert held(cache) == [[0, 1, seen - 3, seen - 2, seen - 1]] * 2


def held(cache):
    """Positions the ring layers hold, per row, in order (-1: an empty slot)."""
    return cache.ring.positions[:, : cache.ring.slots].sort(-1).values.tolist()


def test_left_padding_sinks_are_each_rows_first_real_tokens():
    model = tiny_model("qwen3")
    ids, mask = left_padded([20, 9, 3], total=20, seed=14)
    out = generate(model, dict(window=4, sink=2, fa_decode=False), ids, mask, True, new=2)
    cache = out.past_key_values
    assert cache.stored_lengths()[0] == 5 and cache.get_seq_length() == 21
    # row 0: 21 real tokens; row 1: 10; row 2: 4 (all kept, one slot empty)
    assert held(cache) == [[0, 1, 18, 19, 20], [0, 1, 7, 8, 9], [-1, 0, 1, 2, 3]]


@pytest.mark.parametrize("cache", [{}, dict(cache_implementation="static", max_cache_len=40)])
def test_chunked_prefill_attends_to_at_most_sink_window_and_chunk_keys(monkeypatch, cache):
    """With the bounded cache and prefill_chunk_size, no bounded layer ever builds a prompt-long mask."""
    fields, chunk = dict(window=3, sink=2, interleave=2, fa_decode=False), 4
    seen = []
    select = backends.select

    def spying_select(name, call):
        record = select(name, call)
        seen.append((call.rule, call.q_len, call.key.shape[-2], call.plan.key_pos.shape[1]))
        return record

    monkeypatch.setattr(backends, "select", spying_select)
    model = tiny_model("qwen3")
    ids, mask = left_padded([30, 25], total=30, seed=15)
    generate(model, fields, ids, mask, True, new=3, prefill_chunk_size=chunk, **cache)
    bounded = [(q, k, n) for rule, q, k, n in seen if not rule.is_full]
    first = model.config.num_hidden_layers // 2  # the bounded layers' calls of the first chunk (interleave 2)
    # the first chunk, onto an empty ring, sees its own keys only; later forwards the ring's 4 slots too
    assert all(k == n == q == chunk for q, k, n in bounded[:first])
    assert len(bounded) > first and all(k == n == 2 + 3 - 1 + q <= 2 + 3 - 1 + chunk for q, k, n in bounded[first:])
    assert max(k for rule, q, k, n in seen if rule.is_full) == cache.get("max_cache_len", 30 + 3 - 1)


def test_multi_turn_reuse_equals_unbounded():
    """Turn 2 on turn 1's cache (turn 1 chunked; transformers 5.17 cannot chunk a prefill onto a reused cache)."""
    fields = dict(window=3, sink=1, interleave=3, fa_decode=False)
    follow_up = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(16))
    results = []
    for bounded in (True, False):
        model = tiny_model("qwen3")
        ids, mask = left_padded([10, 6], total=10, seed=16)
        first = generate(model, fields, ids, mask, bounded, new=4, prefill_chunk_size=3)
        turn2_ids = torch.cat([first.sequences, follow_up], dim=1)
        turn2_mask = torch.cat([mask, torch.ones(2, 4 + 5, dtype=mask.dtype)], dim=1)
        second = model.generate(turn2_ids, attention_mask=turn2_mask, past_key_values=first.past_key_values,
                                max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
        results.append(second)
    assert isinstance(results[0].past_key_values, SWAACache)
    assert_same_generation(*results)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_a_bounded_cache_reused_under_other_rules_is_refused(cache_implementation):
    """A ring dropped what its rules let it drop; the next turn under another config (``swaa.patched`` per turn)
    may need those keys: refused, by the forward and by generate. The same rules patched again, or a cache that
    keeps every key, carry on."""
    static = dict(cache_implementation=cache_implementation, max_cache_len=40) if cache_implementation else {}
    ids, mask = left_padded([10, 6], total=10, seed=18)
    turn2_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
    for bounded in (True, False):
        model = tiny_model("qwen3")
        first = generate(model, dict(window=2, sink=1, fa_decode=False), ids, mask, bounded, new=1, **static)
        cache, turn2_ids = first.past_key_values, torch.cat([first.sequences, torch.randint(1, 50, (2, 3))], dim=1)
        assert (getattr(cache, "ring", None) is not None) == bounded
        swaa.patch_model(model, window=2, sink=1, fa_decode=False, bounded_cache=bounded)  # the same rules again
        model(turn2_ids[:, 10:11], attention_mask=turn2_mask[:, :11], past_key_values=cache)
        swaa.patch_model(model, window=4, sink=1, bounded_cache=bounded)
        if not bounded:
            model.generate(turn2_ids, attention_mask=turn2_mask, past_key_values=cache, max_new_tokens=1)
            continue
        with pytest.raises(ValueError, match="bounded swaa cache has dropped keys that the model's rules may need"):
            model(turn2_ids[:, 11:], attention_mask=turn2_mask, past_key_values=cache)
        with pytest.raises(ValueError, match="bounded swaa cache has dropped keys that the model's rules may need"):
            model.generate(turn2_ids, attention_mask=turn2_mask, past_key_values=cache, max_new_tokens=1)


def test_beam_search_equals_unbounded():
    fields = dict(window=3, sink=1, fa_decode=False)
    ids, mask = left_padded([11, 7], total=11, seed=17)
    outs = []
    for bounded in (True, False):
        model = tiny_model("qwen3")
        swaa.patch_model(model, **fields, bounded_cache=bounded)
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, num_return_sequences=2,
                                   do_sample=False, output_scores=True, return_dict_in_generate=True))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(outs[0].sequences_scores, outs[1].sequences_scores, rtol=1e-5, atol=1e-5)


def held_keys(cache, layer):
    """(position, key) pairs a ring layer holds per row, in position order (a (batch, 1, slots, 1) key tensor)."""
    slots = cache.ring.slots
    rows = zip(cache.ring.positions[:, :slots].tolist(), cache.layers[layer].keys[:, 0, :slots, 0].tolist())
    return [sorted((p, k) for p, k in zip(*row) if p >= 0) for row in rows]


def test_reorder_and_select_move_positions_with_keys():
    rules = (LayerRule(3, 1), FULL_ATTENTION)
    cache = new_cache(rules)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    plan = plan_forward(batch_size=2, q_len=6, past_len=0, device=torch.device("cpu"), attention_mask=mask)
    cache.begin_forward(plan)
    keys = torch.arange(12.0).reshape(2, 1, 6, 1)
    for layer in range(2):
        cache.update(keys, keys, layer)
    row0, row1 = [(0, 0.0), (4, 4.0), (5, 5.0)], [(0, 9.0), (1, 10.0), (2, 11.0)]
    assert held_keys(cache, 0) == [row0, row1]
    cache.reorder_cache(torch.tensor([1, 1]))
    assert held_keys(cache, 0) == [row1, row1]
    cache.batch_select_indices(torch.tensor([0]))
    assert held_keys(cache, 0) == [row1] and cache.layers[1].keys.shape[0] == 1
    cache.batch_repeat_interleave(3)
    assert held_keys(cache, 0) == [row1] * 3 and cache.layers[0].keys.shape[0] == 3


def test_a_bounded_cache_refuses_to_roll_back():
    """The ring overwrites keys older than the window, so no crop can be exact: it is refused, naming the way out."""
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=8, fa_decode=False)
    cache = model(torch.ones(1, 6, dtype=torch.long)).past_key_values
    cache.crop(0)
    with pytest.raises(ValueError, match="bounded_cache=False to roll back exactly"):
        cache.crop(-2)


def test_assisted_decoding_gets_a_cache_that_can_roll_back():
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=3, sink=1, fa_decode=False)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]])
    plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    assisted = model.generate(ids, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(plain, assisted)


def test_a_patched_assistant_model_gets_a_cache_that_can_roll_back():
    """Assisted decoding crops the assistant's cache too: a bounded assistant would crash, or worse."""
    model, assistant = tiny_model("qwen3"), tiny_model("qwen3", seed=1)
    for patched in (model, assistant):
        swaa.patch_model(patched, window=3, sink=1, fa_decode=False)
    ids = torch.randint(1, 50, (1, 11), generator=torch.Generator().manual_seed(20))
    plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    assisted = model.generate(ids, max_new_tokens=8, do_sample=False, assistant_model=assistant)
    assert torch.equal(plain, assisted)


def test_keys_and_values_of_different_widths_multi_head_latent_attention():
    """DeepSeek-V2 caches keys and values of different widths: the ring stores each with its own width."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV2Config(
        vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=3,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = DeepseekV2ForCausalLM(config).double().eval()
    ids, mask = left_padded([13, 9, 2], total=13, seed=22)
    fields = dict(window=3, sink=1, interleave=3, fa_decode=False)
    unbounded = generate(model, fields, ids, mask, False)
    for kwargs in ({}, dict(cache_implementation="static")):
        bounded = generate(model, fields, ids, mask, True, **kwargs)
        ring = bounded.past_key_values.layers[0]
        assert ring.keys.shape[-1] != ring.values.shape[-1]
        assert_same_generation(bounded, unbounded)


def test_layers_that_share_another_layers_keys_gemma3n():
    """Gemma3n's last layers read the keys an earlier layer of their type stored: bounded (dynamic and static)
    generate equals the unbounded path, and a no-op rule leaves the model's output as it was."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    config = Gemma3nTextConfig(
        vocab_size=64, vocab_size_per_layer_input=64, hidden_size=32, hidden_size_per_layer_input=8,
        intermediate_size=[48] * 4, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_kv_shared_layers=2, laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4,
        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=512, pad_token_id=0)
    torch.manual_seed(0)
    model = Gemma3nForCausalLM(config).double().eval()
    ids, mask = left_padded([12, 8], total=12, seed=23)
    before = model(input_ids=ids, attention_mask=mask).logits
    swaa.patch_model(model, window=1000, fa_decode=False)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)
    fields = dict(window=3, sink=1, fa_decode=False)
    unbounded = generate(model, fields, ids, mask, False)
    for kwargs in ({}, dict(cache_implementation="static")):
        bounded = generate(model, fields, ids, mask, True, **kwargs)
        assert type(bounded.past_key_values.layers[0]).__name__ == "RingLayer"
        assert_same_generation(bounded, unbounded)


def test_packed_forward_with_a_cache_equals_unbounded():
    model = tiny_model("qwen3")
    ids = torch.randint(1, 50, (1, 12), generator=torch.Generator().manual_seed(19))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    logits = []
    for bounded in (True, False):
        swaa.patch_model(model, window=2, sink=1, fa_decode=False, bounded_cache=bounded)
        logits.append(model(ids, position_ids=position_ids, use_cache=True).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_cache_used_without_the_patch_says_why():
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=2, fa_decode=False)
    cache = model(torch.ones(1, 4, dtype=torch.long)).past_key_values
    assert isinstance(cache, SWAACache)
    swaa.unpatch_model(model)
    with pytest.raises(RuntimeError, match="without the incoming tokens' positions"):
        model(torch.ones(1, 1, dtype=torch.long), past_key_values=cache)


def test_bounded_cache_off_or_nothing_to_bound_gives_a_plain_dynamic_cache():
    assert type(new_cache((LayerRule(4, 1, True), FULL_ATTENTION))) is DynamicCache
    assert type(new_cache((LayerRule(4, 1, False),), bounded=False)) is DynamicCache
    assert isinstance(new_cache((LayerRule(4, 1, False), FULL_ATTENTION)), SWAACache)


def test_with_keys_mask_is_the_full_mask_at_the_kept_keys():
    mask2d = torch.tensor([[1] * 9, [0, 0, 0, 0, 1, 1, 1, 1, 1]])
    full = plan_forward(batch_size=2, q_len=3, past_len=6, device=torch.device("cpu"), attention_mask=mask2d)
    kept_index = torch.tensor([[0, 1, 4, 5, 6, 7, 8], [0, 1, 4, 5, 6, 7, 8]])
    kept = full.key_pos.gather(1, kept_index)
    rule = LayerRule(3, 2)
    plan = full.with_keys(kept)
    expected = full.mask(rule).gather(2, kept_index[:, None, :].expand(-1, 3, -1))
    assert torch.equal(plan.mask(rule), expected)


def test_cache_memory_benchmark_smoke(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cache_memory.py"
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(script), "--smoke", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.exists() and "| config |" in result.stdout


def test_a_meta_device_model_runs_with_the_bounded_cache():
    """Shape-only runs (meta tensors) have no values to look at: the ring never needs any."""
    from tiny import TINY_CONFIG
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**{**TINY_CONFIG, "head_dim": 8})).eval()
    swaa.patch_model(model, window=3, sink=1, fa_decode=False)
    ids = torch.randint(1, 50, (2, 9)).to("meta")
    out = model(ids)
    assert isinstance(out.past_key_values, SWAACache) and out.logits.shape == (2, 9, 61)
    assert model(ids[:, :1], past_key_values=out.past_key_values).logits.shape == (2, 1, 61)


def test_a_decoder_that_takes_its_cache_under_the_old_name_gets_swaas_cache():
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache``; a decoder written against the
    old name (remote code) still receives swaa's bounded cache, under the name it takes."""
    from tiny import TINY_CONFIG
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    from swaa.compat import CACHE_KWARG

    class OldNameModel(Qwen3Model):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache, **{CACHE_KWARG: past_key_values}, **kwargs)

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**{**TINY_CONFIG, "head_dim": 8})).double().eval()
    old = OldNameModel(model.config).double().eval()
    old.load_state_dict(model.model.state_dict())
    model.model = old
    swaa.patch_model(model, window=3, sink=1, fa_decode=False, backend="reference")
    ids = torch.randint(1, 50, (2, 9))
    cache = old(ids, use_cache=True)[CACHE_KWARG]
    assert isinstance(cache, SWAACache)
    step = old(ids[:, :1], past_key_values=cache).last_hidden_state
    whole = old(torch.cat([ids, ids[:, :1]], dim=1), use_cache=False).last_hidden_state[:, -1:]
    torch.testing.assert_close(step, whole)

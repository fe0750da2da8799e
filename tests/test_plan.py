"""The per-forward plan at the edges: every entry path gives the float64 reference's answer or a clear swaa
error, never a guess. One test per class of input a demanding user tries: a patched inner decoder, packed rows
at an offset, peft's virtual tokens, cross-attention, huge windows, offloaded models, class labels, pickling,
assisted decoding on a static cache, the dynamic ring's size, generate's arguments passed positionally,
switching attention after patching, continuous batching."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch
from reference import logits as reference_logits
from reference import reference_model
from test_cache import assert_same_generation as assert_same_steps
from test_generate import assert_logits_equal
from test_static_cache import NEW, generate
from tiny import TINY_CONFIG, left_padded, tiny_model
from transformers import GenerationConfig

import swaa

FIELDS = dict(window=3, sink=1, interleave=3)  # FA decode on: where the prompt ends matters
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------- a generate swaa does not control


@pytest.mark.parametrize("kwargs", [dict(), dict(prefill_chunk_size=3), dict(prompt_lookup_num_tokens=2),
                                    dict(cache_implementation="static"), dict(use_cache=False)],
                         ids=["plain", "chunked", "prompt_lookup", "static", "no_cache"])
def test_a_patched_inner_decoder_inside_an_outer_generate_is_refused(kwargs):
    """The outer model's generate is not swaa's: its prompt boundary cannot reach the patched decoder."""
    model = tiny_model("qwen3")
    swaa.patch_model(model.model, **FIELDS)
    ids, mask = left_padded([8], total=8, seed=40)
    with pytest.raises(ValueError, match="runs inside a generate that swaa does not control"):
        generate(model, ids, mask, **kwargs)


def test_a_patched_inner_decoder_still_serves_its_own_forwards():
    """Forwards of the inner decoder (or the head around it) follow the rules, as the whole model's do."""
    model, whole = tiny_model("qwen3"), tiny_model("qwen3")
    swaa.patch_model(model.model, **FIELDS)
    swaa.patch_model(whole, **FIELDS)
    ids, mask = left_padded([9, 6], total=9, seed=41)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask, prompt_len=4).logits,
                                   whole(ids, attention_mask=mask, prompt_len=4).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ packed rows


def test_packed_rows_at_an_offset_count_positions_from_each_sequences_start():
    """A continuation chunk whose position ids start at 5000: its first tokens are its sinks (the rule counts
    from the sequence's first token), RoPE keeps the ids given, and labels find each sequence's answer."""
    model = tiny_model("qwen3", max_position_embeddings=8192)
    ref = reference_model(model)
    lengths, offsets = [6, 7, 4], [5000, 0, 300]
    rope = torch.tensor([[offset + p for offset, n in zip(offsets, lengths) for p in range(n)]])
    rule_positions = [[p for n in lengths for p in range(n)]]
    sequence_ids = [[s for s, n in enumerate(lengths) for _ in range(n)]]
    ids = torch.randint(1, 50, (1, sum(lengths)), generator=torch.Generator().manual_seed(42))
    prompts = [3, 2, 4]  # the last sequence is all prompt
    labels = torch.cat([torch.cat([torch.full((p,), -100), ids[0, start + p : start + n]])
                        for p, n, start in zip(prompts, lengths, [0, 6, 13])])[None]
    generated = (labels != -100)
    expected = reference_logits(ref, ids, torch.ones_like(ids), generated, FIELDS, sequence_ids, rule_positions,
                                rope_position_ids=rope)
    swaa.patch_model(model, **FIELDS)
    with torch.no_grad():
        actual = model(ids, position_ids=rope, labels=labels).logits
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_packed_rows_with_a_padding_mask_or_onto_a_cache_are_refused():
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    ids = torch.randint(1, 50, (1, 8))
    restarting = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with pytest.raises(ValueError, match="position_ids restart inside row 0 while an attention_mask is given"):
        model(ids, attention_mask=torch.ones_like(ids), position_ids=restarting)
    cache = model(ids[:, :3]).past_key_values
    with pytest.raises(ValueError, match="packed rows.*onto a non-empty cache"):
        model(ids, position_ids=restarting, past_key_values=cache)


def test_packed_lengths_for_flash_attention_count_only_beside_position_ids():
    """DataCollatorWithFlattening may hand sequence boundaries as flash-attention lengths only: refused, since
    swaa reads packed sequences from position ids; with position ids too, the result is theirs."""
    from transformers import DataCollatorWithFlattening

    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    examples = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (6, 4, 7)]
    plain = DataCollatorWithFlattening()(examples, return_tensors="pt")
    with torch.no_grad():
        expected = model(**plain).logits
        both = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(examples, return_tensors="pt")
        torch.testing.assert_close(model(**both).logits, expected, rtol=0, atol=0)
        lengths_only = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(
            examples, return_tensors="pt")
        with pytest.raises(ValueError, match="cu_seq_lens_q/cu_seq_lens_k without position_ids"):
            model(**lengths_only)


def test_left_padded_rows_with_generates_position_ids_are_one_sequence_each():
    """generate's position ids (pads at 1, real tokens counting up) and a collator's (pads clamped at 0) agree
    with the mask: no false refusal."""
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    ids, mask = left_padded([8, 5], total=8, seed=43)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, use_cache=False).logits
        for positions in ((mask.cumsum(-1) - 1).clamp(min=0), (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)):
            # (RoPE at other absolute positions: equal to rounding)
            torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits,
                                       plain, rtol=1e-7, atol=1e-7)


# ------------------------------------------------------------------------------------ compiled forwards


def _packed_batch():
    """Three prompt + answer pairs packed in one row, as DataCollatorWithFlattening makes them."""
    from transformers import DataCollatorWithFlattening

    generator, examples = torch.Generator().manual_seed(60), []
    for prompt, answer in ((7, 4), (5, 6), (8, 3)):
        ids = torch.randint(3, 50, (prompt + answer,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return DataCollatorWithFlattening()(examples, return_tensors="pt")


def _padded_batch():
    ids, mask = left_padded([9, 6], total=9, seed=61)
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                labels=ids.masked_fill(torch.arange(9) < 6, -100))


FORWARDS = {  # name -> (inputs, training): every way a forward learns where sequences start and prompts end
    "packed_rows_training": (_packed_batch, True),
    "packed_rows_scoring": (_packed_batch, False),
    "padded_rows_with_labels": (_padded_batch, False),
    "padded_rows_with_prompt_len": (lambda: {**_padded_batch(), "labels": None, "prompt_len": [5, 3]}, False),
}


@pytest.mark.parametrize("name", FORWARDS)
def test_a_compiled_forward_reads_its_inputs_as_the_eager_one_does(name):
    """torch.compile(model) (Trainer(torch_compile=True), model.compile()): the hooks run inside the compiled
    call, and what the plan reads off the inputs' values (packed rows, position ids, answers) is what the eager
    forward reads, never an answer assumed without looking."""
    inputs, training = FORWARDS[name]
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS).train(training)
    batch = inputs()
    with torch.set_grad_enabled(training):
        expected = model(**batch).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")(**batch).logits
    torch.testing.assert_close(compiled, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(use_cache=False), dict(), dict(cache_implementation="static")],
                         ids=["no_cache", "dynamic", "static"])
def test_a_compiled_model_generates_the_eager_tokens(kwargs):
    """model.compile() then generate: without a cache every step reads prompt + answer again, and the prompt's
    end must still be where generate's prompt ended."""
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    ids, mask = left_padded([11, 6, 1], total=11, seed=62)
    expected = generate(model, ids, mask, **kwargs)
    torch._dynamo.reset()
    model.compile(backend="eager")
    assert_same_steps(generate(model, ids, mask, **kwargs), expected)


def test_position_ids_that_restart_inside_a_row_are_refused_compiled_and_in_generate():
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    ids, mask = left_padded([8, 8], total=8, seed=63)
    restarting = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="position_ids restart inside row 0 while an attention_mask is given"):
        torch.compile(model, backend="eager")(ids, attention_mask=mask, position_ids=restarting)
    for kwargs in (dict(), dict(cache_implementation="static", prefill_chunk_size=3)):
        # (transformers drops an all-ones mask: the ids alone would say packed rows)
        with pytest.raises(ValueError, match="position_ids restart inside row 0 in generate"):
            generate(model, ids, mask, position_ids=restarting, **kwargs)


# ---------------------------------------------------------------------- tokens the caller did not count


def _prompt_tuned(model, method):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = (PromptTuningConfig if method == "prompt_tuning" else PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=4)
    torch.manual_seed(1)
    return get_peft_model(model, config).double()


def _generate_and_force(model, ids, mask, labels: bool):
    """Each step's logits of greedy generate, and those of one forward over prompt + answer at the same steps."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    prompt = ids.shape[1]
    answer_labels = out.sequences.masked_fill(torch.arange(out.sequences.shape[1]) < prompt, -100)
    with torch.no_grad():
        forced = model(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences),
                       labels=answer_labels if labels else None).logits
    forced = forced[:, -out.sequences.shape[1]:]  # prompt tuning returns logits for its virtual tokens too
    return list(out.logits), [forced[:, prompt - 1 + step] for step in range(len(out.logits))]


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("patch_first", [True, False], ids=["patch_then_peft", "peft_then_patch"])
def test_peft_virtual_tokens_are_prompt_tokens(method, patch_first):
    """generate's logits equal one teacher-forced forward over prompt + answer (labels), with the virtual tokens
    counted as prompt in both: the boundary comes from where generate read its prompt, not from its input.
    Checked at the steps where the unpatched peft model agrees with itself (on transformers 5.25 peft's prompt
    tuning feeds its virtual tokens again after the first step, and its prefix tuning disagrees from the first)."""
    ids, mask = left_padded([9], total=9, seed=44)
    unpatched = _generate_and_force(_prompt_tuned(tiny_model("qwen3"), method), ids, mask, labels=False)
    consistent = _agreeing_steps(*unpatched)
    model = tiny_model("qwen3")
    if patch_first:
        swaa.patch_model(model, **FIELDS)
    model = _prompt_tuned(model, method)
    if not patch_first:
        swaa.patch_model(model, **FIELDS)
    generated, forced = _generate_and_force(model, ids, mask, labels=True)
    # where peft disagrees with itself unpatched (every step of its prefix tuning on transformers 5.25), the
    # patched model disagrees alike: swaa neither hides nor adds a disagreement
    assert _agreeing_steps(generated, forced) == consistent
    for step in consistent:
        assert_logits_equal(generated[step], forced[step])


def _agreeing_steps(generated, forced) -> list[int]:
    return [step for step, (a, b) in enumerate(zip(generated, forced)) if torch.allclose(a, b.to(a.dtype), atol=1e-5)]


def test_labels_and_prompt_len_in_every_form_mark_the_same_answers():
    """Labels by name or by position, prompt_len as an int list or a column: one plan (and not the bare
    forward's, where every token is prompt)."""
    import inspect

    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    ids, mask = left_padded([9, 7], total=9, seed=48)
    labels = ids.masked_fill((mask.cumsum(-1) <= 4) | (mask == 0), -100)  # four real prompt tokens per row
    names = list(inspect.signature(model.forward).parameters)
    positional = [None] * names.index("labels") + [labels]
    positional[names.index("input_ids")], positional[names.index("attention_mask")] = ids, mask
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, labels=labels).logits
        bare = model(ids, attention_mask=mask).logits
        assert not torch.allclose(bare, expected)
        for actual in (model(*positional).logits, model(ids, attention_mask=mask, prompt_len=4).logits,
                       model(ids, attention_mask=mask, prompt_len=torch.tensor([[4], [4]])).logits):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_decoder_called_with_its_inputs_by_position_reads_them():
    """The decoder's hook names positional arguments too: a padding mask passed by position is not dropped."""
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    ids, mask = left_padded([9, 5], total=9, seed=49)
    with torch.no_grad():
        expected = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert not torch.allclose(model.model(input_ids=ids).last_hidden_state, expected)  # the mask matters
        torch.testing.assert_close(model.model(ids, mask).last_hidden_state, expected, rtol=0, atol=0)
        with pytest.raises(TypeError, match="multiple values for argument 'attention_mask'"):
            model.model(ids, mask, attention_mask=mask)
        with pytest.raises(TypeError, match="positional arguments"):
            model.model(ids, *[None] * 40)


def test_prompt_len_with_embeddings_or_inside_generate_is_refused():
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    ids, mask = left_padded([6], total=6, seed=45)
    with pytest.raises(ValueError, match="prompt_len with inputs_embeds"):
        model(inputs_embeds=model.get_input_embeddings()(ids), prompt_len=3)
    with pytest.raises(ValueError, match="prompt_len"):  # transformers' own check comes first
        generate(model, ids, mask, prompt_len=3)


# ------------------------------------------------------------------------------------- what is refused


def test_a_model_with_cross_attention_layers_is_refused_and_left_as_it_was():
    from transformers import MllamaForCausalLM, MllamaTextConfig

    config = MllamaTextConfig(**{**TINY_CONFIG, "cross_attention_layers": [1], "bos_token_id": 1, "eos_token_id": 2})
    model = MllamaForCausalLM(config).eval()
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"cross-attention layers \[1\]"):
        swaa.patch_model(model, window=4)
    assert model.config._attn_implementation == before and not swaa.is_patched(model)
    assert not model._forward_pre_hooks and not model.model._forward_pre_hooks


def test_a_gpt2_model_is_refused_only_when_it_has_cross_attention():
    """GPT-2's attention class takes ``encoder_hidden_states`` whether or not it attends to them; only
    ``add_cross_attention=True`` gives each layer a second, cross-attention module (tests/test_family_sweep.py checks
    plain GPT-2, GPTBigCode and GPT-SW3 exact; GPTBigCode cannot be built with cross-attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)
    plain = GPT2LMHeadModel(GPT2Config(**fields)).eval()
    swaa.patch_model(plain, window=4)
    assert swaa.is_patched(plain)
    crossed = GPT2LMHeadModel(GPT2Config(add_cross_attention=True, **fields)).eval()
    with pytest.raises(ValueError, match=r"cross-attention layers \[0, 1\]"):
        swaa.patch_model(crossed, window=4)
    assert not swaa.is_patched(crossed)


def test_the_largest_window_and_sink_equal_full_attention_and_larger_ones_are_refused():
    model = tiny_model("qwen3")
    ids, mask = left_padded([9, 4], total=9, seed=46)
    expected = generate(model, ids, mask)
    biggest = 2**63 - 1
    for fields in (dict(window=biggest), dict(window=1, sink=biggest, fa_decode=False), dict(window=biggest, sink=biggest)):
        swaa.patch_model(model, **fields)
        assert_same_steps(generate(model, ids, mask), expected)
        assert_same_steps(generate(model, ids, mask, cache_implementation="static"), expected)
    for fields in (dict(window=2**63), dict(window=4, sink=2**64)):
        with pytest.raises(ValueError, match="must be an int from"):
            swaa.patch_model(model, **fields)


def test_generate_with_a_positional_generation_config_is_checked_too():
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    ids, mask = left_padded([6], total=6, seed=47)
    config = GenerationConfig(max_new_tokens=3, cache_implementation="offloaded", do_sample=False)
    with pytest.raises(ValueError, match="cache_implementation='offloaded'"):
        model.generate(ids, config, attention_mask=mask)


def test_switching_attention_after_patching_is_refused_with_what_to_do():
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    for module in (model, model.model):
        with pytest.raises(ValueError, match="call swaa.unpatch_model"):
            module.set_attn_implementation("sdpa")
    model.config._attn_implementation = "sdpa"  # behind swaa's back
    with pytest.raises(ValueError, match="switched to 'sdpa' after swaa patched it"):
        model(torch.ones(1, 4, dtype=torch.long))
    swaa.unpatch_model(model)
    model.set_attn_implementation("sdpa")  # unpatched: transformers' own method again


def test_continuous_batching_is_refused_by_name():
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    for call in (lambda: model.generate_batch([[3, 4, 5]]), lambda: model.init_continuous_batching()):
        with pytest.raises(NotImplementedError, match="continuous batching.*swaa does not patch"):
            call()
    swaa.unpatch_model(model)
    assert "generate_batch" not in model.__dict__


# ------------------------------------------------------------------------------------ made to work exactly


def test_an_offloaded_model_generates_exactly():
    """accelerate's cpu_offload leaves the parameters on meta and moves them per forward: swaa's tensors follow
    the inputs, not ``model.device``."""
    from accelerate import cpu_offload

    model, offloaded = tiny_model("qwen3"), tiny_model("qwen3")
    swaa.patch_model(model, **FIELDS)
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.device.type == "meta"
    swaa.patch_model(offloaded, **FIELDS)
    ids, mask = left_padded([9, 5], total=9, seed=48)
    for kwargs in (dict(), dict(cache_implementation="static"), dict(prefill_chunk_size=4)):
        assert_same_steps(generate(offloaded, ids, mask, **kwargs), generate(model, ids, mask, **kwargs))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_sequence_classification_with_class_labels_runs_every_token_as_prompt(training):
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    torch.manual_seed(0)
    model = Qwen3ForSequenceClassification(Qwen3Config(**{**TINY_CONFIG, "head_dim": 8, "num_labels": 3})).double()
    model.train(training)
    ref = reference_model(model)
    ids, mask = left_padded([9, 6], total=9, seed=49)
    expected = reference_logits(ref, ids, mask, torch.zeros_like(ids, dtype=torch.bool), FIELDS)
    swaa.patch_model(model, **FIELDS)
    out = model(ids, attention_mask=mask, labels=torch.tensor([2, 0]), position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    torch.testing.assert_close(out.logits, expected, rtol=1e-9, atol=1e-9)
    assert out.loss is not None


def test_a_pickled_patched_model_loads_back_patched(tmp_path):
    """In this process and in a fresh one (where swaa's attention must be registered by importing swaa)."""
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    ids, mask = left_padded([9, 5], total=9, seed=50)
    expected = generate(model, ids, mask)
    loaded = pickle.loads(pickle.dumps(model))
    assert swaa.is_patched(loaded) and swaa.get_config(loaded) == swaa.get_config(model)
    assert_same_steps(generate(loaded, ids, mask), expected)
    assert loaded._prefill.model is loaded  # bound to the loaded model, not the pickled one
    path = tmp_path / "model.pt"
    torch.save({"model": model, "ids": ids, "mask": mask, "new": NEW, "sequences": expected.sequences}, path)
    script = ("import sys, torch; data = torch.load(sys.argv[1], weights_only=False); m = data['model'];"
              "out = m.generate(data['ids'], attention_mask=data['mask'], max_new_tokens=data['new'], do_sample=False);"
              "assert torch.equal(out, data['sequences']); print('ok')")
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_assisted_decoding_on_bounded_layers_keeps_every_key_and_equals_greedy(cache_implementation):
    fields = dict(window=3, sink=1, fa_decode=False)  # every layer bounded
    model, assistant = tiny_model("qwen3"), tiny_model("qwen3", seed=5)
    ids, mask = left_padded([9], total=9, seed=51)
    assisted = lambda: generate(model, ids, mask, cache_implementation=cache_implementation,  # noqa: E731
                                prompt_lookup_num_tokens=2)
    unpatched = _failure(assisted)
    swaa.patch_model(model, **fields)
    if unpatched:  # transformers 5.17: "assisted generate is not supported with Static cache classes"
        assert _failure(assisted) == unpatched  # refused alike, by transformers, not by swaa
        return
    expected = generate(model, ids, mask, cache_implementation=cache_implementation)
    for assisted in (dict(assistant_model=assistant), dict(prompt_lookup_num_tokens=2)):
        assert_same_steps(generate(model, ids, mask, cache_implementation=cache_implementation, **assisted), expected)


@pytest.mark.parametrize("fields", [dict(window=3, sink=1, interleave=2), dict(window=3, sink=1, fa_decode=False)],
                         ids=["fa_decode", "bounded"])
def test_early_exit_drafts_with_the_first_layers_and_equals_greedy(fields):
    """``assistant_early_exit`` (LayerSkip) drafts with the model's first layers by lowering its layer count;
    the layers it skips are not a model computing attention outside swaa's."""
    rejected = lambda model: generate(model, *left_padded([9], total=9, seed=0), assistant_early_exit=2)  # noqa: E731
    # a prompt whose draft is rejected, on a model of its own: transformers 5.17's failed early exit leaves the
    # model's layer count lowered
    unpatched = _failure(lambda: rejected(tiny_model("qwen3")))
    model = swaa.patch_model(tiny_model("qwen3"), **fields)
    failure = _failure(lambda: rejected(model))
    if unpatched:  # transformers 5.17 crops the layers the draft never wrote (None): its own early exit fails
        assert failure in (unpatched, None)  # and fails alike patched, or swaa's bounded cache runs that prompt
        return
    assert failure is None
    ids, mask = left_padded([9], total=9, seed=53)
    assert_same_steps(generate(model, ids, mask, assistant_early_exit=2), generate(model, ids, mask))


def test_a_patched_model_assists_an_unpatched_one_and_the_reverse():
    fields = dict(window=3, sink=1, interleave=2)
    main, assistant = tiny_model("qwen3"), tiny_model("qwen3", seed=5)
    ids, mask = left_padded([9], total=9, seed=52)
    plain = generate(main, ids, mask)
    swaa.patch_model(assistant, **fields)
    assert_same_steps(generate(main, ids, mask, assistant_model=assistant), plain)
    swaa.patch_model(main, **fields)
    expected = generate(main, ids, mask)
    swaa.unpatch_model(assistant)
    assert_same_steps(generate(main, ids, mask, assistant_model=assistant), expected)


def test_the_dynamic_ring_holds_no_more_than_the_context():
    """A window far longer than the prompt keeps the tokens seen, not the window (8 GB at window 1e9)."""
    model = tiny_model("qwen3")
    ids, mask = left_padded([9, 5], total=9, seed=53)
    expected = generate(model, ids, mask)
    swaa.patch_model(model, window=10**9, sink=4, fa_decode=False)
    out = generate(model, ids, mask)
    assert_same_steps(out, expected)
    assert max(out.past_key_values.stored_lengths()) <= 2 * (9 + NEW)
    swaa.patch_model(model, window=6, sink=2, fa_decode=False)  # the ring reaches its size, then wraps
    long_ids, long_mask = left_padded([30, 17], total=30, seed=54)
    bounded = generate(model, long_ids, long_mask, new=12)
    assert max(bounded.past_key_values.stored_lengths()) == 2 + 6 - 1
    swaa.patch_model(model, window=6, sink=2, fa_decode=False, bounded_cache=False)
    assert_same_steps(bounded, generate(model, long_ids, long_mask, new=12))


def test_a_deep_copy_of_a_patched_model_generates_on_its_own():
    model = swaa.patch_model(tiny_model("qwen3"), **FIELDS)
    twin = copy.deepcopy(model)
    assert twin._prefill.model is twin and twin._prefill.state is not model._prefill.state
    ids, mask = left_padded([9, 5], total=9, seed=55)
    swaa.unpatch_model(model)
    assert swaa.is_patched(twin) and not swaa.is_patched(model)
    assert_same_steps(generate(twin, ids, mask), generate(swaa.patch_model(tiny_model("qwen3"), **FIELDS), ids, mask))
    assert_same_steps(generate(model, ids, mask), generate(tiny_model("qwen3"), ids, mask))


def _failure(run) -> str | None:
    """``run()``'s exception as "Type: message", None when it returns: an upstream failure a test then asserts
    the patched model shares (rather than skipping)."""
    try:
        run()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None

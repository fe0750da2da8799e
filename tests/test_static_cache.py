"""The static path: ``generate(cache_implementation="static")`` and transformers' compiled decode step run on a
patched model exactly (the eager path's logits, the float64 reference's), the decode step compiles into one
graph with no host syncs and no recompilation, and per-call state never lives on the model."""

from __future__ import annotations

import copy
import inspect
import threading
from unittest import mock

import pytest
import torch
from reference import reference_model
from test_cache import assert_same_generation
from test_generate import assert_logits_equal, run_and_compare
from tiny import TINY_CONFIG
from tiny import FAMILIES, left_padded, tiny_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.generation.configuration_utils import CompileConfig

import swaa
from swaa import SWAAConfig
from swaa.caches import SWAAStaticCache
from swaa.plan import GENERATE_KWARG
from swaa.rules import layer_rules

NEW = 6
CONFIGS = {
    "every_layer_swa_bounded": dict(window=3, sink=2, fa_decode=False),
    "interleave2_fa_decode": dict(window=3, sink=1, interleave=2),
    "decode_list_bounded_rest": dict(window=2, sink=1, full_attention_layers=[2], fa_decode=[0]),
    "unbounded_no_fa_decode": dict(window=3, sink=1, fa_decode=False, bounded_cache=False),
    "window1_sink3": dict(window=1, sink=3, fa_decode=False),
    "window_longer_than_cache": dict(window=40, sink=1, fa_decode=False),
}


def generate(model, ids, mask, new=NEW, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_static_generate_equals_the_float64_reference(family, config):
    """Left padding with a row shorter than sink + window, windows shorter and longer than the prompt."""
    model = tiny_model(family)
    ids, mask = left_padded([13, 9, 2], total=13, seed=21)
    out = run_and_compare(model, reference_model(model), CONFIGS[config], ids, mask, cache_implementation="static")
    assert isinstance(out.past_key_values, SWAAStaticCache)


@pytest.mark.parametrize("chunk", [1, 4, 5], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("config", ["every_layer_swa_bounded", "interleave2_fa_decode"])
def test_chunked_prefill_onto_a_static_cache_equals_the_dynamic_path(config, chunk):
    model = tiny_model("qwen3")
    swaa.patch_model(model, **CONFIGS[config])
    ids, mask = left_padded([14, 8], total=14, seed=22)
    dynamic = generate(model, ids, mask)
    static = generate(model, ids, mask, cache_implementation="static", prefill_chunk_size=chunk)
    assert_same_generation(static, dynamic)


def test_beam_search_on_a_static_cache_equals_the_dynamic_path():
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=3, sink=1, interleave=3, fa_decode=False)
    ids, mask = left_padded([11, 7], total=11, seed=23)
    outs = [model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, num_return_sequences=2,
                           do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs)
            for kwargs in ({}, dict(cache_implementation="static"))]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(outs[0].sequences_scores, outs[1].sequences_scores, rtol=1e-6, atol=1e-6)


def test_cache_implementation_from_the_generation_config_and_a_dynamic_default_work():
    """A cache implementation set in the model's generation config is honoured; "dynamic" there (which the
    user never passed to generate) does not make transformers refuse swaa's cache."""
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=3, sink=1, fa_decode=False)
    ids, mask = left_padded([10, 6], total=10, seed=24)
    expected = generate(model, ids, mask)
    model.generation_config.cache_implementation = "static"
    static = generate(model, ids, mask)
    assert isinstance(static.past_key_values, SWAAStaticCache)
    model.generation_config.cache_implementation = "dynamic"
    dynamic = generate(model, ids, mask)
    assert not isinstance(dynamic.past_key_values, SWAAStaticCache)
    for out in (static, dynamic, generate(model, ids, mask, generation_config=GenerationConfig(
            cache_implementation="static", max_new_tokens=NEW, do_sample=False))):
        assert_same_generation(out, expected)


@pytest.mark.parametrize("implementation", ["offloaded", "offloaded_static", "quantized", "paged"])
def test_cache_implementations_swaa_cannot_honour_are_refused_by_name(implementation):
    """paged switches generate to continuous batching, which swaa refuses by that name."""
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=3, fa_decode=False)
    error, message = (NotImplementedError, "continuous batching") if implementation == "paged" else (
        ValueError, f"cache_implementation='{implementation}'")
    with pytest.raises(error, match=message):
        generate(model, *left_padded([6], total=6, seed=25), cache_implementation=implementation)


def test_a_cache_that_drops_keys_is_refused():
    """A DynamicCache built from a Mistral config slides its window: FA decode would lose keys it needs."""
    model = tiny_model("mistral")
    swaa.patch_model(model, window=2, sink=1)
    ids, mask = left_padded([6], total=6, seed=26)
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer"):
        generate(model, ids, mask, past_key_values=DynamicCache(config=model.config))


@pytest.mark.parametrize("own_cache", [True, False], ids=["swaa_static", "transformers_static"])
def test_a_second_turn_on_a_static_cache_too_small_for_it_is_refused_with_the_sizes(own_cache):
    """Turn 1's static cache has room for turn 1 only: turn 2 on it is refused naming both sizes (unpatched,
    torch's index check fails inside the model). A StaticCache sized for both turns carries on."""
    from transformers import StaticCache

    model = swaa.patch_model(tiny_model("qwen3"), window=3, sink=1)
    ids, mask = left_padded([8], total=8, seed=27)
    cache = None if own_cache else StaticCache(config=model.config, max_cache_len=8 + 4 - 1)
    first = generate(model, ids, mask, new=4, past_key_values=cache,
                     cache_implementation="static" if own_cache else None)
    turn2_ids = torch.cat([first.sequences, torch.randint(3, 50, (1, 5))], dim=1)
    with pytest.raises(ValueError, match=r"room for 11 tokens and this generate writes 22 .* max_cache_len >= 22"):
        generate(model, turn2_ids, torch.ones_like(turn2_ids), new=NEW, past_key_values=first.past_key_values)
    roomy = StaticCache(config=model.config, max_cache_len=22)
    first = generate(model, ids, mask, new=4, past_key_values=roomy)
    second = generate(model, turn2_ids, torch.ones_like(turn2_ids), new=NEW, past_key_values=first.past_key_values)
    assert second.sequences.shape[1] == turn2_ids.shape[1] + NEW


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_cache_len,chunk", [(8192, None), (8192 + 7, None), (8192 + 7, 5)],
                         ids=["even", "odd", "odd_chunked"])
def test_a_long_static_cache_stays_exact(family, max_cache_len, chunk):
    """A long static cache, of even and odd lengths, mostly unwritten slots: with left padding and chunked
    prefill, in every family, the tokens are the dynamic path's."""
    model = tiny_model(family)
    swaa.patch_model(model, window=3, sink=1, interleave=2)
    ids, mask = left_padded([12, 7], total=12, seed=40)
    assert_same_generation(generate(model, ids, mask, cache_implementation="static", max_cache_len=max_cache_len,
                                    prefill_chunk_size=chunk),
                           generate(model, ids, mask))


class _NewTensors(TorchDispatchMode):
    """Records the size of every tensor an op makes in new memory (not a view, not in place) while ``on``."""

    def __init__(self):
        super().__init__()
        self.on, self.sizes = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.on:
            given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor)}
            self.sizes += [t.numel() for t in torch.utils._pytree.tree_leaves(result)
                           if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given]
        return result


@pytest.mark.parametrize("max_cache_len", [8191, 8199, 10440])
def test_a_decode_step_reads_a_long_static_cache_in_place(max_cache_len):
    """A static cache holds the slots asked for, and a decode step reads its keys and values where they lie:
    no copy of a layer's values (an H200 once spent a quarter of each 128k step copying them)."""
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=3, sink=1, interleave=2)
    rules = layer_rules(swaa.get_config(model), model.config.num_hidden_layers)
    slots = SWAAStaticCache(rules, max_cache_len).get_max_length()
    assert slots == max_cache_len
    ids, mask = left_padded([12, 7], total=12, seed=41)
    values_of_a_layer = 2 * model.config.num_key_value_heads * slots * model.config.head_dim
    recorder = _NewTensors()
    decoding = lambda module, args, kwargs: setattr(recorder, "on", kwargs["input_ids"].shape[1] == 1)  # noqa: E731
    model.register_forward_pre_hook(decoding, with_kwargs=True)
    with recorder:
        generate(model, ids, mask, cache_implementation="static", max_cache_len=max_cache_len)
    assert recorder.sizes and max(recorder.sizes) < values_of_a_layer / 2


def test_generate_without_a_cache_still_knows_the_generated_tokens():
    """use_cache=False re-reads the whole sequence each step; FA decode still applies to the generated part."""
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=2, sink=1, interleave=3)
    ids, mask = left_padded([10, 6], total=10, seed=34)
    assert_same_generation(generate(model, ids, mask, use_cache=False), generate(model, ids, mask))


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_the_prompt_boundary_ends_with_generate(cache_implementation):
    """generate's boundary lives in its own forwards only: a returned cache carries none, and a bare forward
    of one token on it follows the bare-forward rule (a generated token), as generate's next step would."""
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=2, sink=1)
    ids, mask = left_padded([8], total=8, seed=27)
    longer = generate(model, ids, mask, new=NEW + 1, cache_implementation=cache_implementation)
    out = generate(model, ids, mask, cache_implementation=cache_implementation)
    assert not [name for name in vars(out.past_key_values) if "swaa" in name]
    token = out.sequences[:, -1:]
    full_mask = torch.ones(1, 8 + NEW, dtype=mask.dtype)
    if cache_implementation == "static":
        full_mask = torch.nn.functional.pad(full_mask, (0, out.past_key_values.get_max_length() - full_mask.shape[1]))
    with torch.no_grad():
        logits = model(token, attention_mask=full_mask, past_key_values=out.past_key_values,
                       position_ids=torch.tensor([[8 + NEW - 1]])).logits
    assert_logits_equal(logits[:, -1], longer.logits[-1])


def decode_step_inputs(model, config, batch=(9, 5), slots=24):
    """Patch ``model``; a static cache after a left-padded prefill, and the inputs of the next decode step."""
    swaa.patch_model(model, **config)
    ids, mask = left_padded(list(batch), total=batch[0], seed=28)
    rules = layer_rules(SWAAConfig(**config), model.config.num_hidden_layers)
    cache = SWAAStaticCache(rules, slots, config.get("bounded_cache", True))
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, past_key_values=cache, position_ids=positions).logits
    full_mask = torch.nn.functional.pad(mask, (0, slots - batch[0]))
    return cache, logits[:, -1:].argmax(-1), full_mask, mask.sum(-1, keepdim=True)


@pytest.mark.parametrize("config", ["every_layer_swa_bounded", "interleave2_fa_decode", "unbounded_no_fa_decode"])
def test_a_compiled_decode_step_is_one_graph_exact_and_never_recompiles(config):
    """torch._dynamo sees the whole decode step as one graph (fullgraph), the compiled steps give the eager
    steps' logits, and 12 steps on one cache then a new prompt on a fresh cache compile nothing new."""
    eager_model, model = tiny_model("qwen3"), tiny_model("qwen3")
    eager_cache, token, full_mask, position = decode_step_inputs(eager_model, CONFIGS[config])
    cache, *_ = decode_step_inputs(model, CONFIGS[config])

    def step(model, cache, token, full_mask, position, prompt_end):  # prompt_end: as generate hands it down
        return model(token, attention_mask=full_mask, past_key_values=cache, position_ids=position,
                     **{GENERATE_KWARG: prompt_end}).logits

    end = torch.full((2, 1), 9)
    explanation = torch._dynamo.explain(step)(model, copy.deepcopy(cache), token, full_mask, position, end)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for n in range(12):
            full_mask[:, 9 + n] = 1
            expected = step(eager_model, eager_cache, token, full_mask, position + n, end)
            assert_logits_equal(compiled(model, cache, token, full_mask, position + n, end), expected)
            token = expected[:, -1:].argmax(-1)
        fresh, token, full_mask, position = decode_step_inputs(model, CONFIGS[config], batch=(7, 3))
        full_mask[:, 7] = 1
        compiled(model, fresh, token, full_mask, position, torch.full((2, 1), 7))


def test_a_forward_reads_its_positional_arguments_without_inspect():
    """torch 2.11's dynamo cannot trace ``inspect.signature`` (a graph break at the top of every compiled step
    called with the tokens by position, seen on an H200): the hooks name positional arguments from names read at
    patch time. Labels by position still reach the plan (``test_plan``)."""
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=4, sink=1)
    ids = torch.randint(0, TINY_CONFIG["vocab_size"], (1, 12))
    with mock.patch.object(inspect, "signature", side_effect=AssertionError("inspect inside a forward")), \
            torch.no_grad():
        model(ids)
        model(ids, None, None, None, None, ids)  # labels by position


class CountHostSyncs(TorchFunctionMode):
    """Counts the tensor calls that wait for the device (bool, item, tolist, int)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += getattr(func, "__name__", "") in ("__bool__", "item", "tolist", "__int__", "__index__")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_an_eager_decode_step_syncs_the_same_whatever_the_depth(cache_implementation):
    """No host sync per layer: a decode step of an 8-layer model waits for the device no more often than a
    2-layer one. On the reference backend, the GPU's path for such a step: the CPU's windowed backend plans on the
    host once per rule and forward (a CPU has no device to wait for)."""
    syncs = []
    for layers in (2, 8):
        model = Qwen3ForCausalLM(Qwen3Config(**{**TINY_CONFIG, "head_dim": 8, "num_hidden_layers": layers}))
        model = model.double().eval()
        swaa.patch_model(model, window=3, sink=1, interleave=2, fa_decode=[0], backend="reference")
        ids, mask = left_padded([9, 5], total=9, seed=29)
        static = dict(cache_implementation="static", max_cache_len=16) if cache_implementation else {}
        out = generate(model, ids, mask, new=2, **static)
        cache, token = out.past_key_values, out.sequences[:, -1:]
        full_mask = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], dim=1)
        if cache_implementation == "static":
            full_mask = torch.nn.functional.pad(full_mask, (0, cache.get_max_length() - full_mask.shape[1]))
        with CountHostSyncs() as counter, torch.no_grad():
            model(token, attention_mask=full_mask, past_key_values=cache, position_ids=mask.sum(-1, keepdim=True) + 1)
        syncs.append(counter.calls)
    assert syncs[0] == syncs[1], syncs


def test_auto_compiled_generate_equals_eager_generate():
    """transformers' own compiled decode (its compile_config; run here on the CPU with dynamo's eager backend)."""
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=3, sink=2, interleave=2)
    ids, mask = left_padded([12, 6], total=12, seed=30)
    expected = generate(model, ids, mask)
    compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    assert_same_generation(generate(model, ids, mask, cache_implementation="static", compile_config=compile_config),
                           expected)


class Lockstep(LogitsProcessor):
    """Makes two generate calls in two threads take their steps in turn."""

    def __init__(self, barrier):
        self.barrier = barrier

    def __call__(self, input_ids, scores):
        self.barrier.wait(timeout=60)
        return scores


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_two_threads_generating_on_one_model_do_not_change_each_others_output(cache_implementation):
    """Prompts of different lengths, FA decode: each thread's prompt boundary is its own."""
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=2, sink=1)
    prompts = [left_padded([12], total=12, seed=31), left_padded([5], total=5, seed=32)]
    alone = [generate(model, ids, mask, cache_implementation=cache_implementation) for ids, mask in prompts]
    barrier, results = threading.Barrier(2), [None, None]

    def worker(index):
        ids, mask = prompts[index]
        results[index] = generate(model, ids, mask, cache_implementation=cache_implementation,
                                  logits_processor=LogitsProcessorList([Lockstep(barrier)]))

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for together, by_itself in zip(results, alone):
        assert_same_generation(together, by_itself)


def test_a_deep_copy_generates_with_its_own_weights_and_unpatches_alone():
    model = tiny_model("qwen3")
    swaa.patch_model(model, window=2, sink=1)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1)
    ids, mask = left_padded([8], total=8, seed=33)
    original, copied = generate(model, ids, mask), generate(twin, ids, mask)
    torch.testing.assert_close(copied.logits[0], twin(ids, attention_mask=mask).logits[:, -1].float())
    assert not torch.equal(copied.logits[0], original.logits[0])
    swaa.unpatch_model(twin)
    assert_same_generation(generate(model, ids, mask), original)

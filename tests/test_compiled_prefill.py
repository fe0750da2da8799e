"""The compiled prefill (``compile_prefill=True``): the eager forward's tokens and logits in every family and
cache, one compiled forward per kind of call that serves every prompt length, eager where it must be (batches,
padding, chunks, training, decode steps), and refused where it cannot run."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch._dynamo.utils import counters, get_static_address_type

from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import swaa
from swaa import prefill
from tiny import FAMILIES, left_padded, tiny_model

CONFIG = dict(window=8, sink=2, interleave=2)


@pytest.fixture(autouse=True)
def fresh_compiler(request, monkeypatch):
    """Each test compiles afresh; through AOTAutograd without inductor (what dynamo traces is what this file
    tests; inductor's C++ build costs about 30 s per graph on 2 cores), except where marked ``inductor``."""
    if "inductor" not in request.keywords:
        monkeypatch.setattr(prefill, "COMPILE_OPTIONS", {"dynamic": True, "backend": "aot_eager"})
    torch._dynamo.reset()
    counters.clear()
    prefill._compiled_forward.cache_clear()
    yield
    prefill._compiled_forward.cache_clear()


def two_layer_model(family: str):
    """The family's tiny model cut to 2 layers (one full, one SWA under ``CONFIG``): compilation time grows
    with depth, and what the compiled prefill does per layer is the same in every layer of a kind."""
    model = tiny_model(family)
    model.config.num_hidden_layers = 2
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:2]
    torch.manual_seed(0)
    return type(model)(model.config).to(torch.float64).eval()


def compiled_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def generate(model, rows, total, seed=0, **kwargs):
    ids, mask = left_padded(rows, total, seed=seed)
    return model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, **kwargs)


def assert_same(compiled, eager):
    assert torch.equal(compiled.sequences, eager.sequences)
    # float64 models, but every family's RMSNorm computes in float32: the compiled kernels round it elsewhere
    assert max((c - e).abs().max().item() for c, e in zip(compiled.logits, eager.logits)) < 1e-6


def patched_pair(family: str = "qwen3", **fields):
    """The same tiny model patched twice (``CONFIG`` with ``fields``): with the compiled prefill, and eagerly."""
    fields = {**CONFIG, **fields}
    return (swaa.patch_model(two_layer_model(family), **fields, compile_prefill=True),
            swaa.patch_model(two_layer_model(family), **fields))


@pytest.fixture
def pair():
    return patched_pair()


def test_one_compilation_per_kind_of_cache_serves_every_length(pair):
    """Whole prompts of one row onto dynamic and static caches, bounded ring layers: the eager tokens; then
    other lengths (one shorter than a FlexAttention block of 128, one longer) compile nothing more."""
    compiled, eager = pair
    kinds = [dict(), dict(cache_implementation="static", max_cache_len=200)]
    for kind in kinds:
        assert_same(generate(compiled, [37], 37, **kind), generate(eager, [37], 37, **kind))
        assert compiled_graphs() >= 1
    graphs = compiled_graphs()
    for seed, kind in enumerate(kinds):
        for length in (53, 150):
            assert_same(generate(compiled, [length], length, seed=seed + 1, **kind),
                        generate(eager, [length], length, seed=seed + 1, **kind))
    assert compiled_graphs() == graphs


@pytest.mark.parametrize("rows, total, kind, graphs", [
    ([37, 30], 37, dict(), 0),  # several rows, left padding
    ([37, 37], 37, dict(), 0),  # several plain rows
    ([30], 37, dict(), 0),  # one left-padded row
    ([37], 37, dict(prefill_chunk_size=16), 1),  # the first chunk is a prompt of 16; the later ones have keys before
    ([37], 37, dict(cache_implementation="static", prefill_chunk_size=8), 0),  # a chunk among the static cache's slots
])
def test_batches_padding_and_chunks_run_the_eager_prefill(pair, rows, total, kind, graphs):
    """Only a prompt of one row with no keys before it compiles (the calls checked on a GPU; a padded batch's
    logits were off there): the rest gives the eager tokens without a compiled graph."""
    compiled, eager = pair
    assert_same(generate(compiled, rows, total, **kind), generate(eager, rows, total, **kind))
    assert compiled_graphs() == graphs


def test_packed_sequences_run_the_eager_prefill(pair):
    compiled, _ = pair
    ids, _ = left_padded([24], 24)
    with torch.no_grad():
        compiled(ids, position_ids=torch.cat([torch.arange(10), torch.arange(14)])[None])  # two packed sequences
        assert compiled_graphs() == 0
        compiled(ids, position_ids=torch.arange(24)[None])
    assert compiled_graphs() == 1


@pytest.mark.inductor
def test_inductor_kernels_give_the_eager_tokens(pair):
    """What users run: inductor's generated kernels (C++ here, Triton on a GPU: tests/gpu)."""
    compiled, eager = pair
    assert_same(generate(compiled, [41], 41), generate(eager, [41], 41))
    assert compiled_graphs() == 1


def peak_bytes(model, length: int) -> int:
    """Peak of the bytes allocated during one forward of ``length`` tokens (the profiler's allocation events)."""
    ids = torch.randint(1, model.config.vocab_size, (1, length))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as profile:
        model(ids, use_cache=True)
    events = sorted((event.start_ns(), event.nbytes()) for event in profile.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@pytest.mark.inductor
def test_each_layer_frees_its_keys_inside_the_compiled_graph():
    """Ring layers write their cache for the graph's output only; scheduled late, every layer's keys and values
    would stay alive to the end of the graph (8 layers: 3.7x the eager peak; on an H200 at 128k, +13 GiB)."""
    models = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=256, intermediate_size=256, num_hidden_layers=8,
                                             num_attention_heads=4, num_key_value_heads=4)).eval()
        # the reference on both: a compiled CPU forward runs it (the windowed backend plans on the host)
        models.append(swaa.patch_model(model, window=16, sink=2, fa_decode=False, compile_prefill=compiled,
                                       backend="reference"))
    eager, compiled = models
    peak_bytes(compiled, 100)  # compiles
    assert peak_bytes(compiled, 1024) < 1.5 * peak_bytes(eager, 1024)


# qwen3_moe left out: its eager experts loop picks experts by value (data-dependent), a graph break per layer
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"qwen3", "qwen3_moe"}))
def test_every_family_compiles_its_prefill_without_graph_breaks(family):
    compiled, eager = patched_pair(family)
    assert_same(generate(compiled, [29], 29), generate(eager, [29], 29))
    assert compiled_graphs() == 1 and not counters["graph_break"]


def test_ring_layers_give_the_eager_tokens_over_every_length():
    """FA decode off: the SWA layers keep a ring cache (dynamic or static), which a first prompt finds empty (it
    hands attention only the prompt's keys); then a continued cache, whose ring's keys come first, runs eagerly."""
    compiled, eager = patched_pair(fa_decode=False)
    for seed, length in enumerate((37, 150)):
        assert_same(generate(compiled, [length], length, seed), generate(eager, [length], length, seed))
    assert compiled_graphs() == 1
    static = dict(cache_implementation="static", max_cache_len=200)  # a static ring: fresh for each generate
    for seed, length in enumerate((37, 150)):
        assert_same(generate(compiled, [length], length, seed, **static),
                    generate(eager, [length], length, seed, **static))
    graphs = compiled_graphs()
    first = generate(compiled, [37], 37)
    ids = torch.cat([first.sequences, left_padded([9], 9)[0]], dim=1)
    held = first.past_key_values.get_seq_length()  # the prompt and every generated token but the last
    with torch.no_grad():
        continued = compiled(ids[:, held:], past_key_values=first.past_key_values).logits
        expected = eager(ids).logits[:, held:]
    assert (continued - expected).abs().max() < 1e-6 and compiled_graphs() == graphs


def fixed_addresses(cache) -> list[dict]:
    """Per layer, how each of its tensors is marked for compiled steps (``None``: not a fixed address)."""
    return [{name: get_static_address_type(value) for name, value in vars(layer).items()
             if isinstance(value, torch.Tensor)} for layer in cache.layers]


@pytest.mark.parametrize("family, cache", [
    ("qwen3", "swaa's static cache"),
    ("qwen3", "a StaticCache of the caller's"),
    ("mistral", "swaa's static cache"),  # its own config's sliding window (a caller's StaticCache would be refused)
])
@pytest.mark.parametrize("fa_decode", [True, False])  # static layers that keep every key; ring layers
def test_a_static_cache_first_filled_in_the_graph_keeps_fixed_addresses(family, cache, fa_decode):
    """A static layer makes its tensors on its first update and marks them as fixed addresses, which a compiled
    decode step needs to run as a CUDA graph; made inside the compiled prefill they could not be marked there
    (on an H200 every decode step then ran without CUDA graphs). After the prefill, the marks are the eager ones."""
    marks = []
    for model in patched_pair(family, fa_decode=fa_decode):
        static = (dict(cache_implementation="static", max_cache_len=64) if cache.startswith("swaa") else
                  dict(past_key_values=StaticCache(config=model.config, max_cache_len=64)))
        marks.append(fixed_addresses(generate(model, [37], 37, **static).past_key_values))
    compiled, eager = marks
    assert compiled_graphs() == 1
    assert compiled == eager and all(mark is not None for layer in eager for mark in layer.values())


def test_training_and_decode_steps_stay_eager(pair):
    compiled, _ = pair
    ids, _ = left_padded([20], 20)
    compiled.train()
    compiled(ids, labels=ids).loss.backward()  # gradients: eager
    compiled.eval()
    with torch.no_grad():
        compiled(ids[:, :1])  # one query: eager (generate compiles decode steps itself, with a static cache)
    assert compiled_graphs() == 0
    with torch.no_grad():
        compiled(ids)
    assert compiled_graphs() == 1


def test_copies_and_unpatch(pair):
    compiled, eager = pair
    expected = generate(eager, [25], 25)
    for model in (copy.deepcopy(compiled), pickle.loads(pickle.dumps(compiled)), compiled):
        assert_same(generate(model, [25], 25), expected)
    swaa.unpatch_model(compiled)
    assert "forward" not in vars(compiled.model)
    assert swaa.get_config(compiled) is None


def test_refused_where_it_cannot_run():
    with pytest.raises(TypeError, match="compile_prefill='yes': must be a bool"):
        swaa.SWAAConfig(window=8, compile_prefill="yes")
    with pytest.raises(ValueError, match="compile_prefill=True with backend='flash'"):
        swaa.SWAAConfig(window=8, compile_prefill=True, backend="flash")
    model = tiny_model("llama")
    original = model.model.forward
    model.model.forward = lambda *args, **kwargs: original(*args, **kwargs)  # as accelerate's hooks do
    with pytest.raises(ValueError, match="LlamaModel.forward is already replaced"):
        swaa.patch_model(model, **CONFIG, compile_prefill=True)
    assert not swaa.is_patched(model) and model.config._attn_implementation != "swaa"


@pytest.mark.parametrize("backend, rule", [("sdpa", swaa.rules.LayerRule(None, 0, False)),
                                           ("flex", swaa.rules.LayerRule(5, 2, True))])
def test_gpu_backends_trace_into_one_graph_over_every_length(backend, rule):
    """The kernels a GPU's compiled prefill runs (full layers: sdpa; windowed: FlexAttention), traced as the
    prefill traces them (dynamic lengths, the plan built before): no graph break, one graph for every length
    past one block of 128 queries, the reference's result."""
    from swaa.backends import flex, reference, sdpa
    from swaa.plan import plan_forward
    attend = {"sdpa": sdpa.attend, "flex": flex.attend}[backend]

    def run(query, key, value, plan, attend=attend):
        return attend(query, key, value, rule=rule, plan=plan, scaling=0.25)[0]

    compiled = torch.compile(run, dynamic=True, fullgraph=True, backend="aot_eager")
    for length in (150, 333):
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, :9] = 0
        if backend == "sdpa":
            mask = None
        plan = plan_forward(batch_size=2, q_len=length, past_len=0, device=torch.device("cpu"), attention_mask=mask)
        assert backend != "sdpa" or plan.plain()
        query, key, value = torch.randn(2, 4, length, 16), torch.randn(2, 2, length, 16), torch.randn(2, 2, length, 16)
        expected = run(query, key, value, plan, attend=reference.attend)
        torch.testing.assert_close(compiled(query, key, value, plan), expected, atol=1e-5, rtol=1e-5)
    assert compiled_graphs() == 1

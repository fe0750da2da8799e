"""The windowed backend (the CPU's path) equals the float64 reference, forward and backward, with chunks small
enough that the kernel cases run every one of its paths; it reads O(window + chunk + sink) keys a query; and a
patched model generates through it as through the reference backend."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CASES, GRADIENT_CASES, Case, make_inputs, output_and_gradients, reference_output
from reference import reference_model
from test_generate import run_and_compare
from tiny import left_padded, tiny_model

import swaa
from swaa import backends
from swaa.backends import Call, windowed
from swaa.plan import plan_forward
from swaa.rules import LayerRule

W = LayerRule
OWN_CASES = [
    Case((40, 33, 17), None, W(5, sink=3)),  # left-padded rows past their sinks: steady chunks shared by rows
    Case((40, 33, 17), None, W(5, sink=3), heads=6, kv_heads=3),
    Case((37,), None, W(1)),  # window 1, no sink: each query sees itself
    Case((37,), None, W(6, sink=2)),  # a plain prompt: sinks in the first slots, no copy of them
    Case((30, 30), 11, W(6, sink=2)),  # a later prefill chunk onto a cache, past the sinks
    Case((19, 12), None, W(50, sink=40)),  # window and sinks longer than the sequence
    Case((26, 21), 9, W(4, sink=2), keys_shuffled=True),  # a prefill chunk onto a ring's slots, past the sinks
    Case((26, 21), 1, W(4, sink=2), prompt_end=25, keys_shuffled=True),  # decode from a ring
    Case((26, 21), 4, W(4, sink=2, fa_decode=True), prompt_end=24),  # generated tokens among windowed ones
    Case((23, 23), None, W(None)),  # a full layer's prompt: sdpa's causal call
    Case((23, 16), None, W(None)),  # a padded full layer: masked chunks over every earlier key
]
# The shared cases at small chunks (tests/test_backends.py runs them at the default one), the long decode steps
# aside (one query: no chunking); this file's own cases at the default chunk too.
KERNEL_CASES = [(case, chunk) for case in CASES + GRADIENT_CASES for chunk in (3, 8)
                if not case.packed and max(case.lengths) < 1000]
KERNEL_CASES += [(case, chunk) for case in OWN_CASES for chunk in (3, 8, windowed.CHUNK)]


def _run(case: Case):
    query, key, value, plan, expected = make_inputs(case)
    scaling = case.head_dim**-0.5
    upstream = torch.randn(query.shape[0], query.shape[2], query.shape[1], query.shape[3],
                           generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = output_and_gradients(
        lambda q, k, v: windowed.attend(q, k, v, rule=case.rule, plan=plan, scaling=scaling)[0], query, key, value,
        upstream)
    want = output_and_gradients(lambda q, k, v: reference_output(q, k, v, expected, scaling), query, key, value,
                                upstream)
    return got, want


@pytest.mark.parametrize("case, chunk", KERNEL_CASES,
                         ids=lambda value: f"chunk{value}" if isinstance(value, int) else str(value))
def test_output_and_gradients_equal_the_float64_reference(case, chunk, monkeypatch):
    """With gradients (sinks copied beside each window) and without (sinks merged through the log-sum-exp)."""
    monkeypatch.setattr(windowed, "CHUNK", chunk)
    got, want = _run(case)
    for name, actual, wanted in zip(["output", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    query, key, value, plan, _ = make_inputs(case)
    with torch.no_grad():
        output, _ = windowed.attend(query, key, value, rule=case.rule, plan=plan, scaling=case.head_dim**-0.5)
    torch.testing.assert_close(output, want[0], rtol=1e-9, atol=1e-9)


def test_an_off_by_one_window_is_caught(monkeypatch):
    """The comparison above fails when the backend reads one key too many."""
    case = OWN_CASES[0]
    monkeypatch.setattr(windowed, "CHUNK", 8)
    query, key, value, plan, expected = make_inputs(case)
    wider = W(case.rule.window + 1, case.rule.sink)
    output, _ = windowed.attend(query, key, value, rule=wider, plan=plan, scaling=1.0)
    assert not torch.allclose(output, reference_output(query, key, value, expected, 1.0))


def test_the_cases_run_every_path(monkeypatch):
    """Shared steady masks, sinks read in place, sinks and ring slots gathered, padding-only chunks: each is
    reached by some case at chunk 8, so none of them is left untested."""
    monkeypatch.setattr(windowed, "CHUNK", 8)
    seen = set()
    for case in {case for case, _ in KERNEL_CASES}:
        query, key, value, plan, _ = make_inputs(case)
        if backends.get("sdpa").refuses(Call(query, key, value, case.rule, plan)) is None:
            seen.add("sdpa")
            continue
        schedule = windowed._schedule(case.rule, plan, 8)
        seen.add("causal head" if 0 < schedule.head < plan.query_pos.shape[1] else None)
        steady = [c.mask_key for c in schedule.chunks if c.mask_key[0] == "steady"]
        seen.add("shared steady mask" if len(steady) > len(set(steady)) else None)
        groups = windowed._groups(schedule.chunks, schedule.extra_slot.shape[1], 1)
        seen.update("steady chunks in one call" + (", sinks merged" if group[0].extra else "")
                    for group in groups if len(group) > 1)
        if any(c.extra for c in schedule.chunks):
            seen.add("extra keys in place" if schedule.extra_prefix else "extra keys gathered")
    assert seen >= {"sdpa", "causal head", "shared steady mask", "steady chunks in one call",
                    "steady chunks in one call, sinks merged", "extra keys in place",
                    "extra keys gathered"}


def test_values_of_another_width():
    """Multi-head latent attention (DeepSeek-V2) hands values narrower than its keys, from a ring too."""
    case = next(c for c in OWN_CASES if c.keys_shuffled)
    query, key, _, plan, expected = make_inputs(case)
    value = torch.randn(*key.shape[:3], 5, dtype=torch.float64)
    output, _ = windowed.attend(query, key, value, rule=case.rule, plan=plan, scaling=0.3)
    torch.testing.assert_close(output, reference_output(query, key, value, expected, 0.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sink", [0, 2])
def test_chunks_of_padding_alone_give_zeros(sink, monkeypatch):
    """Every row padded at the start (a mask the caller made): a chunk of padding queries reads no key."""
    monkeypatch.setattr(windowed, "CHUNK", 2)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]])
    plan = plan_forward(batch_size=2, q_len=8, past_len=0, device=torch.device("cpu"), attention_mask=mask)
    query, key, value = (torch.randn(2, heads, 8, 16, dtype=torch.float64) for heads in (4, 2, 2))
    rule = W(3, sink=sink)
    output, _ = windowed.attend(query, key, value, rule=rule, plan=plan, scaling=0.25)
    torch.testing.assert_close(output, reference_output(query, key, value, plan.mask(rule), 0.25), rtol=1e-12,
                               atol=1e-12)
    first = windowed._schedule(rule, plan, 2).chunks[0]
    assert first.lo == first.hi and first.extra == (sink > 0)


@pytest.mark.parametrize("q_len, past", [(600, 0), (1, 599)], ids=["prefill", "decode"])
def test_a_window_query_reads_its_window_and_sinks_only(q_len, past):
    """No chunk reads more than its queries' windows, the chunk and the sinks; nothing grows with the context."""
    rule = W(16, sink=4)
    plan = plan_forward(batch_size=2, q_len=q_len, past_len=past, device=torch.device("cpu"),
                        attention_mask=torch.ones(2, 600, dtype=torch.long), generate=past or None)
    schedule = windowed._schedule(rule, plan, 32)
    extra = schedule.extra_slot.shape[1]
    assert max(c.hi - c.lo + extra * c.extra for c in schedule.chunks) <= rule.window + 32 - 1 + rule.sink


def test_auto_takes_it_on_the_cpu_and_leaves_what_it_cannot_do_to_the_reference():
    query, key = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    plan = plan_forward(batch_size=1, q_len=6, past_len=0, device=torch.device("cpu"))
    packed = plan_forward(batch_size=1, q_len=6, past_len=0, device=torch.device("cpu"),
                          position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    rule = W(3, sink=1)
    assert backends.select("auto", Call(query, key, key, rule, plan)).name == "windowed"
    assert backends.select("auto", Call(query, key, key, rule, plan, need_weights=True)).name == "reference"
    assert backends.select("auto", Call(query, key, key, rule, packed)).name == "reference"
    assert backends.get("windowed").refuses(Call(query, key, key, rule, packed)).startswith("packed sequences")


@pytest.fixture
def schedules(monkeypatch):
    """Counts the windowed backend's schedules: it ran, and auto did not hand the calls elsewhere."""
    made = []
    schedule = windowed._schedule
    monkeypatch.setattr(windowed, "_schedule", lambda *args: made.append(args) or schedule(*args))
    return made


CONFIGS = {
    "recommended": dict(window=5, sink=2, interleave=2),
    "every_layer_bounded_cache": dict(window=5, sink=2, fa_decode=False),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_generate_equals_the_reference_backend_and_the_float64_rules(config, monkeypatch, schedules):
    """Left-padded rows past their window, a prompt over several chunks: the same tokens as the reference
    backend, and every step's logits those of the float64 rules."""
    monkeypatch.setattr(windowed, "CHUNK", 4)
    ids, mask = left_padded([19, 15, 8], total=19, seed=3)
    model = tiny_model("qwen3", dtype=torch.float32)
    ref = reference_model(model)
    out = run_and_compare(model, ref, CONFIGS[config], ids, mask)
    assert schedules
    swaa.unpatch_model(model)
    swaa.patch_model(model, **CONFIGS[config], backend="reference")
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=out.sequences.shape[1] - ids.shape[1],
                           do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, dense.sequences)
    for step, (windowed_logits, dense_logits) in enumerate(zip(out.logits, dense.logits)):
        torch.testing.assert_close(windowed_logits, dense_logits, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"step {step}: {m}")


def test_chunked_prefill_equals_the_float64_rules(monkeypatch, schedules):
    monkeypatch.setattr(windowed, "CHUNK", 4)
    ids, mask = left_padded([19, 13], total=19, seed=4)
    model = tiny_model("qwen3", dtype=torch.float32)
    run_and_compare(model, reference_model(model), dict(window=5, sink=2, interleave=2), ids, mask,
                    prefill_chunk_size=7)
    assert any(plan.kv_len > plan.query_pos.shape[1] > 1 for _, plan, _ in schedules)  # a chunk onto a cache


def test_training_gradients_equal_the_reference_backends(schedules):
    """A teacher-forced loss on a left-padded batch with FA decode: windowed and reference give the same
    gradients to every weight (float64)."""
    ids, mask = left_padded([21, 15], total=21, seed=5)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :12] = -100  # the prompt
    grads = []
    for backend in ("auto", "reference"):
        model = tiny_model("qwen3")
        swaa.patch_model(model, window=4, sink=2, interleave=3, backend=backend)
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert schedules
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")

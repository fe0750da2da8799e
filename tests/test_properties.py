"""Property tests: random small configs, lengths and padding against the float64 reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import logits as reference_logits
from reference import reference_model
from tiny import left_padded, tiny_model

import swaa

MODEL = tiny_model("qwen3", seed=11)
REFERENCE = reference_model(MODEL)


@st.composite
def configs(draw):
    fields = dict(window=draw(st.integers(1, 9)), sink=draw(st.integers(0, 4)))
    layers = draw(st.sampled_from(["none", "interleave", "list"]))
    if layers == "interleave":
        fields["interleave"] = draw(st.integers(1, 4))
        fields["interleave_offset"] = draw(st.integers(0, 3))
    elif layers == "list":
        fields["full_attention_layers"] = draw(st.lists(st.integers(0, 3), unique=True, max_size=3))
    decode = draw(st.sampled_from(["on", "off", "list"]))
    if decode == "list":
        full = set(fields.get("full_attention_layers", []))
        if "interleave" in fields:
            full = set(range(fields["interleave_offset"], 4, fields["interleave"]))
        fields["fa_decode"] = draw(st.lists(st.sampled_from([layer for layer in range(4) if layer not in full] or [0]), unique=True))
        if full & set(fields["fa_decode"]):
            fields["fa_decode"] = []
    else:
        fields["fa_decode"] = decode == "on"
    return fields


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=configs(), lengths=st.lists(st.integers(1, 14), min_size=1, max_size=3), new=st.integers(1, 4),
       chunk=st.sampled_from([None, 2, 5]), seed=st.integers(0, 1000))
def test_generate_matches_reference(fields, lengths, new, chunk, seed):
    total = max(lengths)
    ids, mask = left_padded(lengths, total, seed=seed)
    swaa.patch_model(MODEL, **fields)
    try:
        out = MODEL.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, prefill_chunk_size=chunk)
    finally:
        swaa.unpatch_model(MODEL)
    full_mask = torch.cat([mask, torch.ones(len(lengths), new, dtype=mask.dtype)], dim=1)
    generated = torch.zeros(out.sequences.shape[1], dtype=torch.bool)
    generated[total:] = True
    expected = reference_logits(REFERENCE, out.sequences, full_mask, generated.expand(len(lengths), -1), fields)
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits, expected[:, total - 1 + step].float(), rtol=1e-5, atol=1e-5)

"""swaa.eval.run_grid end to end on a tiny model: files, baseline, unpatched afterwards, config lists."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from tiny import chat_model, chat_tokenizer

import swaa
from swaa import SWAAConfig
from swaa.config import load_config_list
from swaa.eval import FULL_ATTENTION, config_name, run_grid, synthetic_dataset

CONFIGS = [{"window": 24, "sink": 4}, {"window": 24, "interleave": 2, "fa_decode": False}]


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return synthetic_dataset(tokenizer, ["needle", "variable_tracking"], 400, num=2, seed=0)


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tokenizer, dataset):
    """One grid run shared by the tests below; the model's logits and outputs before it, for comparison."""
    model = chat_model(tokenizer)
    probe = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    before_logits = model(probe).logits
    before_tokens = model.generate(probe, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    output_dir = tmp_path_factory.mktemp("grid")
    result = run_grid(model, tokenizer, dataset, CONFIGS, output_dir, max_new_tokens=4, batch_size=2,
                      progress=False, print_table=False)
    return dict(model=model, probe=probe, before_logits=before_logits, before_tokens=before_tokens,
                result=result, output_dir=output_dir, tokenizer=tokenizer)


def test_baseline_first_then_each_config(grid):
    names = [row["config"] for row in grid["result"].summary]
    assert names == [FULL_ATTENTION, "SWA 24 + FA decode + sink 4", "SWA 24 + full 1::2"]
    assert grid["result"].summary[0]["swaa_config"] is None
    assert grid["result"].summary[1]["swaa_config"] == SWAAConfig(window=24, sink=4).to_dict()
    for row in grid["result"].summary:
        assert row["n"] == 4 and 0 <= row["accuracy"] <= 1 and row["seconds_per_example"] > 0


def test_files_written(grid):
    output_dir, result = grid["output_dir"], grid["result"]
    for name in ("results.csv", "results.json", "results.md", "predictions.jsonl", "accuracy_vs_time.png"):
        assert (output_dir / name).stat().st_size > 0, name
    with open(output_dir / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["config"] for row in rows] == [row["config"] for row in result.summary]
    assert {"type: needle", "type: variable_tracking", "len 0-1k"} <= set(rows[0])
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["summary"] == result.summary and len(saved["records"]) == 3 * 4
    assert (output_dir / "accuracy_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (output_dir / "predictions.jsonl").read_text().splitlines()
    assert {"config", "id", "gold", "prediction", "output", "score", "seconds", "tokens"} <= set(json.loads(lines[0]))


def test_markdown_table_has_a_row_per_config_and_group_columns(grid):
    table = grid["result"].markdown().splitlines()
    assert table[0].startswith("| config | accuracy (%) | n | s / example")
    assert "type: needle" in table[0] and "type: variable_tracking" in table[0]
    assert len(table) == 2 + 3 and table[2].startswith(f"| {FULL_ATTENTION} |")


def test_model_unpatched_afterwards_with_identical_outputs(grid):
    model, probe = grid["model"], grid["probe"]
    with pytest.raises(ValueError, match="not patched"):
        swaa.describe(model)
    assert not hasattr(model.config, "swaa")
    assert torch.equal(model(probe).logits, grid["before_logits"])
    after = model.generate(probe, max_new_tokens=5, do_sample=False, pad_token_id=grid["tokenizer"].pad_token_id)
    assert torch.equal(after, grid["before_tokens"])


def test_same_outputs_for_full_attention_as_a_plain_generate(grid, tokenizer, dataset):
    """The baseline row is the unpatched model: its outputs are those of a plain greedy generate."""
    from swaa.data import prompt_ids

    record = next(r for r in grid["result"].records if r["config"] == FULL_ATTENTION and r["id"] == dataset[0]["id"])
    ids = prompt_ids(tokenizer, dataset[0]["prompt"], context=dataset[0]["context"])
    out = grid["model"].generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] - len(ids) == 4
    assert record["output"] == tokenizer.decode(out[0, len(ids):][: record["new_tokens"]])


def test_timings_exclude_the_warm_up_also_for_the_first_config(tokenizer, monkeypatch):
    """A one-time cost (here a second the first time the model sees an input shape, as kernels built per shape)
    falls on the untimed warm-up, reported apart: the baseline, which runs first, is not charged for it. The
    runner's clock counts those seconds only, so the machine's speed does not enter."""
    import types

    import swaa.eval.runner

    clock = [0.0]
    monkeypatch.setattr(swaa.eval.runner, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    model = chat_model(tokenizer)
    seen = set()

    def one_time_cost(module, args, kwargs):
        key = (tuple(kwargs["input_ids"].shape), int(kwargs["position_ids"].max()))  # tokens and cache length
        if key not in seen:
            seen.add(key)
            clock[0] += 1.0

    model.register_forward_pre_hook(one_time_cost, with_kwargs=True)
    data = [{"prompt": "x" * 30, "answer": "y"}] * 2  # one prompt length: every shape is the warm-up's
    result = run_grid(model, tokenizer, data, [{"window": 8}], max_new_tokens=4, progress=False, print_table=False,
                      plot=False)
    assert result.summary[0]["warmup_seconds"] == 4.0  # the prompt and 3 decode steps, seen first there
    assert [row["seconds_per_example"] for row in result.summary] == [0.0, 0.0]


def test_judge_hook_and_length_bins(tokenizer):
    model = chat_model(tokenizer)
    calls = []

    def judge(question, gold, prediction):
        calls.append(question)
        return 1.0

    data = [{"prompt": "x" * 30, "answer": "y", "question": "Q?", "question_type": "short"},
            {"prompt": "x" * 1100, "answer": "y", "question_type": "long"}]
    result = run_grid(model, tokenizer, data, [], judge=judge, max_new_tokens=2, progress=False, print_table=False)
    assert [row["config"] for row in result.summary] == [FULL_ATTENTION]  # the baseline even with no config
    assert result.summary[0]["accuracy"] == 1.0 and calls[0] == "Q?"
    assert set(result.by_length[FULL_ATTENTION]) == {"0-1k", "1k-2k"}
    assert result.settings["scorer"] == "judge:judge"


def test_length_filter_and_bad_inputs(tokenizer):
    model = chat_model(tokenizer)
    data = [{"prompt": "x" * 30, "answer": "y"}, {"prompt": "x" * 300, "answer": "y"}]
    result = run_grid(model, tokenizer, data, [], max_tokens=100, max_new_tokens=2, progress=False, print_table=False)
    assert result.summary[0]["n"] == 1
    with pytest.raises(ValueError, match="min_tokens=1000, max_tokens=None: no example left; the 2 prompts have"):
        run_grid(model, tokenizer, data, [], min_tokens=1000, progress=False)
    with pytest.raises(ValueError, match="scorer='bleu': unknown"):
        run_grid(model, tokenizer, data, [], scorer="bleu", progress=False)
    with pytest.raises(ValueError, match="dataset is empty"):
        run_grid(model, tokenizer, [], [], progress=False)
    with pytest.raises(ValueError, match="example 0: missing field 'answer'"):
        run_grid(model, tokenizer, [{"prompt": "x"}], [], progress=False)
    with pytest.raises(ValueError, match="config 0: window=0: must be"):
        run_grid(model, tokenizer, data, [{"window": 0}], progress=False)
    no_pad = chat_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="tokenizer.pad_token_id=None: batch_size=2 needs a pad token"):
        run_grid(model, no_pad, data, [], batch_size=2, progress=False)
    swaa.patch_model(model, window=8)
    with pytest.raises(ValueError, match="model is already patched by swaa"):
        run_grid(model, tokenizer, data, [], progress=False)


def test_config_lists_from_every_source(tmp_path):
    expected = [None, SWAAConfig(window=32, sink=4)]
    assert load_config_list([None, {"window": 32, "sink": 4}]) == expected
    assert load_config_list('[null, {"window": 32, "sink": 4}]') == expected
    assert load_config_list('{"window": 32, "sink": 4}') == expected[1:]
    yaml_file = tmp_path / "configs.yaml"
    yaml_file.write_text("- null\n- window: 32\n  sink: 4\n")
    assert load_config_list(yaml_file) == expected
    authors = tmp_path / "settings.json"
    authors.write_text(json.dumps([
        {"swaa_config": {"sliding_window_size": None}},
        {"swaa_config": {"sliding_window_size": 32, "keep_first": 4, "force_fa_decode": True,
                         "non_sliding_layers": [1, 3, 5, 7]}},
    ]))
    parsed = load_config_list(authors)
    assert parsed[0] is None and parsed[1].window == 32 and parsed[1].sink == 4 and parsed[1].fa_decode is True
    assert config_name(parsed[1]) == "SWA 32 + FA decode + sink 4 + full [1, 3, 5, 7]"


@pytest.mark.parametrize(
    "configs, message",
    [("[{oops", "inline JSON does not parse"), ("missing.yaml", "neither inline JSON nor an existing"),
     ([{"size": 3}], r"config 0: unknown SWAA config field\(s\) \['size'\]"), ([7], "config 0: 7: must be a dict")],
)
def test_bad_configs_say_what_is_allowed(configs, message):
    with pytest.raises(ValueError, match=message):
        load_config_list(configs)


def test_a_loaded_tokenizer_without_a_pad_token_pads_with_eos(tmp_path):
    from swaa.eval.runner import load_tokenizer

    saved = chat_tokenizer()
    saved.pad_token = None
    saved.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).pad_token == "<eos>"

"""swaa.eval.data: the fields of an example, the length filter, the answer after </think> (loading and
prompts: tests/test_data.py)."""

from __future__ import annotations

import csv
import json

import pytest

from swaa.eval.data import extract_answer, filter_by_length, to_examples

RECORDS = [
    {"prompt": "Where is the key? {context}", "context": "The key is in the box.", "answer": "box",
     "question": "Where is the key?", "question_type": "single"},
    {"prompt": "Name both colors.", "answer": ["red", "blue"], "question_type": "multi"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_jsonl_loads_every_field(tmp_path):
    examples = to_examples(write_jsonl(tmp_path / "data.jsonl", RECORDS))
    assert [e.answer for e in examples] == [["box"], ["red", "blue"]]
    assert examples[0].question == "Where is the key?" and examples[0].question_type == "single"
    assert examples[0].text == "Where is the key? The key is in the box."  # {context} filled in
    assert examples[1].text == "Name both colors." and examples[1].context is None


def test_csv_loads_with_a_json_list_answer(tmp_path):
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["prompt", "answer", "question_type"])
        writer.writeheader()
        writer.writerow({"prompt": "Q1", "answer": "42", "question_type": "num"})
        writer.writerow({"prompt": "Q2", "answer": '["red", "blue"]', "question_type": ""})
    examples = to_examples(path)
    assert [e.answer for e in examples] == [["42"], ["red", "blue"]]
    assert examples[0].question_type == "num" and examples[1].question_type is None


def test_json_list_and_in_memory_sources_agree(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    assert to_examples(path) == to_examples(RECORDS)


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"answer": "A"}], "example 0: missing field 'prompt'"),
        ([{"prompt": "Q", "answer": "A"}, {"prompt": "Q"}], "example 1: missing field 'answer'"),
        ([{"prompt": "Q", "answer": ""}], "missing field 'answer'"),
        ([{"prompt": "Q", "answer": {"a": 1}}], "answer={'a': 1}: must be"),
        ([], "dataset is empty"),
        ({"prompt": "Q", "answer": "A"}, "got one dict"),
        (["just text"], "example 0: must be a dict"),
    ],
    ids=["no_prompt", "no_answer", "empty_answer", "dict_answer", "empty", "one_dict", "not_a_dict"],
)
def test_bad_examples_name_the_field(records, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{").replace("[", r"\[")):
        to_examples(records)


def test_missing_field_error_lists_what_is_allowed():
    with pytest.raises(ValueError, match=r"required fields: \['prompt', 'answer'\], optional: \['question'"):
        to_examples([{"question": "Q", "answer": "A"}])


def test_length_filter_bounds_are_inclusive():
    assert filter_by_length([5, 10, 15, 20], min_tokens=10, max_tokens=15) == [1, 2]
    assert filter_by_length([5, 10], None, None) == [0, 1]
    with pytest.raises(ValueError, match="min_tokens=20 > max_tokens=10"):
        filter_by_length([5], 20, 10)
    with pytest.raises(ValueError, match="max_tokens=-1: must be None or an int >= 0"):
        filter_by_length([5], None, -1)


@pytest.mark.parametrize(
    "output, expected",
    [
        ("<think>hmm, maybe 4</think> The answer is 5.", "The answer is 5."),
        ("<think>a</think>b</think> final", "final"),  # the last </think> counts
        ("plain answer  ", "plain answer"),
        ("<think>still thinking when tokens ran out", ""),
        ("</think>42<eos><pad>", "42"),
    ],
    ids=["thinking", "last_think_end", "no_thinking", "unfinished", "special_tokens_dropped"],
)
def test_extract_answer_takes_text_after_last_think_end(output, expected):
    assert extract_answer(output, ["<eos>", "<pad>"]) == expected


def test_context_the_model_would_not_see_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="swaa"):
        to_examples([{"prompt": "Q?", "context": "Some document.", "answer": "A", "id": "x1"}])
    assert "first: id x1" in caplog.text and "will not see it" in caplog.text
    assert not caplog.records[0].getMessage().startswith("swaa")  # the logger's name says it already

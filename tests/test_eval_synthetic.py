"""swaa.eval.synthetic: RULER-style tasks land near the asked length and hold their answer."""

from __future__ import annotations

import pytest

from swaa.data import prompt_ids
from swaa.eval.synthetic import TASKS, synthetic_dataset, synthetic_example
from tiny import chat_tokenizer

TOKENIZER = chat_tokenizer()
SENTENCE = 70  # longest filler sentence, in tokens of the byte tokenizer


def prompt_tokens(record, chat_template="auto"):
    return len(prompt_ids(TOKENIZER, record["prompt"], context=record["context"], chat_template=chat_template))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1000, 3000])
def test_length_lands_just_under_the_target(task, length):
    record = synthetic_example(TOKENIZER, task, length, seed=1)
    assert length - SENTENCE <= prompt_tokens(record) <= length


@pytest.mark.parametrize("task", TASKS)
def test_answer_is_in_the_context_and_asked_for(task):
    record = synthetic_example(TOKENIZER, task, 1500, seed=2)
    answers = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
    for answer in answers:
        assert answer in record["context"]
    assert record["question"] in record["prompt"] and "{context}" in record["prompt"]
    assert record["question_type"] == task


def test_variable_tracking_chain_leads_to_every_gold_variable():
    record = synthetic_example(TOKENIZER, "variable_tracking", 1500, seed=3, num_hops=3)
    names = record["answer"]
    assert len(names) == 4
    value = record["question"].split("value ")[1].split()[0]
    assert f"VAR {names[0]} = {value}." in record["context"]
    for old, new in zip(names, names[1:]):
        assert f"VAR {new} = {old}." in record["context"]


def test_same_seed_same_examples_other_seed_other_examples():
    first = synthetic_dataset(TOKENIZER, ["needle", "multikey"], 800, num=2, seed=5)
    assert first == synthetic_dataset(TOKENIZER, ["needle", "multikey"], 800, num=2, seed=5)
    other = synthetic_dataset(TOKENIZER, ["needle", "multikey"], 800, num=2, seed=6)
    assert [r["answer"] for r in first] != [r["answer"] for r in other]
    assert len({r["id"] for r in first}) == 4


def test_length_counts_the_chat_template_or_not():
    plain = synthetic_example(TOKENIZER, "needle", 1000, chat_template=False)
    assert 1000 - SENTENCE <= prompt_tokens(plain, chat_template=False) <= 1000


def test_bad_task_and_length():
    with pytest.raises(ValueError, match="task='haystack': unknown; allowed: 'needle', 'multikey', 'variable_tracking'"):
        synthetic_example(TOKENIZER, "haystack", 1000)
    with pytest.raises(ValueError, match="length=0: must be a positive int"):
        synthetic_example(TOKENIZER, "needle", 0)

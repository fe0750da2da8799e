"""swaa.data: one loader and one prompt builder, and fine-tuning and evaluation both use them."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from tiny import chat_model, chat_tokenizer
from tokenizers import processors

from swaa.data import fill_context, format_prompt, load_examples, prompt_ids
from swaa.eval.data import to_examples
from swaa.eval.runner import _prepare
from swaa.train import PromptAnswerCollator, self_distill

RECORDS = [
    {"prompt": "Where is the key? {context}", "context": "The key is in the box.", "answer": "box"},
    {"prompt": "Name both colors.", "answer": ["red", "blue"]},
]


def write(path, records):
    """``records`` as a file of the type ``path`` names (in a table, a list answer is written as JSON)."""
    flat = [{**r, "answer": r["answer"] if isinstance(r["answer"], str) else json.dumps(r["answer"])} for r in records]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["prompt", "context", "answer"])
            writer.writeheader()
            writer.writerows(flat)
    else:
        import datasets

        datasets.Dataset.from_list(flat).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_gives_the_same_examples(tmp_path, suffix):
    rows = load_examples(write(tmp_path / f"data{suffix}", RECORDS))
    assert type(rows).__name__ == "Dataset" and len(rows) == 2
    assert rows[0]["prompt"] == RECORDS[0]["prompt"] and rows[1]["context"] is None  # absent: None
    assert [e.answer for e in to_examples(rows)] == [["box"], ["red", "blue"]]


def test_in_memory_sources_are_returned_as_given_and_folders_are_read(tmp_path):
    import datasets

    assert load_examples(RECORDS) is RECORDS
    dataset = datasets.Dataset.from_list([{"prompt": "Q", "answer": "A"}])
    assert load_examples(dataset) is dataset
    test = datasets.Dataset.from_list([{"prompt": "Q2", "answer": "A2"}])
    datasets.DatasetDict({"train": dataset, "test": test}).save_to_disk(tmp_path / "saved")
    assert list(load_examples(tmp_path / "saved")) == [{"prompt": "Q", "answer": "A"}]
    assert load_examples(tmp_path / "saved", split="test")[0]["prompt"] == "Q2"


@pytest.mark.parametrize(
    "source, message",
    [
        ("absent.jsonl", r"dataset='.*absent.jsonl': no such file or folder; allowed: a .jsonl, .json, .csv, .parquet"),
        ("data.txt", r"dataset='.*data.txt': unknown file type '.txt'; allowed: a .jsonl"),
        ("bad.jsonl", r"dataset='.*bad.jsonl': not readable as jsonl \(.*JSON"),
        ({"prompt": "Q", "answer": "A"}, "dataset: got one dict; allowed: .*a list of dicts"),
        (7, "dataset: got one int"),
    ],
    ids=["missing", "unknown_type", "bad_json", "one_dict", "not_iterable"],
)
def test_bad_sources_say_what_is_allowed(tmp_path, source, message):
    (tmp_path / "data.txt").write_text("x")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Q", "answer": "A"}\n{oops\n')
    with pytest.raises(ValueError, match=message):
        load_examples(tmp_path / source if isinstance(source, str) else source)


def test_chat_template_when_the_tokenizer_has_one_raw_text_otherwise():
    tokenizer = chat_tokenizer()
    assert format_prompt(tokenizer, "Hi") == "<|user|>Hi\n<|assistant|>"
    assert format_prompt(tokenizer, "Hi", system="Be brief.") == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"
    assert format_prompt(tokenizer, "Hi", chat_template=False) == "Hi"
    plain = chat_tokenizer(chat_template=False)
    assert format_prompt(plain, "Hi") == "Hi" and format_prompt(plain, "Hi", system="S") == "S\n\nHi"
    with pytest.raises(ValueError, match="chat_template=True: this tokenizer has no chat template"):
        format_prompt(plain, "Hi", chat_template=True)
    for bad in ("yes", None):
        with pytest.raises(ValueError, match=rf"chat_template={bad!r}: must be True, False or 'auto'"):
            format_prompt(tokenizer, "Hi", chat_template=bad)


def test_template_kwargs_reach_the_template():
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = "{% if flag %}FLAG {% endif %}{{ messages[0]['content'] }}"
    assert format_prompt(tokenizer, "Hi", template_kwargs={"flag": True}) == "FLAG Hi"


def test_prompt_ids_fill_the_context_and_add_special_tokens_to_raw_text_only():
    tokenizer = chat_tokenizer()
    assert fill_context("Q {context}?", "doc") == "Q doc?" and fill_context("Q?", "doc") == "Q?"
    ids = prompt_ids(tokenizer, "a{context}", context="b")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|user|>", "a", "b", "Ċ", "<|assistant|>"]
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.bos_token_id)])
    assert tokenizer.convert_ids_to_tokens(prompt_ids(tokenizer, "ab", chat_template=False)) == ["<bos>", "a", "b"]
    assert tokenizer.convert_ids_to_tokens(prompt_ids(tokenizer, "ab"))[0] == "<|user|>"  # the template's text only


def test_training_and_evaluation_build_the_same_prompt(tmp_path):
    """The collator's prompt (labels -100), self-distillation's prompt and the eval grid's prompt are the same
    token ids, chat template, system prompt and ``{context}`` included."""
    tokenizer = chat_tokenizer()
    record = {"prompt": "Find it: {context}", "context": "it is here", "answer": "here"}
    expected = prompt_ids(tokenizer, record["prompt"], context=record["context"], system="Be brief.")
    collated = PromptAnswerCollator(tokenizer, system="Be brief.").encode(record)
    assert collated["input_ids"][: collated["labels"].count(-100)] == expected
    evaluated = _prepare(to_examples([record]), tokenizer, "auto", "Be brief.", None, None, None)[0].ids
    assert evaluated == expected

    seen = []

    def generate(input_ids, attention_mask, **kwargs):  # the teacher records the prompt it is given
        seen.append(input_ids[0][attention_mask[0].bool()].tolist())
        return torch.cat([input_ids, input_ids[:, :1]], 1)

    teacher = chat_model(tokenizer)
    teacher.generate = generate
    self_distill(teacher, tokenizer, [record], system="Be brief.", max_new_tokens=1)
    assert seen == [expected]

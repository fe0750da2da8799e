"""Evaluation examples: loading (jsonl, json, csv, parquet, lists of dicts, ``datasets.Dataset``), the chat
template, the token-length filter, and the answer a model gave (the text after its last ``</think>``).

Fields of one example: ``prompt`` (the text the model reads) and ``answer`` (a string, or a list of strings)
are required; ``question``, ``question_type`` and ``context`` are optional. When ``prompt`` holds the
placeholder ``{context}`` it is filled with the example's ``context``; otherwise the prompt is used as is
and ``context`` is kept only as information. ``question`` is what an LLM judge is shown (the prompt when
absent); ``question_type`` groups the accuracy table.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

logger = logging.getLogger("swaa")

REQUIRED_FIELDS = ("prompt", "answer")
OPTIONAL_FIELDS = ("question", "question_type", "context", "id")
FILE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
THINK_END = "</think>"
THINK_START = "<think>"


@dataclass
class Example:
    """One evaluation example. ``answer`` is a list of gold strings (one item for a plain answer)."""

    prompt: str
    answer: list[str]
    question: str | None = None
    question_type: str | None = None
    context: str | None = None
    id: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """What the model reads before any chat template: the prompt, ``{context}`` filled in."""
        if self.context is not None and "{context}" in self.prompt:
            return self.prompt.replace("{context}", self.context)
        return self.prompt


def _answer_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("[") and stripped.endswith("]"):  # a list written as JSON, as in a CSV cell
            try:
                parsed = json.loads(stripped)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return _answer_list(parsed, where)
        return [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        items = list(value)
        if items and all(isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in items):
            return [str(item) for item in items]
    raise ValueError(f"{where}: answer={value!r}: must be a string, a number or a non-empty list of strings")


def to_example(record, index: int = 0) -> Example:
    """Check one record (a mapping) and turn it into an Example; errors name the field and the record."""
    where = f"example {index}"
    if isinstance(record, Example):
        return record
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: must be a dict with fields {list(REQUIRED_FIELDS)}, got {type(record).__name__}")
    for name in REQUIRED_FIELDS:
        value = record.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(
                f"{where}: missing field {name!r}; required fields: {list(REQUIRED_FIELDS)},"
                f" optional: {list(OPTIONAL_FIELDS)}; it has {sorted(record)}"
            )
    if not isinstance(record["prompt"], str):
        raise ValueError(f"{where}: prompt={record['prompt']!r}: must be a string")
    optional = {}
    for name in ("question", "question_type", "context"):
        value = record.get(name)
        if value is not None and not (isinstance(value, float) and value != value):  # NaN: an empty CSV/parquet cell
            optional[name] = str(value) if value != "" else None
    extra = {k: v for k, v in record.items() if k not in REQUIRED_FIELDS + OPTIONAL_FIELDS}
    return Example(
        prompt=record["prompt"],
        answer=_answer_list(record["answer"], where),
        id=str(record.get("id", index)),
        extra=extra,
        **optional,
    )


def _read_jsonl(path) -> list:
    records = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
    return records


def _read_parquet(path) -> list:
    try:
        import pyarrow.parquet
    except ImportError:
        pyarrow = None
    if pyarrow is not None:
        return pyarrow.parquet.read_table(path).to_pylist()
    try:
        import pandas
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); use jsonl or csv otherwise") from None
    return pandas.read_parquet(path).to_dict("records")


def read_records(path: str | os.PathLike) -> list:
    """Records of a local file: .jsonl (one JSON object a line), .json (a list), .csv (header row), .parquet."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"dataset={path!r}: no such file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json dataset must hold a list of examples (or {{'data': [...]}})")
        return data
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as file:
            return list(csv.DictReader(file))
    if suffix == ".parquet":
        return _read_parquet(path)
    raise ValueError(f"dataset={path!r}: unknown file type {suffix!r}; allowed: {', '.join(FILE_FORMATS)}")


def load_examples(dataset) -> list[Example]:
    """Examples from a path (see ``read_records``), a list of dicts or Examples, or a ``datasets.Dataset``."""
    if isinstance(dataset, (str, os.PathLike)):
        records = read_records(dataset)
    elif isinstance(dataset, Mapping):
        raise ValueError("dataset: got one dict; pass a list of examples (dicts with 'prompt' and 'answer')")
    elif isinstance(dataset, Iterable):
        records = list(dataset)  # a list, or a datasets.Dataset (iterates over dict rows)
    else:
        raise ValueError(
            f"dataset: got {type(dataset).__name__}; allowed: a path ({', '.join(FILE_FORMATS)}),"
            " a list of dicts, or a datasets.Dataset"
        )
    if not records:
        raise ValueError("dataset is empty: it needs at least one example with 'prompt' and 'answer'")
    examples = [to_example(record, index) for index, record in enumerate(records)]
    unseen = [e.id for e in examples if e.context and "{context}" not in e.prompt and e.context not in e.prompt]
    if unseen:
        logger.warning(
            "swaa.eval: %d example(s) (first: id %s) have a context that the prompt neither contains nor places"
            " with {context}: the model will not see it", len(unseen), unseen[0])
    return examples


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer, chat_template: bool | str = "auto") -> bool:
    """Whether prompts go through the tokenizer's chat template: True, False, or "auto" (when it has one)."""
    if chat_template not in (True, False, "auto"):
        raise ValueError(f"chat_template={chat_template!r}: must be True, False or 'auto'")
    if chat_template is True and not has_chat_template(tokenizer):
        raise ValueError("chat_template=True: this tokenizer has no chat template; use 'auto' or False")
    return has_chat_template(tokenizer) if chat_template == "auto" else chat_template


def format_prompt(tokenizer, text: str, chat_template: bool | str = "auto", system: str | None = None,
                  template_kwargs: dict | None = None) -> str:
    """The string the model reads: ``text`` as one user turn through the tokenizer's chat template, with the
    assistant's turn opened, when ``chat_template`` is True, or "auto" and the tokenizer has one; else ``text``.
    ``template_kwargs`` go to ``apply_chat_template`` (e.g. ``{"enable_thinking": False}`` for Qwen3)."""
    if not uses_chat_template(tokenizer, chat_template):
        return text if system is None else f"{system}\n\n{text}"
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {}))


def encode_prompt(tokenizer, text: str, chat_template: bool | str = "auto") -> list[int]:
    """Token ids of a formatted prompt: a chat template writes its own special tokens (BOS included), so
    only plain text gets the tokenizer's."""
    return tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer, chat_template))["input_ids"]


def filter_by_length(lengths: list[int], min_tokens: int | None = None, max_tokens: int | None = None) -> list[int]:
    """Indices of the lengths inside ``[min_tokens, max_tokens]`` (either bound may be None)."""
    for name, value in (("min_tokens", min_tokens), ("max_tokens", max_tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{name}={value!r}: must be None or an int >= 0")
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        raise ValueError(f"min_tokens={min_tokens} > max_tokens={max_tokens}: no example could pass")
    return [
        index
        for index, length in enumerate(lengths)
        if (min_tokens is None or length >= min_tokens) and (max_tokens is None or length <= max_tokens)
    ]


def extract_answer(output: str, special_tokens: Iterable[str] = ()) -> str:
    """The answer in a model's output: the text after the last ``</think>``, stripped, special tokens removed.

    An output that opens ``<think>`` and never closes it has no answer yet (the thinking ran out of tokens): "".
    """
    if THINK_END in output:
        output = output.rsplit(THINK_END, 1)[1]
    elif THINK_START in output:
        return ""
    for token in special_tokens:
        if token:
            output = output.replace(token, "")
    return output.strip()

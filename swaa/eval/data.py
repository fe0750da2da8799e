"""Evaluation examples: their fields checked (``swaa.data`` loads them and builds their prompts, as for
fine-tuning), the token-length filter, and the answer a model gave (the text after its last ``</think>``).

Fields of one example: ``prompt`` (the text the model reads) and ``answer`` (a string, or a list of strings)
are required; ``question``, ``question_type`` and ``context`` are optional. When ``prompt`` holds the
placeholder ``{context}`` it is filled with the example's ``context``; otherwise the prompt is used as is
and ``context`` is kept only as information. ``question`` is what an LLM judge is shown (the prompt when
absent); ``question_type`` groups the accuracy table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..data import fill_context, load_examples

logger = logging.getLogger("swaa")

REQUIRED_FIELDS = ("prompt", "answer")
OPTIONAL_FIELDS = ("question", "question_type", "context", "id")
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
        return fill_context(self.prompt, self.context)


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
        if value is not None:
            optional[name] = str(value) if value != "" else None
    extra = {k: v for k, v in record.items() if k not in REQUIRED_FIELDS + OPTIONAL_FIELDS}
    return Example(
        prompt=record["prompt"],
        answer=_answer_list(record["answer"], where),
        id=str(index if record.get("id") is None else record["id"]),  # a file's rows hold None for absent fields
        extra=extra,
        **optional,
    )


def to_examples(dataset) -> list[Example]:
    """Checked Examples from anything ``swaa.data.load_examples`` reads (a file, a list of dicts, a
    ``datasets.Dataset``) or a list of Examples; errors name the example and the field."""
    records = list(load_examples(dataset))
    if not records:
        raise ValueError("dataset is empty: it needs at least one example with 'prompt' and 'answer'")
    examples = [to_example(record, index) for index, record in enumerate(records)]
    unseen = [e.id for e in examples if e.context and "{context}" not in e.prompt and e.context not in e.prompt]
    if unseen:
        logger.warning(
            "%d example(s) (first: id %s) have a context that the prompt neither contains nor places"
            " with {context}: the model will not see it", len(unseen), unseen[0])
    return examples


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

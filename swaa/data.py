"""Examples and prompts, one path for fine-tuning and for evaluation: a model is evaluated on prompts built
by the same code as the prompts it was fine-tuned on.

- ``load_examples``: rows of dicts from a .jsonl, .json, .csv or .parquet file or a ``save_to_disk`` folder
  (read with ``datasets``), or a list of dicts or a ``datasets.Dataset`` as given.
- ``format_prompt`` / ``prompt_ids``: a prompt as one user turn of the tokenizer's chat template (the
  assistant's turn opened) when it has one, else as raw text; ``{context}`` in a prompt is replaced by the
  example's ``context``.

``datasets`` is imported when a file is read, not with this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_examples(source, *, split: str = "train"):
    """Examples as indexable rows of dicts: a ``datasets.Dataset`` for a file or a folder, ``source`` itself
    for a list of dicts or a ``datasets.Dataset``.

    ``source``: a .jsonl / .json / .csv / .parquet file, a folder written by ``Dataset.save_to_disk`` (its
    ``split`` when it holds a ``DatasetDict``), a list of dicts or a ``datasets.Dataset``.
    """
    allowed = f"a {', '.join(FILE_FORMATS)} file, a folder written by datasets' save_to_disk"
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, Mapping) or not isinstance(source, Iterable):
            raise ValueError(f"dataset: got one {type(source).__name__}; allowed: {allowed}, a list of dicts or a"
                             " datasets.Dataset")
        return source
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ValueError(f"dataset={path!r}: no such file or folder; allowed: {allowed}")
    suffix = os.path.splitext(path)[1].lower()
    if not os.path.isdir(path) and suffix not in FILE_FORMATS:
        raise ValueError(f"dataset={path!r}: unknown file type {suffix!r}; allowed: {allowed}")
    import datasets

    if os.path.isdir(path):
        loaded = datasets.load_from_disk(path)
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    try:
        return datasets.load_dataset(FILE_FORMATS[suffix], data_files=path, split="train")
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise ValueError(f"dataset={path!r}: not readable as {suffix[1:]} ({cause})") from None


def uses_chat_template(tokenizer, chat_template: bool | str = "auto") -> bool:
    """Whether prompts go through the tokenizer's chat template: True, False, or "auto" (when it has one)."""
    if not (isinstance(chat_template, bool) or chat_template == "auto"):
        raise ValueError(f"chat_template={chat_template!r}: must be True, False or 'auto'")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is True and not has_template:
        raise ValueError("chat_template=True: this tokenizer has no chat template; use 'auto' or False")
    return has_template if chat_template == "auto" else chat_template


def fill_context(prompt: str, context: str | None) -> str:
    """``prompt`` with its ``{context}`` placeholder replaced by ``context``; without either, ``prompt``."""
    if context is not None and "{context}" in prompt:
        return prompt.replace("{context}", context)
    return prompt


def format_prompt(tokenizer, text: str, chat_template: bool | str = "auto", system: str | None = None,
                  template_kwargs: dict | None = None) -> str:
    """The string the model reads: ``text`` as one user turn through the tokenizer's chat template, with the
    assistant's turn opened, when ``chat_template`` is True, or "auto" and the tokenizer has one; else ``text``
    (after ``system`` and a blank line, when given). ``template_kwargs`` go to ``apply_chat_template`` (e.g.
    ``{"enable_thinking": False}`` for Qwen3)."""
    if not uses_chat_template(tokenizer, chat_template):
        return text if system is None else f"{system}\n\n{text}"
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(template_kwargs or {}))


def prompt_ids(tokenizer, prompt: str, *, context: str | None = None, chat_template: bool | str = "auto",
               system: str | None = None, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a prompt as the model reads it (``fill_context``, then ``format_prompt``). A chat template
    writes its own special tokens (BOS included), so only raw text gets the tokenizer's."""
    text = format_prompt(tokenizer, fill_context(prompt, context), chat_template, system, template_kwargs)
    return tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer, chat_template))["input_ids"]

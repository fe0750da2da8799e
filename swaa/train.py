"""SWA-aware fine-tuning (arXiv 2512.10411, method 4): training sees the same mask as inference.

A patched model already trains under the SWAA rules: its labels, with the prompt masked as -100, tell
each sequence where the answer starts (FA decode applies from there on), also per packed sequence. This
module adds what a training run needs around that:

- ``PromptAnswerCollator``: a data collator for the HF ``Trainer`` that tokenizes prompt + answer
  examples, masks the prompt and the padding as -100 in ``labels``, and pads (``DataCollatorForSeq2Seq``)
  or packs them into one row with restarting ``position_ids`` (``DataCollatorWithFlattening``).
- ``self_distill``: answers generated greedily by the original (unpatched) model, written next to the
  prompts as jsonl: the paper's training data.
- ``save_swaa_config`` / ``SWAAConfigCallback`` / ``load_adapter``: a peft adapter directory holds the
  LoRA weights only, so the SWAA config is written beside them as ``swaa_config.json`` and re-applied
  when the adapter is loaded.

Examples are loaded and prompts built by ``swaa.data`` (``load_examples``, ``prompt_ids``), as the
evaluation loads and builds them: the model is evaluated on the prompts it was fine-tuned on. Nothing here
imports peft or datasets until a function needs them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, TrainerCallback

from .config import SWAAConfig
from .data import load_examples, prompt_ids
from .patch import get_config, is_patched, patch_model

__all__ = [
    "IGNORE_INDEX", "PromptAnswerCollator", "SWAAConfigCallback", "SWAA_CONFIG_FILE", "load_adapter", "load_examples",
    "save_swaa_config", "self_distill", "swaa_config_of",
]
logger = logging.getLogger("swaa")

IGNORE_INDEX = -100
SWAA_CONFIG_FILE = "swaa_config.json"


# ---------------------------------------------------------------------------------------------- data


def _fit(prompt: list[int], answer: list[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """Cut an example to ``max_length`` tokens: the answer is kept whole if it fits (else its end is
    cut), and the prompt loses tokens from its middle, keeping its start (the sink tokens, the system
    prompt) and its end (the question), as LongBench-style evaluation does."""
    if max_length is None or len(prompt) + len(answer) <= max_length:
        return prompt, answer
    answer = answer[: max_length - 1]  # keep at least one prompt token
    room = max_length - len(answer)
    head = (room + 1) // 2
    return prompt[:head] + prompt[len(prompt) - (room - head) :], answer


@dataclass
class PromptAnswerCollator:
    """Data collator for the HF ``Trainer``: prompt + answer examples in, a training batch out.

    Each example is a dict with text fields ``prompt_field`` and ``answer_field`` (and ``context``, which
    fills a ``{context}`` placeholder in the prompt), or already tokenized as ``input_ids`` + ``labels``
    (prompt labels -100). The batch holds ``input_ids``, ``labels`` (the prompt and the padding as -100,
    so that the patched model finds where each answer starts), ``position_ids`` and, unless packed,
    ``attention_mask``:

    - padded (default): rows padded to the longest (``DataCollatorForSeq2Seq``) on the tokenizer's
      ``padding_side``; right padding is the usual choice for training, left works too.
      ``position_ids`` count the real tokens of each row from 0, as ``generate`` does.
    - ``packing=True``: the batch becomes one row of shape (1, total tokens) whose ``position_ids``
      restart at 0 for each example (``DataCollatorWithFlattening``), with no padding and no
      ``attention_mask``; swaa keeps the packed sequences apart and finds each one's answer.

    The answer gets the tokenizer's EOS token appended (``add_eos``). With ``max_length``, examples
    longer than that lose tokens from the middle of the prompt (see ``_fit``). The prompt is built by
    ``swaa.data.prompt_ids`` from ``chat_template`` (True, False, or "auto": the tokenizer's template when it
    has one), ``system`` and ``chat_template_kwargs``, as ``swaa.eval`` builds it.

    Text fields must reach the collator: give the ``Trainer`` ``remove_unused_columns=False``.
    """

    tokenizer: object
    max_length: int | None = None
    packing: bool = False
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    add_eos: bool = True
    chat_template: bool | str = "auto"
    system: str | None = None
    chat_template_kwargs: dict | None = None
    pad_to_multiple_of: int | None = None
    _padder: DataCollatorForSeq2Seq = field(init=False, repr=False)
    _flattener: DataCollatorWithFlattening = field(init=False, repr=False)

    def __post_init__(self):
        if not self.packing and self.tokenizer.pad_token_id is None:
            raise ValueError(
                "tokenizer.pad_token_id=None: padding needs a pad token (set tokenizer.pad_token, e.g. to the EOS"
                " token) or use packing=True"
            )
        self._padder = DataCollatorForSeq2Seq(
            self.tokenizer, padding=True, pad_to_multiple_of=self.pad_to_multiple_of,
            label_pad_token_id=IGNORE_INDEX, return_tensors="pt",
        )
        self._flattener = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def encode(self, example: dict) -> dict:
        """One example as ``{"input_ids": [...], "labels": [...]}``, the prompt's labels -100."""
        if "input_ids" in example and "labels" in example:
            ids, labels = list(example["input_ids"]), list(example["labels"])
            if self.max_length is not None:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            return {"input_ids": ids, "labels": labels}
        for name in (self.prompt_field, self.answer_field):
            if name not in example:
                raise KeyError(
                    f"example has no field {name!r} (fields: {sorted(example)}); set prompt_field/answer_field, and"
                    " give the Trainer remove_unused_columns=False so text fields reach the collator"
                )
        prompt = prompt_ids(
            self.tokenizer, example[self.prompt_field], context=example.get("context"),
            chat_template=self.chat_template, system=self.system, template_kwargs=self.chat_template_kwargs,
        )
        answer = self.tokenizer(example[self.answer_field], add_special_tokens=False)["input_ids"]
        if self.add_eos and self.tokenizer.eos_token_id is not None:
            answer = answer + [self.tokenizer.eos_token_id]
        if not prompt:
            raise ValueError("an example has an empty prompt: swaa needs at least one prompt token per sequence")
        prompt, answer = _fit(prompt, answer, self.max_length)
        return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(example) for example in examples]
        if self.packing:
            return self._flattener(encoded, return_tensors="pt")
        batch = self._padder([{**e, "attention_mask": [1] * len(e["input_ids"])} for e in encoded])
        mask = batch["attention_mask"]
        batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return dict(batch)


# --------------------------------------------------------------------------------- self-distillation


def self_distill(
    model,
    tokenizer,
    prompts: Iterable,
    output: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 1024,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    chat_template: bool | str = "auto",
    system: str | None = None,
    chat_template_kwargs: dict | None = None,
    **generate_kwargs,
) -> list[dict]:
    """Answer each prompt greedily with the original full-attention ``model``, as the paper built its
    training data; returns the records and, with ``output``, writes them as jsonl in the input order.

    ``prompts``: strings, or dicts (a list or a ``datasets.Dataset``) with a ``prompt_field``; each record
    keeps the example's other fields and gets ``answer_field``. Prompts are formatted as
    ``PromptAnswerCollator`` formats them, batched by length with left padding, and decoded without
    special tokens. The model must not be patched: the teacher is full attention.
    """
    if is_patched(model):
        raise ValueError(
            "self_distill generates the teacher's answers with the original full-attention model, and this model"
            " is patched by swaa: call swaa.unpatch_model(model) first"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer.pad_token_id=None: batched generation needs a pad token (e.g. the EOS token)")
    records = [{prompt_field: p} if isinstance(p, str) else dict(p) for p in prompts]
    encoded = [
        prompt_ids(tokenizer, r[prompt_field], context=r.get("context"), chat_template=chat_template, system=system,
                   template_kwargs=chat_template_kwargs)
        for r in records
    ]
    order = sorted(range(len(records)), key=lambda i: -len(encoded[i]))  # longest first: memory trouble shows early
    device = model.device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer.pad(
                {"input_ids": [encoded[i] for i in rows]}, padding=True, padding_side="left", return_tensors="pt"
            ).to(device)
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    **generate_kwargs,
                )
            answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, answer in zip(rows, answers):
                records[i][answer_field] = answer
            logger.info("self-distilled %d / %d prompts", min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    if output is not None:
        with open(output, "w") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records


# ------------------------------------------------------------------------------ config with adapters


def swaa_config_of(model) -> SWAAConfig:
    """The SWAAConfig a model (transformers or peft) is patched with."""
    config = get_config(model)
    if config is None:
        raise ValueError(f"{type(model).__name__} is not patched by swaa: there is no SWAA config to save")
    return config


def save_swaa_config(model, directory: str | os.PathLike) -> str:
    """Write the SWAA config of a patched model as ``directory/swaa_config.json``; returns the path.

    A peft adapter directory holds the LoRA weights and ``adapter_config.json`` only, not the base
    model's config where ``model.config.swaa`` lives, so the SWAA config is saved beside them.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SWAA_CONFIG_FILE)
    with open(path, "w") as file:
        json.dump(swaa_config_of(model).to_dict(), file, indent=2)
    return path


class SWAAConfigCallback(TrainerCallback):
    """``Trainer`` callback: every checkpoint directory gets the SWAA config beside the adapter."""

    def __init__(self, model):
        self.config = swaa_config_of(model)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(directory):
                with open(os.path.join(directory, SWAA_CONFIG_FILE), "w") as file:
                    json.dump(self.config.to_dict(), file, indent=2)
        return control


def load_adapter(model, adapter_dir: str | os.PathLike, **overrides):
    """A base model with a SWAA-fine-tuned adapter, patched as it was trained; returns the PeftModel.

    ``model``: the unpatched base transformers model; ``adapter_dir``: where ``save_pretrained`` put
    the adapter and ``save_swaa_config`` the config; ``overrides``: SWAAConfig fields to change (e.g.
    ``backend="flash"``).
    """
    from peft import PeftModel

    config = SWAAConfig.from_json_file(os.path.join(adapter_dir, SWAA_CONFIG_FILE))
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    return patch_model(peft_model, config, **overrides)

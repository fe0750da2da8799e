"""The grid runner: for full attention and each SWAA config, patch, generate greedily, score, time, unpatch;
then the results table (markdown), CSV, JSON, per-example predictions and the accuracy-against-time plot."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from ..config import load_config_list
from ..data import prompt_ids
from ..patch import is_patched, patch_model, unpatch_model
from ..tables import markdown_table
from .configs import FULL_ATTENTION, config_name, covers_every_key, with_baseline
from .data import Example, extract_answer, filter_by_length, to_examples
from .scoring import DEFAULT_LENGTH_EDGES, accuracy_by, get_scorer, length_bin, scorer_name

logger = logging.getLogger("swaa")

FILES = {"csv": "results.csv", "json": "results.json", "markdown": "results.md",
         "predictions": "predictions.jsonl", "plot": "accuracy_vs_time.png"}


@dataclass
class GridResult:
    """What a grid produced. ``summary``: one row per config (full attention first); ``records``: one per
    config and example; ``by_type`` / ``by_length``: ``{config: {group: {"accuracy", "n"}}}``."""

    summary: list[dict]
    records: list[dict]
    by_type: dict[str, dict]
    by_length: dict[str, dict]
    settings: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        """The results table: accuracy overall, per question type and per length bin, time per example."""
        types = sorted({group for groups in self.by_type.values() for group in groups})
        bins = sorted({group for groups in self.by_length.values() for group in groups}, key=_bin_order)
        extra = ([f"type: {t}" for t in types] if len(types) > 1 else []) + (
            [f"len {b}" for b in bins] if len(bins) > 1 else [])
        header = ["config", "accuracy (%)", "n", "s / example", "new tokens / example"] + extra
        rows = []
        for row in self.summary:
            name = row["config"]
            cells = [name, f"{100 * row['accuracy']:.1f}", row["n"], f"{row['seconds_per_example']:.3f}",
                     f"{row['new_tokens_per_example']:.1f}"]
            if len(types) > 1:
                cells += [_percent(self.by_type[name].get(t)) for t in types]
            if len(bins) > 1:
                cells += [_percent(self.by_length[name].get(b)) for b in bins]
            rows.append(cells)
        return markdown_table(header, rows)

    def to_json(self) -> dict:
        return {"settings": self.settings, "summary": self.summary, "by_type": self.by_type,
                "by_length": self.by_length, "records": self.records}


def _percent(group: dict | None) -> str | None:
    return None if group is None else f"{100 * group['accuracy']:.1f}"


def _bin_order(label: str) -> float:
    head = label.lstrip("<").split("-")[0].rstrip("+")
    number = float(head[:-1]) * 1024 if head.endswith("k") else float(head)
    return number - (0.5 if label.startswith("<") else 0)


def local_model_folder(path: str | os.PathLike) -> str:
    """``path`` when it is a local folder; else a clear error at once (never minutes of hub retries offline)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"model={path!r}: not a local folder (swaa loads models offline, from save_pretrained)")
    return path


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer from a local folder; one without a pad token pads with its EOS token (batches are padded
    by ``tokenizer.pad``, which needs one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model_folder(path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | os.PathLike, dtype: str = "auto", device: str | None = None, **kwargs):
    """A causal LM and its tokenizer (``load_tokenizer``) from a local folder (``from_pretrained``, never the
    network). ``device``: "cpu", "cuda", ... or None for the GPU when there is one."""
    from transformers import AutoModelForCausalLM

    path = local_model_folder(path)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None or (dtype != "auto" and not isinstance(torch_dtype, torch.dtype)):
        raise ValueError(f"dtype={dtype!r}: must be 'auto' or a torch dtype name such as 'bfloat16', 'float32'")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype, **kwargs)
    tokenizer = load_tokenizer(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Prepared:
    example: Example
    ids: list[int]


def _prepare(examples, tokenizer, chat_template, system, template_kwargs, min_tokens, max_tokens):
    ids = [prompt_ids(tokenizer, example.prompt, context=example.context, chat_template=chat_template, system=system,
                      template_kwargs=template_kwargs) for example in examples]
    keep = filter_by_length([len(row) for row in ids], min_tokens, max_tokens)
    if not keep:
        lengths = [len(row) for row in ids]
        raise ValueError(
            f"min_tokens={min_tokens}, max_tokens={max_tokens}: no example left; the {len(ids)} prompts have"
            f" {min(lengths)} to {max(lengths)} tokens"
        )
    if len(keep) < len(ids):
        logger.info("%d of %d examples within the token limits", len(keep), len(ids))
    return [_Prepared(examples[i], ids[i]) for i in keep]


def _new_token_count(row: list[int], stop_ids: set[int]) -> int:
    for position, token in enumerate(row):
        if token in stop_ids:
            return position + 1
    return len(row)


def _batches(prepared: list[_Prepared], batch_size: int, tokenizer):
    """(indices into ``prepared``, left-padded inputs) per batch; batches of similar lengths waste little on
    padding (results go back to the dataset's order)."""
    order = list(range(len(prepared)))
    if batch_size > 1:
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer.pad_token_id=None: batch_size={batch_size} needs a pad token (set"
                             " tokenizer.pad_token, e.g. to the EOS token) or batch_size=1")
        order.sort(key=lambda i: len(prepared[i].ids))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        inputs = tokenizer.pad({"input_ids": [prepared[i].ids for i in rows]}, padding=batch_size > 1,
                               padding_side="left", return_tensors="pt")
        yield rows, inputs


def _generate_all(model, tokenizer, prepared, batch_size, generate_kwargs, name, progress, warmup):
    """Greedy outputs (decoded text, new tokens, seconds) for each prepared example, in order, and the seconds
    of the warm-up. With ``warmup``, the first batch is generated once untimed before the timed run: one-time
    costs (kernels built or compiled for its shapes, the allocator's growth) are then off every config's clock,
    the first config's too."""
    from tqdm import tqdm

    device = model.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"do_sample": False, "num_beams": 1, "pad_token_id": 0 if pad_id is None else pad_id, **generate_kwargs}
    if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
        kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    stop_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    special = list(tokenizer.all_special_tokens)
    batches = list(_batches(prepared, batch_size, tokenizer))
    warmup_seconds = None
    if warmup:
        began = time.perf_counter()
        model.generate(**batches[0][1].to(device), **kwargs)
        _synchronize(device)
        warmup_seconds = time.perf_counter() - began
    outputs: list = [None] * len(prepared)
    bar = tqdm(total=len(prepared), desc=name, disable=not progress, leave=False)
    for rows, inputs in batches:
        inputs = inputs.to(device)
        width = inputs["input_ids"].shape[1]
        _synchronize(device)
        began = time.perf_counter()
        sequences = model.generate(**inputs, **kwargs)
        _synchronize(device)
        seconds = (time.perf_counter() - began) / len(rows)
        for row, i in enumerate(rows):
            new = sequences[row, width:].tolist()
            used = _new_token_count(new, stop_ids)
            text = tokenizer.decode(new[:used], skip_special_tokens=False)
            outputs[i] = (text, extract_answer(text, special), used, seconds)
        bar.update(len(rows))
    bar.close()
    return outputs, warmup_seconds


def _summarize(name, config, records, warmup_seconds) -> dict:
    n = len(records)
    return {
        "config": name,
        "accuracy": sum(r["score"] for r in records) / n,
        "n": n,
        "seconds_per_example": sum(r["seconds"] for r in records) / n,
        "new_tokens_per_example": sum(r["new_tokens"] for r in records) / n,
        "warmup_seconds": warmup_seconds,
        "swaa_config": None if config is None else config.to_dict(),
    }


def run_grid(model, tokenizer, dataset, configs, output_dir: str | os.PathLike | None = None, *,
             scorer="substring", judge=None, max_new_tokens: int = 32, batch_size: int = 1,
             min_tokens: int | None = None, max_tokens: int | None = None, chat_template: bool | str = "auto",
             system: str | None = None, template_kwargs: dict | None = None, length_edges=DEFAULT_LENGTH_EDGES,
             generate_kwargs: dict | None = None, warmup: bool = True, progress: bool = True,
             print_table: bool = True, plot: bool = True) -> GridResult:
    """Compare SWAA configs with full attention on ``dataset``; write the results to ``output_dir``.

    Args:
        model: a transformers causal LM (unpatched; it is patched and unpatched once per config) or a local
            folder to load with ``from_pretrained`` (then ``tokenizer`` may be None).
        dataset: a .jsonl/.json/.csv/.parquet path, a list of dicts, or a ``datasets.Dataset`` with fields
            ``prompt``, ``answer`` (optional ``question``, ``question_type``, ``context``); see swaa.eval.data.
        configs: SWAAConfigs, dicts (ours or the authors' fields), inline JSON, or a .json/.yaml file; full
            attention (None) is always run first as the baseline.
        scorer: "substring" (every gold item in the prediction), "exact", "choice" or a callable
            ``scorer(prediction, gold_list, example) -> float``; ``judge(question, gold, prediction)``
            replaces it when given.
        max_new_tokens, batch_size, generate_kwargs: greedy generation settings (left padding in batches).
        min_tokens, max_tokens: keep examples whose formatted prompt has this many tokens.
        chat_template, system, template_kwargs: how the prompt is built (``swaa.data.prompt_ids``, as for
            fine-tuning).
        length_edges: token counts that bound the length bins of the accuracy table.
        warmup: generate the first batch once per config, untimed, before the timed run (its seconds are
            reported apart as ``warmup_seconds``).
        progress, print_table, plot: tqdm bars, the markdown table on stdout, the PNG.
    Returns:
        a GridResult; with ``output_dir`` also results.csv, results.json, results.md, predictions.jsonl and
        accuracy_vs_time.png there (the plot needs matplotlib).
    """
    if isinstance(model, (str, os.PathLike)):
        model, loaded_tokenizer = load_model(model)
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("tokenizer=None: pass the model's tokenizer (or a model folder that holds one)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive int")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive int")
    score = get_scorer(scorer, judge)
    examples = to_examples(dataset)
    grid = with_baseline(load_config_list(configs))
    if is_patched(model):
        raise ValueError("model is already patched by swaa: unpatch it (swaa.unpatch_model) so that the full"
                         " attention baseline is the original model")
    prepared = _prepare(examples, tokenizer, chat_template, system, template_kwargs, min_tokens, max_tokens)
    generate_kwargs = {"max_new_tokens": max_new_tokens, **(generate_kwargs or {})}
    if model.device.type == "cpu" and len(grid) > 1:
        logger.warning("on a CPU the time column compares swaa's CPU attention with PyTorch's full-attention kernel,"
                       " not the GPU kernels the speed-ups are measured with (README: Cost on a CPU)")
    longest = max(len(item.ids) for item in prepared)
    for config in grid[1:]:
        if covers_every_key(config, longest, max_new_tokens):
            logger.warning("%s: window %d covers every token of these prompts (at most %d tokens): it attends"
                           " as full attention does, and its row differs from full attention's in time only",
                           config_name(config), config.window, longest)

    from tqdm import tqdm

    records, summary, by_type, by_length = [], [], {}, {}
    was_training = model.training
    model.eval()
    try:
        for config in tqdm(grid, desc="configs", disable=not progress):
            name = config_name(config)
            if config is not None:
                patch_model(model, config)
            try:
                outputs, warmup_seconds = _generate_all(model, tokenizer, prepared, batch_size, generate_kwargs,
                                                        name, progress, warmup)
            finally:
                if config is not None:
                    unpatch_model(model)
            rows = []
            for item, (output, prediction, used, seconds) in zip(prepared, outputs):
                example = item.example
                rows.append({
                    "config": name, "id": example.id, "question_type": example.question_type or "all",
                    "tokens": len(item.ids), "length_bin": length_bin(len(item.ids), length_edges),
                    "gold": example.answer, "prediction": prediction, "output": output,
                    "score": float(score(prediction, example.answer, example)), "seconds": seconds,
                    "new_tokens": used,
                })
            records += rows
            summary.append(_summarize(name, config, rows, warmup_seconds))
            by_type[name] = accuracy_by(rows, "question_type")
            by_length[name] = accuracy_by(rows, "length_bin")
    finally:
        model.train(was_training)

    settings = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "scorer": scorer_name(score), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "examples": len(prepared), "min_tokens": min_tokens, "max_tokens": max_tokens,
        "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""), "warmup": warmup,
    }
    result = GridResult(summary, records, by_type, by_length, settings)
    if output_dir is not None:
        write_results(result, output_dir, plot=plot)
    if print_table:
        print(result.markdown())
    return result


def write_results(result: GridResult, output_dir: str | os.PathLike, plot: bool = True) -> dict[str, str]:
    """Write results.csv, results.json, results.md, predictions.jsonl (and the plot); returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {key: os.path.join(os.fspath(output_dir), name) for key, name in FILES.items()}
    rows = []
    for row in result.summary:
        flat = {key: value for key, value in row.items() if key != "swaa_config"}
        flat.update({f"type: {group}": v["accuracy"] for group, v in result.by_type[row["config"]].items()})
        flat.update({f"len {group}": v["accuracy"] for group, v in result.by_length[row["config"]].items()})
        flat["swaa_config"] = json.dumps(row["swaa_config"])
        rows.append(flat)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(paths["csv"], "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["json"], "w", encoding="utf-8") as file:
        json.dump(result.to_json(), file, indent=1)
    with open(paths["predictions"], "w", encoding="utf-8") as file:
        for record in result.records:
            file.write(json.dumps(record) + "\n")
    with open(paths["markdown"], "w", encoding="utf-8") as file:
        file.write(result.markdown() + "\n")
    if plot:
        try:
            from .plot import plot_accuracy_vs_time

            title = f"{result.settings.get('model', '')}: {result.settings.get('examples')} examples"
            plot_accuracy_vs_time(result.summary, paths["plot"], title=title)
        except ImportError as error:
            logger.warning("no plot written (%s)", error)
            del paths["plot"]
    else:
        del paths["plot"]
    result.files = paths
    return paths


__all__ = ["FULL_ATTENTION", "GridResult", "load_model", "load_tokenizer", "run_grid", "write_results"]

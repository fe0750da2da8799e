"""SWAAConfig: the single description of a SWAA patch, validated once when built.

Everything else (layer rules, the attention call, the checkpoint) reads this object. It also accepts the
field names and settings files of the paper authors' code, so their configurations move over unchanged.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import asdict, dataclass, fields

MAX_TOKENS = 2**63 - 1  # positions are int64 tensors: a larger window or sink would wrap around inside torch

# The authors' field names (their swaa_config.py) and ours; their defaults differ from ours.
AUTHORS_FIELDS = {
    "sliding_window_size": "window",
    "keep_first": "sink",
    "force_fa_decode": "fa_decode",
    "non_sliding_layers": "full_attention_layers",
}
_AUTHORS_DEFAULTS = {"keep_first": 0, "force_fa_decode": False, "non_sliding_layers": []}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _layer_list(name: str, value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name}={value!r}: must be a list of layer indices (ints >= 0)")
    layers = tuple(value)
    for layer in layers:
        if not _is_int(layer) or layer < 0:
            raise ValueError(f"{name}={list(layers)!r}: {layer!r} is not a layer index (an int >= 0)")
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise ValueError(f"{name}={list(layers)!r}: layer(s) {repeated} listed more than once")
    return tuple(int(layer) for layer in layers)


@dataclass(frozen=True)
class SWAAConfig:
    """Sliding window attention adaptation of a full-attention model (arXiv 2512.10411).

    Args:
        window: keys each SWA query sees, itself included (flash-attn ``window_size=(window-1, 0)``).
        sink: the first ``sink`` real tokens of each sequence stay visible to every query.
        interleave: keep full attention in layers ``interleave_offset + k * interleave``.
        interleave_offset: first full-attention layer when ``interleave`` is set (1: odd layers for n=2).
        full_attention_layers: explicit list of full-attention layers; excludes ``interleave``.
        fa_decode: generated tokens attend to every earlier token in SWA layers: True (all SWA
            layers), False, or a list of the SWA layers that do so.
        backend: "auto" (fastest exact path on the device), or a backend's name: "reference", "windowed",
            "flash", "flex" (``swaa.backends.NAMES``; each backend declares itself in ``swaa/backends``).
        drop_layers_beyond_depth: ignore (with a warning) layer indices past the model's depth instead
            of failing; set for configs in the authors' format, whose lists run past small models.
        bounded_cache: SWA layers without FA decode keep only their sinks and last ``window - 1`` keys in
            the KV cache (exact: no later query sees the others). False keeps every token in every layer.
        compile_prefill: a prompt of one row with no keys before it (no padding; of a chunked prompt, the
            first chunk), without gradients, runs the decoder through ``torch.compile`` with dynamic shapes:
            one compilation per process serves every length (``swaa.prefill``); batches, padding and later
            chunks run eagerly. Off by default: the first prompt then costs minutes of compilation (2-4 on
            an H200 for a 36-layer model) for a 10-25% faster prefill. Not with a backend that declares it
            cannot be compiled ("flash", which plans its calls on the host).
    """

    window: int
    sink: int = 0
    interleave: int | None = None
    interleave_offset: int = 1
    full_attention_layers: tuple[int, ...] | None = None
    fa_decode: bool | tuple[int, ...] = True
    backend: str = "auto"
    drop_layers_beyond_depth: bool = False
    bounded_cache: bool = True
    compile_prefill: bool = False

    def __post_init__(self):
        for name in ("window", "sink", "interleave", "interleave_offset"):  # numpy ints become ints (JSON)
            value = getattr(self, name)
            if _is_int(value):
                object.__setattr__(self, name, int(value))
        if not _is_int(self.window) or not 1 <= self.window <= MAX_TOKENS:
            raise ValueError(
                f"window={self.window!r}: must be an int from 1 to 2**63 - 1 (keys seen by a query, itself included;"
                " a window longer than every sequence sees everything)"
            )
        if not _is_int(self.sink) or not 0 <= self.sink <= MAX_TOKENS:
            raise ValueError(f"sink={self.sink!r}: must be an int from 0 to 2**63 - 1")
        if self.interleave is not None and (not _is_int(self.interleave) or self.interleave < 1):
            raise ValueError(f"interleave={self.interleave!r}: must be None or a positive int")
        if not _is_int(self.interleave_offset) or self.interleave_offset < 0:
            raise ValueError(f"interleave_offset={self.interleave_offset!r}: must be an int >= 0")
        if self.interleave is None and self.interleave_offset != 1:
            raise ValueError(f"interleave_offset={self.interleave_offset!r} has no effect without interleave")
        if self.full_attention_layers is not None:
            if self.interleave is not None:
                raise ValueError(
                    f"interleave={self.interleave!r} and full_attention_layers={list(self.full_attention_layers)!r}:"
                    " give one or the other"
                )
            object.__setattr__(
                self, "full_attention_layers", _layer_list("full_attention_layers", self.full_attention_layers)
            )
        if not isinstance(self.fa_decode, bool):
            object.__setattr__(self, "fa_decode", _layer_list("fa_decode", self.fa_decode))
        from . import backends  # the registry imports this module: looked up when a config is built

        if self.backend not in backends.NAMES:
            raise ValueError(f"backend={self.backend!r}: must be one of {', '.join(map(repr, backends.NAMES))}")
        if not isinstance(self.drop_layers_beyond_depth, bool):
            raise TypeError(f"drop_layers_beyond_depth={self.drop_layers_beyond_depth!r}: must be a bool")
        if not isinstance(self.bounded_cache, bool):
            raise TypeError(f"bounded_cache={self.bounded_cache!r}: must be a bool")
        if not isinstance(self.compile_prefill, bool):
            raise TypeError(f"compile_prefill={self.compile_prefill!r}: must be a bool")
        if self.compile_prefill and self.backend != "auto" and (reason := backends.get(self.backend).uncompilable):
            compiled = [record.name for record in backends.RECORDS if record.nameable and not record.uncompilable]
            raise ValueError(
                f"compile_prefill=True with backend={self.backend!r}: {reason}; use backend='auto' or one of"
                f" {compiled}"
            )
        if self.full_attention_layers is not None and isinstance(self.fa_decode, tuple):
            both = sorted(set(self.full_attention_layers) & set(self.fa_decode))
            if both:
                raise ValueError(
                    f"fa_decode={list(self.fa_decode)!r}: layer(s) {both} are full-attention layers;"
                    " fa_decode lists SWA layers only"
                )

    def to_dict(self) -> dict:
        """Plain JSON-able dict (lists, not tuples), as stored in ``model.config.swaa``."""
        data = asdict(self)
        for name in ("full_attention_layers", "fa_decode"):
            if isinstance(data[name], tuple):
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SWAAConfig:
        """Build from our field names or from the authors' (``sliding_window_size``, ``keep_first``,
        ``force_fa_decode``, ``non_sliding_layers``), not a mix. Authors' configs take their defaults
        (no FA decode) and ignore layer indices beyond the model's depth, as their code does."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a SWAAConfig or a dict, got {type(data).__name__}")
        ours = {f.name for f in fields(cls)}
        theirs = set(AUTHORS_FIELDS)
        keys = set(data)
        unknown = sorted(keys - ours - theirs)
        if unknown:
            raise ValueError(
                f"unknown SWAA config field(s) {unknown}; allowed: {sorted(ours)}, or the authors' {sorted(theirs)}"
            )
        if keys & theirs:
            mixed = sorted(keys & ours)
            if mixed:
                raise ValueError(f"config mixes the authors' field names with ours ({mixed}); use one naming")
            authors = {**_AUTHORS_DEFAULTS, **data}
            if authors.get("sliding_window_size") is None:
                raise ValueError(
                    "sliding_window_size=None is the authors' full-attention baseline: there is nothing to patch,"
                    " leave the model unpatched"
                )
            return cls(
                **{AUTHORS_FIELDS[key]: value for key, value in authors.items()}, drop_layers_beyond_depth=True
            )
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> SWAAConfig:
        """Read one config: ours, the authors' fields, or one authors' entry ``{"swaa_config": {...}}``."""
        with open(path) as file:
            data = json.load(file)
        if isinstance(data, list):
            raise ValueError(f"{path} holds a list of {len(data)} configs: read it with swaa.config.load_config_list")
        if isinstance(data, dict) and "swaa_config" in data:
            data = data["swaa_config"]
        return cls.from_dict(data)


FULL_ATTENTION_WORDS = ("full", "full attention", "none", "null")  # what a config list may say for no patch


def _config_entry(entry, index: int) -> SWAAConfig | None:
    """One entry of a list: a SWAAConfig, a dict of our or the authors' fields, ``{"swaa_config": {...}}``, or
    full attention (None, "full", or the authors' ``sliding_window_size: null``)."""
    if entry is None or isinstance(entry, SWAAConfig):
        return entry
    if isinstance(entry, str) and entry.strip().lower() in FULL_ATTENTION_WORDS:
        return None
    if isinstance(entry, dict):
        if "swaa_config" in entry:
            return _config_entry(entry["swaa_config"], index)
        if "sliding_window_size" in entry and entry["sliding_window_size"] is None:
            return None
        try:
            return SWAAConfig.from_dict(entry)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config {index}: {error}") from None
    raise ValueError(
        f"config {index}: {entry!r}: must be a dict of SWAAConfig fields (window, sink, interleave, ...),"
        f" a SWAAConfig, or one of {list(FULL_ATTENTION_WORDS)} / None for full attention"
    )


def _read_config_file(path: str):
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"configs={path!r}: reading YAML needs pyyaml (pip install pyyaml)") from None
        with open(path, encoding="utf-8") as file:
            return yaml.safe_load(file)
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    raise ValueError(f"configs={path!r}: unknown file type; allowed: .json, .yaml, .yml")


def load_config_list(source) -> list[SWAAConfig | None]:
    """A list of configs, ``None`` standing for full attention, from a .json / .yaml / .yml file (such as the
    authors' settings lists, whose ``sliding_window_size: null`` entries are full attention), inline JSON
    text, a list of entries, or one entry (a dict, a SWAAConfig, None or "full")."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source).strip()
        if text[:1] in ("[", "{"):
            try:
                source = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"configs: inline JSON does not parse ({error.msg} at char {error.pos})") from None
        elif text.lower() in FULL_ATTENTION_WORDS:
            source = None
        elif os.path.exists(text):
            source = _read_config_file(text)
        else:
            raise ValueError(f"configs={text!r}: neither inline JSON nor an existing .json/.yaml file")
    if not isinstance(source, (list, tuple)):
        source = [source]
    return [_config_entry(entry, index) for index, entry in enumerate(source)]


def __getattr__(name: str):
    """``BACKENDS``: the backend names a config accepts, read from the registry (which imports this module,
    so it is looked up on use)."""
    if name == "BACKENDS":
        from .backends import NAMES

        return NAMES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

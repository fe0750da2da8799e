"""The touch points of transformers' internals, all in swaa/compat.py, each checked against the installed
transformers: when a rename breaks one, this file says which, and only compat.py changes."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from tiny import tiny_model
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel

from swaa import compat

SWAA = Path(__file__).resolve().parents[1] / "swaa"
# private names of transformers objects that swaa reads or calls; compat.py is the only module allowed them
PRIVATE = ("_attn_implementation", "_supports_attention_backend", "_can_set_attn_implementation",
           "_supports_default_dynamic_cache", "_get_static_cache_init_shape", "_previous_max_cache_length",
           "_is_user_defined", "_mask_length", "is_assistant", "inspect.getsource", "transformers.__version__",
           *compat.GENERATION_METHODS)


@pytest.mark.parametrize("name", compat.GENERATION_METHODS)
def test_each_wrapped_generation_method_exists_with_the_arguments_swaa_uses(name):
    parameters = inspect.signature(getattr(GenerationMixin, name)).parameters
    assert set(compat.GENERATION_METHODS[name]) <= set(parameters), (name, list(parameters))


def test_flash_attention_packed_lengths_are_what_the_flattening_collator_returns():
    from transformers import DataCollatorWithFlattening

    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": [3, 4]}, {"input_ids": [5]}])
    assert set(compat.PACKED_LENGTHS_KWARGS) <= set(batch)


def test_continuous_batching_entry_points_exist():
    assert all(hasattr(GenerationMixin, name) for name in compat.CONTINUOUS_BATCHING_METHODS)


def test_model_and_config_internals_exist():
    model = tiny_model("qwen3")
    assert compat.supports_attention_interface(model) and compat.supports_default_dynamic_cache(model)
    assert compat.static_cache_shape(model) == (2, 8)
    assert compat.attention_implementation(model.config) in ("sdpa", "eager")
    assert compat.remember_static_cache_length(model, 7) == 7 and compat.remember_static_cache_length(model, 3) == 7
    assert "is_assistant" in GenerationConfig().to_dict() or hasattr(GenerationConfig(), "is_assistant")
    assert compat.CACHE_KWARG in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert isinstance(model, PreTrainedModel) and compat.forward_source(type(model.model.layers[0])) is not None


def test_only_compat_touches_transformers_internals():
    offenders = []
    for path in SWAA.rglob("*.py"):
        if path.name == "compat.py":
            continue
        text = path.read_text()
        for name in PRIVATE:
            for match in re.finditer(rf"[\w)\]]\.{re.escape(name)}\b|\b{re.escape(name)}\(", text):
                line = text[: match.start()].count("\n") + 1
                if name in compat.GENERATION_METHODS and path.name == "generation.py":
                    continue  # the wrappers call the methods they wrap
                offenders.append(f"{path.relative_to(SWAA)}:{line}: {name}")
    assert not offenders, offenders

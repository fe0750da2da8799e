"""SWAAConfig: validation with clear messages, serialization, the authors' names and settings files."""

from __future__ import annotations

import json

import pytest

from swaa import SWAAConfig, backends
from swaa.config import load_config_list
from swaa.rules import FULL_ATTENTION, LayerRule, full_attention_layers, layer_rules


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (dict(window=0), ValueError, "window=0: must be an int from 1 to 2**63 - 1"),
        (dict(window=-3), ValueError, "window=-3: must be an int from 1 to 2**63 - 1"),
        (dict(window=2.5), ValueError, "window=2.5: must be an int from 1 to 2**63 - 1"),
        (dict(window=True), ValueError, "window=True: must be an int from 1 to 2**63 - 1"),
        (dict(window=2**63), ValueError, "window=9223372036854775808: must be an int from 1 to 2**63 - 1"),
        (dict(window=8, sink=-1), ValueError, "sink=-1: must be an int from 0 to 2**63 - 1"),
        (dict(window=8, sink=10**30), ValueError, f"sink={10**30}: must be an int from 0 to 2**63 - 1"),
        (dict(window=8, interleave=0), ValueError, "interleave=0: must be None or a positive int"),
        (dict(window=8, interleave=2, interleave_offset=-1), ValueError, "interleave_offset=-1: must be an int >= 0"),
        (dict(window=8, interleave_offset=0), ValueError, "interleave_offset=0 has no effect without interleave"),
        (dict(window=8, interleave=2, full_attention_layers=[1]), ValueError, "give one or the other"),
        (dict(window=8, full_attention_layers=[1, 3, 1]), ValueError, "layer(s) [1] listed more than once"),
        (dict(window=8, full_attention_layers=[1, -2]), ValueError, "-2 is not a layer index"),
        (dict(window=8, full_attention_layers=3), TypeError, "must be a list of layer indices"),
        (dict(window=8, fa_decode=[0, 0]), ValueError, "fa_decode=[0, 0]: layer(s) [0] listed more than once"),
        (dict(window=8, fa_decode="yes"), TypeError, "fa_decode='yes': must be a list of layer indices"),
        (dict(window=8, full_attention_layers=[1], fa_decode=[0, 1]), ValueError, "layer(s) [1] are full-attention"),
        (dict(window=8, backend="triton"), ValueError, "backend='triton': must be one of "
         + ", ".join(map(repr, backends.NAMES))),
        (dict(window=8, bounded_cache="yes"), TypeError, "bounded_cache='yes': must be a bool"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_bad_fields_name_field_value_and_what_is_allowed(fields, error, message):
    with pytest.raises(error, match=_escaped(message)):
        SWAAConfig(**fields)


def _escaped(text):
    import re

    return re.escape(text)


def test_dict_round_trip():
    config = SWAAConfig(window=16, sink=4, full_attention_layers=[0, 5], fa_decode=[1, 2], backend="reference")
    data = config.to_dict()
    assert data["full_attention_layers"] == [0, 5] and data["fa_decode"] == [1, 2]
    assert json.loads(json.dumps(data)) == data
    assert SWAAConfig.from_dict(data) == config


def test_authors_names_take_their_defaults():
    config = SWAAConfig.from_dict({"sliding_window_size": 2000, "keep_first": 100, "non_sliding_layers": [1, 3]})
    assert (config.window, config.sink, config.full_attention_layers) == (2000, 100, (1, 3))
    assert config.fa_decode is False  # their default, unlike ours
    assert config.drop_layers_beyond_depth
    assert config.bounded_cache  # not one of their fields: ours, on


def test_bounded_cache_is_on_by_default_and_serialized():
    assert SWAAConfig(window=8).bounded_cache is True
    data = SWAAConfig(window=8, bounded_cache=False).to_dict()
    assert data["bounded_cache"] is False and SWAAConfig.from_dict(data).bounded_cache is False


def test_authors_layers_beyond_depth_are_dropped_with_a_warning(caplog):
    config = SWAAConfig.from_dict({"sliding_window_size": 8, "force_fa_decode": True, "non_sliding_layers": [1, 3, 5, 7]})
    assert full_attention_layers(config, 4) == [1, 3]
    assert "[5, 7] beyond this model's 4 layers; ignored" in caplog.text


def test_our_layers_beyond_depth_are_an_error():
    with pytest.raises(ValueError, match=r"layer\(s\) \[4\] do not exist; this model has layers 0..3"):
        layer_rules(SWAAConfig(window=8, full_attention_layers=[1, 4]), 4)
    with pytest.raises(ValueError, match=r"fa_decode=\[9\]: layer\(s\) \[9\] do not exist"):
        layer_rules(SWAAConfig(window=8, fa_decode=[9]), 4)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"window": 8, "keep_first": 3}, "mixes the authors' field names with ours"),
        ({"window": 8, "sinks": 3}, "unknown SWAA config field(s) ['sinks']"),
        ({"sliding_window_size": None}, "sliding_window_size=None is the authors' full-attention baseline"),
    ],
)
def test_bad_dicts(data, message):
    with pytest.raises(ValueError, match=_escaped(message)):
        SWAAConfig.from_dict(data)


def test_from_dict_rejects_non_dicts():
    with pytest.raises(TypeError, match="config must be a SWAAConfig or a dict, got list"):
        SWAAConfig.from_dict([8])


def test_authors_settings_files(tmp_path):
    entries = [
        {"swaa_config": {"sliding_window_size": None, "keep_first": 0, "force_fa_decode": False, "non_sliding_layers": []}},
        {"swaa_config": {"sliding_window_size": 2000, "keep_first": 10, "force_fa_decode": True, "non_sliding_layers": [1, 3]}},
    ]
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(entries))
    baseline, config = load_config_list(path)
    assert baseline is None
    assert config == SWAAConfig(2000, 10, full_attention_layers=(1, 3), fa_decode=True, drop_layers_beyond_depth=True)
    single = tmp_path / "one.json"
    single.write_text(json.dumps(entries[1]))
    assert SWAAConfig.from_json_file(single) == config
    with pytest.raises(ValueError, match="holds a list of 2 configs"):
        SWAAConfig.from_json_file(path)


@pytest.mark.parametrize(
    "fields, full",
    [
        (dict(interleave=2), [1, 3, 5]),
        (dict(interleave=2, interleave_offset=0), [0, 2, 4, 6]),
        (dict(interleave=4), [1, 5]),
        (dict(interleave=3, interleave_offset=2), [2, 5]),
        (dict(full_attention_layers=[0, 6]), [0, 6]),
        (dict(), []),
    ],
)
def test_which_layers_keep_full_attention(fields, full):
    assert full_attention_layers(SWAAConfig(window=8, **fields), 7) == full


def test_layer_rules_follow_fa_decode_list():
    rules = layer_rules(SWAAConfig(window=8, sink=2, interleave=2, fa_decode=[0]), 4)
    assert rules == (LayerRule(8, 2, True), FULL_ATTENTION, LayerRule(8, 2, False), FULL_ATTENTION)

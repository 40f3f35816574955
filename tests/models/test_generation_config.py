"""Sampling defaults come from the checkpoint's generation_config.json (``auto``), or not at
all (``none``); ``--override-generation-config`` replaces them; bad overrides fail at start."""

from __future__ import annotations

import json

import pytest

from mmdisagg.config import GenerationSettings, SettingsError, load
from mmdisagg.models.generation_config import sampling_defaults

QWEN2_VL_INSTRUCT = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645],
                     "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1,
                     "top_p": 0.001}


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(QWEN2_VL_INSTRUCT))
    return tmp_path


def test_auto_takes_the_sampling_fields_of_generation_config(checkpoint, caplog):
    caplog.set_level("INFO")
    assert sampling_defaults(checkpoint, GenerationSettings()) == {
        "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1, "top_p": 0.001}
    assert '"temperature": 0.1' in caplog.text  # the server logs what it applies


def test_none_and_overrides(checkpoint):
    assert sampling_defaults(checkpoint, GenerationSettings(generation_config="none")) == {}
    overridden = GenerationSettings(override_generation_config='{"repetition_penalty": 1.0, '
                                                               '"max_new_tokens": 64}')
    assert sampling_defaults(checkpoint, overridden) == {
        "repetition_penalty": 1.0, "temperature": 0.1, "top_k": 1, "top_p": 0.001,
        "max_new_tokens": 64}


def test_a_checkpoint_without_generation_config_has_no_defaults(tmp_path):
    assert sampling_defaults(tmp_path, GenerationSettings()) == {}


@pytest.mark.parametrize(("value", "words"), [
    ("{temperature: 1}", "not JSON"), ("[1]", "JSON object"),
    ('{"temprature": 1}', "unknown key temprature"), ('{"top_k": "5"}', "numbers"),
])
def test_bad_overrides_fail_at_start_naming_the_knob(value, words):
    with pytest.raises(SettingsError, match=f"override-generation-config.*{words}"):
        load(GenerationSettings, {"override_generation_config": value}, environ={})

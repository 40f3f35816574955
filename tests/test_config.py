"""Settings: flags beat MMDISAGG_* variables beat defaults; bad values name the knob."""

from __future__ import annotations

import argparse

import pytest

from mmdisagg.config import PoolSettings, SettingsError, TransferSettings, add_arguments, load


def parse(argv, cls=PoolSettings):
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return parser.parse_args(argv)


def test_defaults():
    settings = load(PoolSettings, environ={})
    assert (settings.block_size, settings.default_blocks) == (128, 8)


def test_env_then_flag_precedence():
    env = {"MMDISAGG_BLOCK_SIZE": "64", "MMDISAGG_DEFAULT_BLOCKS": "4"}
    assert load(PoolSettings, environ=env).block_size == 64
    settings = load(PoolSettings, parse(["--block-size", "256"]), environ=env)
    assert settings.block_size == 256 and settings.default_blocks == 4


@pytest.mark.parametrize("value, reason", [
    ("0", "power of two"), ("-128", "power of two"), ("abc", "not an integer"),
    ("100", "power of two"), ("1.5", "not an integer"),
])
def test_bad_block_size_names_knob_and_value(value, reason):
    with pytest.raises(SettingsError) as err:
        load(PoolSettings, environ={"MMDISAGG_BLOCK_SIZE": value})
    assert "MMDISAGG_BLOCK_SIZE" in str(err.value) and repr(value) in str(err.value)
    assert reason in str(err.value)


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_bad_counts_fail(value):
    with pytest.raises(SettingsError, match="MMDISAGG_POOL_BLOCKS"):
        load(PoolSettings, environ={"MMDISAGG_POOL_BLOCKS": value})


def test_flag_errors_name_the_flag():
    with pytest.raises(SettingsError, match="--default-blocks='0'"):
        load(PoolSettings, parse(["--default-blocks", "0"]), environ={})


def test_default_window_larger_than_pool_is_refused():
    with pytest.raises(SettingsError, match="MMDISAGG_DEFAULT_BLOCKS=16 is larger"):
        load(PoolSettings, environ={"MMDISAGG_DEFAULT_BLOCKS": "16", "MMDISAGG_POOL_BLOCKS": "8"})



def test_configuration_doc_is_current():
    from pathlib import Path

    from mmdisagg.config import markdown
    doc = Path(__file__).parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == markdown(), "regenerate: python -m mmdisagg.config > " \
                                          "docs/configuration.md"


def test_to_args_round_trips_non_defaults_and_hides_secrets():
    from mmdisagg.config import LanguageServerSettings, ServeSettings, to_args
    serve = load(ServeSettings, {"block_size": "64", "auth_token": "s3cret", "port": "9000",
                                 "colocated": "1"}, environ={})
    args = to_args(serve, LanguageServerSettings, exclude=("port",))
    assert args == ["--block-size", "64"]
    parser = argparse.ArgumentParser()
    add_arguments(parser, LanguageServerSettings)
    assert load(LanguageServerSettings, parser.parse_args(args), environ={}).pool.block_size == 64


def test_mooncake_knobs_are_a_group_of_the_transfer_settings():
    env = {"MMDISAGG_MOONCAKE_PROTOCOL": "rdma", "MMDISAGG_MOONCAKE_DEVICE": "mlx5_0"}
    settings = load(TransferSettings, parse(["--mooncake-log-level", "ERROR"], TransferSettings),
                    environ=env)
    assert settings.mooncake.mooncake_protocol == "rdma"
    assert (settings.mooncake.mooncake_device, settings.mooncake.mooncake_log_level) == (
        "mlx5_0", "ERROR")
    with pytest.raises(SettingsError, match="MMDISAGG_MOONCAKE_PROTOCOL='ib': must be one of"):
        load(TransferSettings, environ={"MMDISAGG_MOONCAKE_PROTOCOL": "ib"})

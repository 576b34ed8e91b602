"""Typed config: defaults, YAML, overrides, one-line errors, resolved config round trip."""
from __future__ import annotations

import pytest

from fscs.config import RunConfig, config_from_dict, config_to_dict, load_config, parse_setting, save_config
from fscs.errors import FSCSError


def test_defaults_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 0.005\ndata:\n  fold: 3\n")
    cfg = load_config(y, ["train.epochs=7", "bench.settings=[1w5s,2w5s]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 0.005 and cfg.data.fold == 3 and cfg.train.epochs == 7
    assert cfg.bench.settings == ["1w5s", "2w5s"]
    assert cfg.model.backbone == RunConfig().model.backbone


@pytest.mark.parametrize(
    "override, needle",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["foo=1"], "unknown config key 'foo'"),
        (["data.fold=abc"], "'data.fold'"),
        (["train.regime=semi"], "'train.regime'"),
        (["train.precision=fp16"], "'train.precision'"),
        (["lr"], "not key=value"),
        (["bench.settings=[3x]"], "bad setting '3x'"),
    ],
)
def test_bad_keys_are_one_line_errors(override, needle):
    with pytest.raises(FSCSError) as err:
        load_config(None, override)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_unknown_key_in_yaml_names_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("model:\n  backbon: x\n")
    with pytest.raises(FSCSError, match="model.backbon.*bad.yaml.*model.backbone"):
        load_config(y)


def test_missing_file():
    with pytest.raises(FSCSError, match="not found"):
        load_config("/nonexistent/cfg.yaml")


def test_save_and_restore_roundtrip(tmp_path):
    cfg = load_config(None, ["name=abc", "train.regime=full"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_parse_setting():
    assert parse_setting("2w5s") == (2, 5)
    assert parse_setting("1W1S") == (1, 1)


def test_precision_auto_is_fp32_on_cpu_and_explicit_values_pass():
    import torch

    from fscs.train import resolve_precision

    assert load_config(None, []).train.precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"

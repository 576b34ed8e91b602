"""Typed config: defaults, YAML, overrides, one-line errors, resolved config round trip."""
from __future__ import annotations

import re

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
        (["model.weights="], "override 'model.weights=' has no value; write model.weights=null for none"),
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


def test_a_directory_given_for_a_file_is_named_so(tmp_path):
    """`--config configs/` (or a weights/labels/checkpoint folder) said 'not found' about a path that exists."""
    from fscs.data.sources.folder_plan import read_labels_csv
    from fscs.model.backbone_weights import read_state_dict
    from fscs.safe_load import load_untrusted

    for call in (lambda: load_config(tmp_path), lambda: read_state_dict(tmp_path),
                 lambda: load_untrusted(tmp_path), lambda: read_labels_csv(tmp_path, tmp_path)):
        with pytest.raises(FSCSError, match="is a directory; pass"):
            call()


def test_save_and_restore_roundtrip(tmp_path):
    cfg = load_config(None, ["name=abc", "train.regime=full"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_parse_setting():
    assert parse_setting("2w5s") == (2, 5)
    assert parse_setting("1W1S") == (1, 1)
    assert parse_setting(" 10w20s ") == (10, 20)
    for bad in ("1w1", "1w1ss", "0w1s", "1w0s", "w1s", "1x1s", "-1w1s"):
        with pytest.raises(FSCSError, match=f"bad setting '{bad}'"):
            parse_setting(bad)


def test_malformed_yaml_is_one_line_error_with_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(FSCSError, match=rf"{re.escape(str(bad))}:\d+: not valid YAML") as err:
        load_config(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["train.lr=inf", "train.cls_weight=nan", "train.seg_fg_weight=nan",
                                      "train.weight_decay=inf", "model.mask_threshold=nan",
                                      "train.enhancer_weight=inf"])
def test_non_finite_floats_are_refused(override):
    key, _, value = override.partition("=")
    with pytest.raises(FSCSError, match=re.escape(f"config key '{key}' is {float(value)}; it must be a finite")):
        load_config(None, [override])


def test_yaml_that_is_not_utf8_is_one_line_error(tmp_path):
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes(b"\xff\xfe train:\n  lr: 1e-3\n")  # e.g. a UTF-16 or Latin-1 file, or a binary
    with pytest.raises(FSCSError, match=rf"{re.escape(str(binary))}' cannot be read as UTF-8 YAML") as err:
        load_config(binary)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override,needle", [
    ("train.lr=-1", "'train.lr' (-1.0) must be > 0"),
    ("train.weight_decay=-1", "'train.weight_decay' (-1.0) and 'train.cls_weight' (0.1) >= 0"),
    ("train.cls_weight=-5", "'train.cls_weight' (-5.0) >= 0"),
    ("train.epochs=0", "'train.epochs' is 0; it must be >= 1"),
    ("data.batch_size=0", "'data.batch_size' is 0; it must be >= 1"),
    ("data.num_workers=-1", "'data.num_workers' is -1; it must be >= 0"),
    ("model.image_size=0", "'model.image_size' is 0; it must be >= 16"),
    ("train.seed=-1", "'train.seed' is -1; it must be >= 0"),
    ("data.shot=200", "'data.buffer_per_class' is 64; it must exceed data.shot (200)"),
    ("bench.settings=[1w1s,2w1s,1W1S]", "'bench.settings' lists 1W1S twice"),  # ran the evaluation twice
    ("name=../../elsewhere", "'name' is '../../elsewhere'; a run name is one folder under out_dir"),
    ("name=a/b", "'name' is 'a/b'"),
    ("model.mask_threshold=1.5", "'model.mask_threshold' is 1.5"),
    ("train.image_every=-1", "'train.image_every' is -1; it must be >= 0"),
])
def test_train_and_data_keys_are_validated(override, needle):
    with pytest.raises(FSCSError, match=re.escape(needle)):
        load_config(None, [override])


@pytest.mark.parametrize("override,needle", [
    ("bench.episodes=0", "'bench.episodes' is 0; it must be >= 1"),
    ("bench.batch_size=0", "'bench.batch_size' is 0; it must be >= 1"),
    ("bench.bootstrap=-1", "'bench.bootstrap' is -1; it must be >= 0"),
    ("bench.seed=-1", "'bench.seed' is -1; it must be >= 0"),
    ("bench.settings=[]", "'bench.settings' is empty"),
])
def test_bench_keys_are_validated(override, needle):
    with pytest.raises(FSCSError, match=re.escape(needle)):
        load_config(None, [override])


def test_precision_auto_is_fp32_on_cpu_and_explicit_values_pass():
    import torch

    from fscs.runtime import resolve_precision

    assert load_config(None, []).train.precision == "auto"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_cli_takes_overrides_on_both_sides_of_an_option(tmp_path, monkeypatch):
    """`fscs train a=1 --config c.yaml b=2`: both overrides apply (argparse alone rejected b=2)."""
    import fscs.cli as cli

    seen = {}

    def fake_train(args):
        seen["overrides"], seen["config"] = list(args.overrides), str(args.config)
        return 0

    monkeypatch.setattr(cli, "_cmd_train", fake_train)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.005\n")
    assert cli.main(["train", "data.fold=1", "--config", str(cfg), "name=y"]) == 0
    assert seen == {"overrides": ["data.fold=1", "name=y"], "config": str(cfg)}
    with pytest.raises(SystemExit):
        cli.main(["train", "data.fold=1", "--config", str(cfg), "--bogus"])


@pytest.mark.parametrize("argv", [["demo", "--nproc", "0"], ["demo", "--nproc", "-2"]])
def test_cli_process_counts_must_be_positive(argv, capsys):
    """--nproc 0 divided by zero (after the shards were built), a negative one failed inside torchrun."""
    import fscs.cli as cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and "--nproc: " in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """A KeyboardInterrupt (Ctrl-C in shard writing, bench, predict) printed a traceback from deep inside."""
    import fscs.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_shards", interrupted)
    try:
        code = cli.main(["shards", "synth", "--out", "x"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped fscs.cli.main (a traceback for the user)")
    assert code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fscs shards: interrupted (Ctrl-C)" in err

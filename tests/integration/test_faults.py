"""Faults and bad input during training: corrupt shards, missing weights, mismatched or hostile checkpoints,
GPU configs on CPU machines. (Killed ranks under torchrun and killed saves: test_resume.py.)"""
from __future__ import annotations

import faulthandler
import logging
import shutil
from pathlib import Path

import pytest
import torch

from fscs.config import load_config
from fscs.distributed import DistEnv
from fscs.errors import FSCSError
from fscs.train import Trainer

pytestmark = pytest.mark.slow

COMMON = ["model.image_size=64", "data.batch_size=2", "data.num_workers=0", "data.buffer_per_class=16",
          "train.steps_per_epoch=2", "train.epochs=1", "train.log_every=1"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(240, exit=True)  # a hang fails the run instead of blocking it
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """synthetic-5i with 40 images per tar: the training images span several trn shards."""
    from fscs.data.shards import write_shards
    from fscs.data.synthetic import (DATASET_NAME, GENERATOR_VERSION, SYNTH_CLASS_NAMES, SYNTH_FOLDS,
                                     generate_synthetic)

    out = tmp_path_factory.mktemp("data") / "synth40"
    return write_shards(generate_synthetic(0, 400, 96, 1), out, dataset=DATASET_NAME,
                        class_names=SYNTH_CLASS_NAMES, folds=dict(enumerate(SYNTH_FOLDS)),
                        samples_per_shard=40,
                        params={"seed": 0, "num_images": 400, "size": 96, "generator": GENERATOR_VERSION})


def _cfg(shards: Path, out: Path, name: str, *extra: str):
    return load_config(None, [f"data.shards={shards}", f"out_dir={out}", f"name={name}", *COMMON, *extra])


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    summary = Trainer(_cfg(shards, out, "base"), DistEnv()).fit()
    assert summary["status"] == "completed"
    return out


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_corrupt_and_truncated_shards_are_logged_skipped_and_training_continues(shards, tmp_path, caplog):
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    tars = sorted(bad.glob("trn-*.tar"))
    assert len(tars) >= 6
    for t in tars[:3]:  # truncated mid-file
        t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    for t in tars[3:5]:  # not a tar at all
        t.write_bytes(b"\x00garbage" * 1000)
    with caplog.at_level(logging.WARNING):
        summary = Trainer(_cfg(bad, tmp_path, "corrupt", "train.steps_per_epoch=3"), DistEnv()).fit()
    assert summary["status"] == "completed" and summary["steps"] == 3
    warned = {t.name for t in tars[:5] for r in caplog.records if t.name in r.getMessage()}
    assert warned, [r.getMessage() for r in caplog.records]  # the skipped shards are named in the log


def test_missing_backbone_weights_is_one_line_error(shards, tmp_path):
    with pytest.raises(FSCSError) as err:
        Trainer(_cfg(shards, tmp_path, "w", "model.weights=/no/such/dino.pth"), DistEnv())
    _one_line(err, "/no/such/dino.pth")


def test_gpu_config_on_cpu_machine_is_one_line_error(shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(FSCSError) as err:
        Trainer(_cfg(shards, tmp_path, "gpu", "train.device=cuda"), DistEnv())
    _one_line(err, "train.device", "train.device=cpu")


def test_checkpoint_of_another_backbone_or_config_is_refused(shards, trained):
    with pytest.raises(FSCSError) as err:  # other input size = other backbone features
        Trainer(_cfg(shards, trained, "base", "model.image_size=96"), DistEnv()).fit()
    _one_line(err, "image_size=64", "96", "model.image_size")
    with pytest.raises(FSCSError) as err:  # trained for another test fold: its classes were seen in training
        Trainer(_cfg(shards, trained, "base", "data.fold=1"), DistEnv()).fit()
    _one_line(err, "data.fold=0", "set data.fold=0", "name=")


class _Payload:
    """Unpickling this runs code (it creates the marker file) unless the loader refuses it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hostile_checkpoints_are_refused_without_running_code(shards, trained, tmp_path):
    from fscs.bench.runs import load_run

    marker = tmp_path / "pwned"
    run = tmp_path / "hostile"
    shutil.copytree(trained / "base", run)
    latest = (run / "state" / "latest").read_text().strip()
    torch.save({"step": 1, "config": _Payload(marker)}, run / "state" / latest / "trainer.pt")
    with pytest.raises(FSCSError) as err:
        Trainer(_cfg(shards, tmp_path, "hostile"), DistEnv()).fit()
    _one_line(err, "unreadable or unsafe", "trainer.pt")
    torch.save({"engine": {"head": _Payload(marker)}}, run / "best.pt")
    with pytest.raises(FSCSError) as err:
        load_run(run)  # bench prefers best.pt
    _one_line(err, "best.pt", "unsafe")
    assert not marker.exists()

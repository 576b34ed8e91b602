"""Faults and bad input during training: corrupt shards, missing weights, mismatched or hostile checkpoints,
GPU configs on CPU machines. (Killed ranks under torchrun and killed saves: test_resume.py.)"""
from __future__ import annotations

import faulthandler
import json
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
    from fscs.data.shard_write import write_shards
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
    recorded = (trained / "base" / "config.yaml").read_text()
    with pytest.raises(FSCSError) as err:  # other input size = other backbone features
        Trainer(_cfg(shards, trained, "base", "model.image_size=96"), DistEnv()).fit()
    _one_line(err, "image_size=64", "96", "model.image_size")
    with pytest.raises(FSCSError) as err:  # trained for another test fold: its classes were seen in training
        Trainer(_cfg(shards, trained, "base", "data.fold=1"), DistEnv()).fit()
    _one_line(err, "data.fold=0", "set data.fold=0", "name=")
    assert (trained / "base" / "config.yaml").read_text() == recorded  # a refused resume rewrites nothing


def test_unusable_out_dir_is_one_line_error_before_the_backbone_loads(shards, tmp_path, monkeypatch):
    import fscs.train as train_mod

    def no_model(cfg):
        raise AssertionError("the backbone was built before out_dir was checked")

    monkeypatch.setattr(train_mod, "build_model", no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(FSCSError) as err:
        Trainer(_cfg(shards, blocker, "x"), DistEnv())
    _one_line(err, f"out_dir={blocker}", "cannot create the run directory", "pick a writable out_dir")


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


def test_an_error_in_a_loader_worker_ends_the_process(shards, tmp_path):
    """Loader workers ignore SIGTERM (so a job's SIGTERM reaches the checkpoint); after an error the trainer
    must end them itself, or the interpreter's exit waits for them forever."""
    import subprocess
    import sys

    overrides = [f"data.shards={shards}", f"out_dir={tmp_path}", "name=boom", *COMMON, "data.num_workers=1"]
    script = (
        "import fscs.data.stream as s\n"
        "from fscs.config import load_config\nfrom fscs.distributed import DistEnv\nfrom fscs.train import Trainer\n"
        "def boom(self, *a, **k):\n    raise RuntimeError('episode assembly failed')\n"
        "s.TrainEpisodeStream._episode = boom\n"
        f"Trainer(load_config(None, {overrides!r}), DistEnv()).fit()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and "episode assembly failed" in proc.stderr, proc.stderr[-2000:]


def test_resume_drops_tensorboard_events_logged_after_the_checkpoint(shards, tmp_path):
    """A killed attempt may have logged steps after its last checkpoint; the resumed run logs them again, so
    TensorBoard must not show both."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    assert Trainer(_cfg(shards, tmp_path, "tb", "train.stop_after_steps=1"), DistEnv()).fit()["steps"] == 1
    with SummaryWriter(str(tmp_path / "tb" / "tb")) as stale:  # what a killed attempt logged after step 1
        stale.add_scalar("train/loss", 999.0, 2)
    assert Trainer(_cfg(shards, tmp_path, "tb"), DistEnv()).fit()["status"] == "completed"
    events = EventAccumulator(str(tmp_path / "tb" / "tb"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in loss] == [1, 2] and 999.0 not in [v for _, v in loss]


def test_killed_while_writing_the_last_checkpoint_pt_retrains_it(shards, tmp_path, monkeypatch):
    """checkpoint.pt (what bench loads) is written before state/latest moves: a kill in between makes the
    rerun redo the last steps and write it, instead of reporting 'completed' next to a stale head."""
    import fscs.train as train_mod

    real = train_mod.save_checkpoint

    def dies_on_final_export(path, state, **kw):
        if Path(path).name == "checkpoint.pt" and state.get("step") == 4:
            raise KeyboardInterrupt("killed while writing checkpoint.pt")
        return real(path, state, **kw)

    monkeypatch.setattr(train_mod, "save_checkpoint", dies_on_final_export)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(shards, tmp_path, "k", "train.epochs=2"), DistEnv()).fit()
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    summary = Trainer(_cfg(shards, tmp_path, "k", "train.epochs=2"), DistEnv()).fit()
    assert summary["status"] == "completed" and summary["resumed_from"] == 2
    assert torch.load(tmp_path / "k" / "checkpoint.pt", weights_only=True)["step"] == 4


def test_a_fresh_start_drops_what_a_killed_attempt_logged(shards, tmp_path):
    """Killed before its first checkpoint, an attempt leaves log lines and TensorBoard events; the rerun
    starts at step 0 and must not show them next to its own."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "fresh"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 999.0}\n{"step": 2, "loss": 999.0}\n{"st')
    with SummaryWriter(str(run / "tb")) as stale:
        stale.add_scalar("train/loss", 999.0, 1)
    Trainer(_cfg(shards, tmp_path, "fresh"), DistEnv()).fit()
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all(r["loss"] != 999.0 for r in lines)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [(e.step, e.value != 999.0) for e in events.Scalars("train/loss")] == [(1, True), (2, True)]


def test_a_non_finite_loss_stops_before_logging_or_saving_that_step(shards, tmp_path, monkeypatch):
    """A diverged step (NaN loss: lr far too high, bf16 overflow) used to train on to the end and export a NaN
    head as 'completed'. Every rank now stops at that step (the flag travels with the step's collective
    poll), with one line; the last checkpoint, checkpoint.pt and train_log.jsonl keep only finite steps."""
    real = Trainer.train_step

    def diverge_at_step_3(self, batch):
        out = real(self, batch)
        if self.step == 2:  # the third optimizer step
            out["loss"] = float("nan")
        return out

    monkeypatch.setattr(Trainer, "train_step", diverge_at_step_3)
    cfg = _cfg(shards, tmp_path, "nan", "train.steps_per_epoch=4", "train.save_every=1")
    with pytest.raises(FSCSError) as err:
        Trainer(cfg, DistEnv()).fit()
    _one_line(err, "loss is not finite at step 3", "loss nan", "resumes from the last checkpoint", "train.lr")
    run = tmp_path / "nan"
    assert (run / "state" / "latest").read_text().strip() == "step-00000002"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    logged = [json.loads(ln)["step"] for ln in (run / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2]

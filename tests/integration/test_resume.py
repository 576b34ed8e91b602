"""Exact resume with 2 gloo processes (DDP, DeepSpeed ZeRO-1), atomic saves under SIGKILL, torchrun restarts.

Stopped after step 4 (mid-epoch 2 of 2 x 3 steps) and resumed in fresh processes, a run ends with bitwise the
head weights and per-step losses of the uninterrupted run. Several trainings share one torchrun launch
(this file is also the worker: `python -m torch.distributed.run ... test_resume.py '<json jobs>'`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

COMMON = ["model.image_size=64", "data.batch_size=2", "data.num_workers=1", "data.buffer_per_class=16",
          "train.steps_per_epoch=3", "train.epochs=2", "train.log_every=1"]
DEEPSPEED = ["train.engine=deepspeed", "train.zero_stage=1"]
CUT = 4


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def start_group(cmd: list[str]) -> subprocess.Popen:
    """A launcher process in its own session, so that kill_group() also ends the workers it started."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the launcher's session (workers of a failed or timed-out run)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def launch_jobs(jobs: list[list[str]], nproc: int = 2, timeout: int = 300) -> None:
    """Run several `fscs train` configs one after the other in one torchrun launch of `nproc` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, json.dumps(jobs)]
    proc = start_group(cmd)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-6000:]


def head(run: Path) -> dict:
    import torch

    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["engine"]["head"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def assert_same_head(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from fscs.data.synthetic import build_synthetic_shards

    return build_synthetic_shards(tmp_path_factory.mktemp("data") / "synth", num_images=400, size=96,
                                  workers=1)


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")

    def cfg(name: str, *extra: str) -> list[str]:
        return [f"data.shards={shards}", f"out_dir={out}", f"name={name}", *COMMON, *extra]

    cut = f"train.stop_after_steps={CUT}"
    launch_jobs([cfg("ddp"), cfg("ddp_cut", cut), cfg("ds", *DEEPSPEED), cfg("ds_cut", *DEEPSPEED, cut)])
    for name in ("ddp_cut", "ds_cut"):
        summary = json.loads((out / name / "train_summary.json").read_text())
        assert summary["status"] == "stopped" and summary["steps"] == CUT
    launch_jobs([cfg("ddp_cut"), cfg("ds_cut", *DEEPSPEED)])  # fresh processes resume from the checkpoints
    return out


@pytest.mark.parametrize("name", ["ddp", "ds"])
def test_interrupted_and_resumed_equals_uninterrupted(runs, name):
    full, cut = runs / name, runs / f"{name}_cut"
    summary = json.loads((cut / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"] == CUT and summary["steps"] == 6
    assert summary["engine"] == ("deepspeed" if name == "ds" else "ddp") and summary["world_size"] == 2
    assert losses(cut) == losses(full) and len(losses(full)) == 6  # per-step, bitwise
    assert_same_head(head(cut), head(full))
    assert summary["history"] == json.loads((full / "train_summary.json").read_text())["history"]


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _latest_step(run: Path) -> int:
    pointer = run / "state" / "latest"
    return int(pointer.read_text().strip().split("-")[1]) if pointer.is_file() else 0


def test_torchrun_restarts_a_killed_rank_from_the_last_checkpoint(runs, shards):
    run = runs / "crash"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "-m", "fscs", "train", f"data.shards={shards}", f"out_dir={runs}", "name=crash",
           *COMMON, "train.save_every=1"]
    proc = start_group(cmd)
    try:
        deadline = time.monotonic() + 180
        while _latest_step(run) < 1:
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
        rank1 = [p for p in _children(proc.pid) if _environ(p).get("RANK") == "1"]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGSTOP)  # freeze it first: the run cannot finish before the kill lands
        killed_at = _latest_step(run)
        os.kill(rank1[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, out[-4000:]
    assert killed_at < 6 and "resumed" in out
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6 and summary["resumed_from"] >= killed_at
    assert_same_head(head(run), head(runs / "ddp"))  # the restart did not lose or repeat any work


_SLOW_SAVE = """
import sys, time, torch
from fscs.config import load_config
from fscs.distributed import DistEnv
from fscs.train import Trainer

marker, overrides = sys.argv[1], sys.argv[2:]
real_save = torch.save

def slow_save(obj, f, *args, **kwargs):  # the save of step 2 writes half its bytes, then hangs
    name = str(getattr(f, "name", f))
    if "step-00000002" in name and "trainer.pt" in name:
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        open(marker, "w").write("saving")
        time.sleep(300)
    return real_save(obj, f, *args, **kwargs)

torch.save = slow_save
torch.set_num_threads(1)
Trainer(load_config(None, overrides), DistEnv()).fit()
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(shards, tmp_path):
    from fscs.config import load_config
    from fscs.distributed import DistEnv
    from fscs.engine.checkpoint import load_checkpoint
    from fscs.train import Trainer

    overrides = [f"data.shards={shards}", f"out_dir={tmp_path}", "name=killed", *COMMON, "data.num_workers=0",
                 "train.epochs=1", "train.save_every=1"]
    marker = tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(marker), *overrides], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # a real kill in the middle of writing step 2's checkpoint
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = tmp_path / "killed"
    assert (run / "state" / "latest").read_text().strip() == "step-00000001"
    assert any(p.name.startswith("trainer.pt.tmp-") for p in (run / "state" / "step-00000002").iterdir())
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 1  # the exported head: the previous one

    summary = Trainer(load_config(None, overrides), DistEnv()).fit()  # resumes from step 1
    assert summary["status"] == "completed" and summary["resumed_from"] == 1 and summary["steps"] == 3
    reference_cfg = load_config(None, [*overrides[:2], "name=reference", *overrides[3:]])
    reference = Trainer(reference_cfg, DistEnv()).fit()
    assert reference["history"] == summary["history"]
    assert_same_head(head(run), head(tmp_path / "reference"))


def test_model_selection_keeps_best_on_training_classes_and_bench_uses_it(shards, tmp_path):
    from fscs.bench.runs import load_run
    from fscs.config import load_config
    from fscs.data.episodes import EpisodeSampler
    from fscs.data.shards import read_index
    from fscs.distributed import DistEnv
    from fscs.engine.checkpoint import load_checkpoint
    from fscs.train import Trainer

    overrides = [f"data.shards={shards}", f"out_dir={tmp_path}", "name=sel", *COMMON, "data.num_workers=0",
                 "train.steps_per_epoch=2", "train.val_episodes=6", "bench.batch_size=6"]
    first = Trainer(load_config(None, [*overrides, "train.stop_after_steps=2"]), DistEnv()).fit()
    assert first["status"] == "stopped" and len(first["selection"]["history"]) == 1
    summary = Trainer(load_config(None, overrides), DistEnv()).fit()  # resumes; the record survives
    sel = summary["selection"]
    assert (sel["criterion"], sel["role"], sel["setting"]) == ("select mIoU", "select", "1w1s")
    assert sel["checkpoint"] == "best.pt"
    assert [h["epoch"] for h in sel["history"]] == [1, 2]
    assert sel["value"] == max(h["miou"] for h in sel["history"]) and sel["epoch"] in (1, 2)
    run = tmp_path / "sel"
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == sel["epoch"] and best["selection"]["value"] == sel["value"]
    assert best["index_sha256"] == read_index(shards).sha256  # which shards it was trained on
    assert load_run(run).checkpoint.name == "best.pt"  # fscs bench evaluates the selected checkpoint
    assert load_run(run, checkpoint="checkpoint.pt").checkpoint.name == "checkpoint.pt"
    index = read_index(shards)  # the selection episodes never touch the test fold's classes
    sampler = EpisodeSampler(index, "select", 0, 1, 1, 0)
    test_classes = set(index.folds[0])
    assert not test_classes & set(sampler.classes)
    assert all(not test_classes & set(index.samples[k]["labels"]) for k, _ in sampler.entries)


def test_signals_checkpoint_at_the_next_step_boundary(shards, tmp_path):
    import threading

    from fscs.config import load_config
    from fscs.distributed import DistEnv
    from fscs.train import Trainer

    overrides = [f"data.shards={shards}", f"out_dir={tmp_path}", "name=sig", *COMMON, "data.num_workers=0",
                 "train.keep_checkpoints=5"]
    log = tmp_path / "sig" / "train_log.jsonl"

    def send(after_step: int, signum: int) -> None:
        while not log.is_file() or len(log.read_text().splitlines()) < after_step:
            time.sleep(0.01)
        os.kill(os.getpid(), signum)

    def sender() -> None:
        send(1, signal.SIGUSR1)  # checkpoint, keep training
        send(3, signal.SIGTERM)  # checkpoint, stop

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    summary = Trainer(load_config(None, overrides), DistEnv()).fit()
    thread.join(timeout=10)
    assert (summary["status"], summary["signal"], summary["exit_code"]) == ("interrupted", "SIGTERM", 143)
    saves = sorted(int(d.name.split("-")[1]) for d in (tmp_path / "sig" / "state").glob("step-*"))
    stopped = summary["steps"]
    assert len(saves) >= 2 and saves[0] < 3 <= stopped and saves[-1] == stopped < 6, saves  # USR1: mid-epoch
    resumed = Trainer(load_config(None, overrides), DistEnv()).fit()
    assert resumed["status"] == "completed" and resumed["resumed_from"] == stopped and resumed["steps"] == 6


def _worker(jobs: list[list[str]]) -> None:
    import random

    import torch

    from fscs import distributed
    from fscs.cli import _setup_logging
    from fscs.config import load_config
    from fscs.train import Trainer

    _setup_logging(False)
    torch.set_num_threads(1)
    env = distributed.resolve_env()
    distributed.init(env)
    for overrides in jobs:
        Trainer(load_config(None, overrides), env).fit()
        random.seed(12345)  # disturb the global generators: a run must not depend on what ran before it
        torch.manual_seed(12345)
    distributed.finish(0)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))

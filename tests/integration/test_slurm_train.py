"""fscs training on a real private SLURM cluster through launchers/slurm.py (submitit, 2 tasks, gloo DDP).

1. A 2-task job trains and returns its result (rank 0 carries train_summary.json) through submitit.
2. The same training requeued mid-run by `scontrol requeue` (SIGTERM: checkpoint at the next step boundary,
   SLURM restarts the job) and then hit by submitit's time-limit signal (SIGUSR2: checkpoint at the next step
   boundary on every rank, FscsTask.checkpoint(), requeue by submitit) resumes each time from its last
   checkpoint and ends with bitwise the weights of job 1.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

TRAIN = ["model.image_size=64", "data.batch_size=2", "data.num_workers=1", "data.buffer_per_class=16",
         "train.steps_per_epoch=32", "train.epochs=3", "train.log_every=1"]
STEPS = 96  # ~10 steps/s here: the second signal must land with many steps still to go


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from fscs.data.synthetic import build_synthetic_shards

    return build_synthetic_shards(tmp_path_factory.mktemp("data") / "synth", num_images=400, size=96,
                                  workers=1)


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    with pytest.MonkeyPatch.context() as mp:
        slurm_cluster.patch_environ(mp)  # submitit calls sbatch/sacct/scontrol with os.environ
        mp.setenv("OMP_NUM_THREADS", "1")
        yield slurm_cluster


def _submit(launcher, settings_of, cluster, folder: Path, argv: list[str]):
    settings = settings_of.merge_settings(settings_of.load_preset("cpu"), {"partition": cluster.partition,
                                                                        "time_min": 10, "max_requeues": 3})
    return launcher.submit(argv, settings, folder, name="fscs-test", cluster="slurm")


def _wait(job, cluster, what, predicate=None, timeout: float = 150.0):
    deadline = time.monotonic() + timeout
    while not (predicate() if predicate else job.done()):
        if time.monotonic() > deadline:
            cluster.run(["scancel", job.job_id], check=False)
            state = cluster.sacct_state(job.job_id)
            pytest.fail(f"job {job.job_id}: {what} not reached in {timeout}s; sacct={state}"
                        f"\nstdout:\n{job.stdout()}\nstderr:\n{(job.stderr() or '')[-4000:]}")
        time.sleep(0.1)


def _latest(run: Path) -> int:
    pointer = run / "state" / "latest"
    try:
        return int(pointer.read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0


def _head(run: Path) -> dict:
    import torch

    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["engine"]["head"]


def _torchrun_reference(shards: Path, out: Path):
    """The uninterrupted run of the same config, by torchrun here (it overlaps the job's requeue holds)."""
    from test_resume import start_group

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fscs",
           "train", f"data.shards={shards}", f"out_dir={out}", "name=uninterrupted", *TRAIN]
    return start_group(cmd)


@pytest.fixture(scope="module")
def requeued(slurm_launcher, slurm_settings, cluster, shards, tmp_path_factory):
    """A 2-task job requeued by `scontrol requeue`, then sent SIGUSR2, that completes; and its reference."""
    out = tmp_path_factory.mktemp("slurm")
    run = out / "requeued"
    job = _submit(slurm_launcher, slurm_settings, cluster, out / "submitit",
                  ["train", f"data.shards={shards}", f"out_dir={out}", "name=requeued", *TRAIN,
                   "train.save_every=1"])
    reference = None
    try:
        _wait(job, cluster, "a first checkpoint", lambda: _latest(run) >= 1)
        cluster.run(["scontrol", "requeue", job.job_id])  # SIGTERM now, the job runs again after the hold
        reference = _torchrun_reference(shards, out)
        # the first start's SIGTERM checkpoint is final once the second start has logged itself
        _wait(job, cluster, "the second start", lambda: "task 0/2 start 2 " in (job.stderr() or ""))
        first = _latest(run)
        _wait(job, cluster, "progress after the requeue", lambda: _latest(run) > first)
        second = _latest(run)
        assert second < STEPS - 20, f"the job ran to step {second} of {STEPS} before the signal could be sent"
        job._interrupt(timeout=True)  # scancel --signal USR2, as submitit's `--signal=USR2@delay`
        _wait(job, cluster, "completion", timeout=180)
        log, _ = reference.communicate(timeout=180)
        assert reference.returncode == 0, log[-3000:]
    finally:
        if reference is not None:
            from test_resume import kill_group

            kill_group(reference)
    return out, job, (first, second)


def test_two_task_ddp_job_returns_result_through_submitit(requeued, cluster):
    out, job, _ = requeued
    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [(r["rank"], r["world_size"], r["returncode"], r["restarts"]) for r in results] == [(0, 2, 0, 2),
                                                                                             (1, 2, 0, 2)]
    summary = results[0]["result"]  # rank 0 carries the run's train_summary.json
    assert summary["status"] == "completed" and summary["steps"] == STEPS and summary["world_size"] == 2
    assert summary == json.loads((out / "requeued" / "train_summary.json").read_text())
    assert cluster.wait_job_state(job.job_id, ["COMPLETED", "FAILED", "CANCELLED"], timeout=30) == "COMPLETED"


def test_requeued_job_resumes_to_the_weights_of_an_uninterrupted_run(requeued):
    import torch

    out, job, (first, second) = requeued
    summary = json.loads((out / "requeued" / "train_summary.json").read_text())
    assert 0 < first < second <= summary["resumed_from"] < STEPS  # two interruptions, each resumed
    text = (job.stderr() or "") + (job.stdout() or "")
    assert "requeue 2 of at most 3" in text and "resumed" in text
    ref, got = _head(out / "uninterrupted"), _head(out / "requeued")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_sweep_runs_one_array_task_per_value(slurm_launcher, cluster, shards, tmp_path, capsys):
    """`--sweep seed=0,1` submits one SLURM array job whose two tasks train two runs (distinct run
    directories, their own seeds) and `--wait` prints each task's result."""
    out = tmp_path / "runs"
    code = slurm_launcher.main(
        ["--preset", "cpu", "--partition", cluster.partition, "--tasks-per-node", "1", "--time", "10",
         "--folder", str(tmp_path / "jobs" / "%j"), "--name", "fscs-sweep", "--sweep", "seed=0,1", "--wait",
         "--",
         "train", f"data.shards={shards}", f"out_dir={out}", "name=s{seed}", "train.seed={seed}",
         "model.image_size=64", "data.batch_size=2", "data.num_workers=0", "train.steps_per_epoch=3",
         "train.epochs=1"])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0, printed
    array = printed[0].split()[3].rstrip(":")
    assert printed[0] == f"submitted array job {array}: 2 array task(s) of 1 node(s) x 1 task(s) each"
    assert [line.split(";")[0] for line in printed[1:3]] == [f"  {array}_0: seed=0", f"  {array}_1: seed=1"]
    summaries = [json.loads((out / f"s{s}" / "train_summary.json").read_text()) for s in (0, 1)]
    assert all(s["status"] == "completed" and s["steps"] == 3 for s in summaries)
    assert [f"{array}_{i} seed={i}:" in "\n".join(printed[3:]) for i in (0, 1)] == [True, True]
    seeds = [(out / f"s{s}" / "config.yaml").read_text() for s in (0, 1)]
    assert "seed: 0" in seeds[0] and "seed: 1" in seeds[1]
    assert _head(out / "s0").keys() == _head(out / "s1").keys()
    import torch

    assert not all(torch.equal(a, b) for a, b in zip(_head(out / "s0").values(), _head(out / "s1").values()))
    for i in (0, 1):
        state = cluster.wait_job_state(f"{array}_{i}", ["COMPLETED", "FAILED", "CANCELLED"], timeout=30)
        assert state == "COMPLETED"

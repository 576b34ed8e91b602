"""Smoke tests of the private SLURM cluster (tests/integration/slurm_cluster.py):
plain sbatch + accounting, submitit multi-task jobs, and requeue of a running job."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def _wait_file_lines(path: Path, n: int, cluster, job_id: str, timeout: float = 60.0) -> list[str]:
    def probe():
        lines = path.read_text().splitlines() if path.exists() else []
        return lines if len(lines) >= n else None

    try:
        return cluster.wait_for(probe, timeout=timeout, what=f"{n} line(s) in {path}")
    except Exception as e:  # add the job's view to the failure
        raise AssertionError(f"{e}\njob {job_id}: {cluster.job_info(job_id)}") from None


def test_sbatch_wrap_completes_in_sacct(slurm_cluster, tmp_path):
    out = tmp_path / "wrap.out"
    job_id = slurm_cluster.sbatch("--job-name=wrap", f"--output={out}",
                                  "--wrap", "echo hello from $SLURM_JOB_ID")
    assert job_id.isdigit()
    assert slurm_cluster.wait_job_state(job_id, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"],
                                        timeout=60) == "COMPLETED"
    assert out.read_text().strip() == f"hello from {job_id}"
    # Accounting has the exit code and the batch step too.
    res = slurm_cluster.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"])
    rows = [ln.split("|") for ln in res.stdout.splitlines()]
    assert [job_id, "COMPLETED", "0:0"] in rows, rows


def test_submitit_two_tasks(slurm_cluster, tmp_path, monkeypatch):
    import submitit

    slurm_cluster.patch_environ(monkeypatch)  # submitit runs sbatch/sacct with os.environ

    def rank_and_world_size():  # nested => cloudpickled by value, no test module import in the job
        env = submitit.JobEnvironment()
        return env.global_rank, env.num_tasks

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm",
                                     slurm_python=shlex.quote(sys.executable))
    executor.update_parameters(name="fscs-smoke", nodes=1, tasks_per_node=2, cpus_per_task=1, timeout_min=5,
                               slurm_partition=slurm_cluster.partition)
    job = executor.submit(rank_and_world_size)
    assert sys.executable in job.paths.submission_file.read_text()  # the job runs our venv's python

    deadline = time.monotonic() + 90
    while not job.done():
        if time.monotonic() > deadline:
            slurm_cluster.run(["scancel", job.job_id], check=False)
            pytest.fail(f"submitit job {job.job_id} not done after 90s: "
                        f"sacct={slurm_cluster.sacct_state(job.job_id)}"
                        f"\nstdout:\n{job.stdout()}\nstderr:\n{job.stderr()}")
        time.sleep(0.5)
    assert sorted(job.results()) == [(0, 2), (1, 2)]
    final = slurm_cluster.wait_job_state(job.job_id, ["COMPLETED", "FAILED", "CANCELLED"], timeout=30)
    assert final == "COMPLETED"


def test_scontrol_requeue_reruns_running_job(slurm_cluster, tmp_path):
    starts = tmp_path / "starts.txt"
    script = tmp_path / "job.sh"
    # No --requeue flag: JobRequeue=1 in slurm.conf must make batch jobs requeueable by default.
    script.write_text(
        "#!/bin/bash\n"
        f"echo \"start restart_count=${{SLURM_RESTART_COUNT:-0}}\" >> {shlex.quote(str(starts))}\n"
        "sleep 300\n"
    )
    job_id = slurm_cluster.sbatch("--job-name=requeue", "--time=5", f"--output={tmp_path / 'job.out'}",
                                  str(script))
    try:
        assert _wait_file_lines(starts, 1, slurm_cluster, job_id) == ["start restart_count=0"]
        info = slurm_cluster.job_info(job_id)
        assert info["JobState"] == "RUNNING" and info["Requeue"] == "1", info

        t_requeue = time.monotonic()
        slurm_cluster.run(["scontrol", "requeue", job_id])
        # SLURM holds a requeued job PENDING (reason BeginTime) for cred_expire+1 s (120 s by
        # default; LocalSlurm sets 10 s), then the 1 s scheduler pass starts it again by itself.
        assert _wait_file_lines(starts, 2, slurm_cluster, job_id, timeout=60)[1] == "start restart_count=1"
        assert time.monotonic() - t_requeue < 45
        info = slurm_cluster.job_info(job_id)
        assert info["Restarts"] == "1" and info["JobState"] == "RUNNING", info
        assert slurm_cluster.sacct_state(job_id) == "RUNNING"
    finally:
        slurm_cluster.run(["scancel", job_id], check=False)
    slurm_cluster.wait_job_state(job_id, "CANCELLED", timeout=30)

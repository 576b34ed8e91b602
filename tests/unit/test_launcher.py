"""launchers/slurm.py without a cluster: multi-node rendezvous from SLURM variables, presets, requeues."""
from __future__ import annotations

import logging
import os
import re

import pytest

from fscs.distributed import resolve_env
from fscs.errors import FSCSError


@pytest.fixture
def restore_environ():
    """distributed_env() exports RANK, WORLD_SIZE, ... into os.environ (as in a job): undo it afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _slurm_task_env(monkeypatch, procid: int, nodes: int = 2, per_node: int = 4) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "CUDA_VISIBLE_DEVICES", "SLURM_RESTART_COUNT"):
        os.environ.pop(key, None)  # restore_environ puts everything back
    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(nodes * per_node),
           "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NODEID": str(procid // per_node),
           "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % per_node),
           "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_STEP_NODELIST": "gpu[003-004]",
           "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})",
           "SLURM_STEP_NUM_TASKS": str(nodes * per_node), "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_two_nodes_by_four_tasks_rendezvous(slurm_task, monkeypatch, restore_environ):
    lookups = []

    def node_addr(host: str) -> str:  # stands in for `scontrol show node` (gpu003 is not in DNS here)
        lookups.append(host)
        return {"gpu003": "10.1.0.3", "gpu004": "10.1.0.4"}[host]

    seen = []
    for procid in range(8):
        _slurm_task_env(monkeypatch, procid)
        raw = resolve_env(dict(os.environ))  # fscs' own reading of the SLURM variables
        exported = slurm_task.distributed_env(lookup=node_addr)
        env = resolve_env(exported)
        assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (procid, 8, procid % 4, 4)
        assert (raw.rank, raw.world_size, raw.local_rank, raw.local_world_size) == (procid, 8, procid % 4, 4)
        assert raw.master_addr == "gpu003" and env.master_addr == "10.1.0.3"
        assert "CUDA_VISIBLE_DEVICES" not in os.environ  # each process sees all GPUs of its node
        seen.append((exported["MASTER_ADDR"], exported["MASTER_PORT"], exported["WORLD_SIZE"]))
    assert len(set(seen)) == 1 and 20000 <= int(seen[0][1]) <= 60000  # one rendezvous point for all 8 tasks
    assert set(lookups) == {"gpu003"}


def test_environment_is_restored_after_the_rendezvous_test():
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] != "8"


def test_preset_then_command_line(slurm_settings, tmp_path):
    preset = slurm_settings.load_preset("example")
    settings = slurm_settings.merge_settings(preset, {"nodes": 4, "partition": "big", "time_min": None,
                                                      "gpus_per_node": None})
    params = slurm_settings.executor_parameters(settings, name="weak")
    assert params["nodes"] == 4 and params["slurm_partition"] == "big"  # command line wins
    assert params["gpus_per_node"] == 8 and params["tasks_per_node"] == 8 and params["timeout_min"] == 1440
    assert params["slurm_signal_delay_s"] == 180 and "slurm_account" not in params  # null = not passed
    cpu = slurm_settings.executor_parameters(slurm_settings.merge_settings(None, {"gpus_per_node": 0}))
    assert "gpus_per_node" not in cpu and cpu["tasks_per_node"] == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("partitoin: gpu\n")
    with pytest.raises(FSCSError, match="unknown key.*partitoin"):
        slurm_settings.load_preset(bad)
    with pytest.raises(FSCSError, match="not found; use one of: .*example"):
        slurm_settings.load_preset("nosuchcluster")


def test_gpus_on_the_command_line_set_the_tasks_a_preset_fixed(slurm_settings):
    """`--preset example --gpus-per-node 4` kept the preset's tasks_per_node 8: 8 tasks on 4 GPUs, and
    tasks 4-7 asked for cuda:4..7. Tasks now follow the command line's GPU count unless --tasks-per-node
    is given, and more tasks than GPUs is a one-line error."""
    example = slurm_settings.load_preset("example")
    settings = slurm_settings.merge_settings(example, {"gpus_per_node": 4, "tasks_per_node": None})
    assert (settings["gpus_per_node"], settings["tasks_per_node"]) == (4, 4)
    fewer = slurm_settings.merge_settings(example, {"gpus_per_node": 8, "tasks_per_node": 2})
    assert fewer["tasks_per_node"] == 2
    with pytest.raises(FSCSError, match="--tasks-per-node 8 is more than --gpus-per-node 4"):
        slurm_settings.merge_settings(example, {"gpus_per_node": 4, "tasks_per_node": 8})
    assert slurm_settings.merge_settings(slurm_settings.load_preset("cpu"), {})["tasks_per_node"] == 2  # CPU


def test_a_failed_task_ends_the_step(slurm_settings):
    """Rank 0 failing at startup (its rendezvous port taken: EADDRINUSE, seen on the private cluster) left
    rank 1 waiting for it in srun until torch's 30-minute store timeout: srun must kill the other tasks."""
    params = slurm_settings.executor_parameters(slurm_settings.merge_settings(None, {}))
    assert params["slurm_srun_args"] == ["--kill-on-bad-exit=1"]
    preset = slurm_settings.merge_settings({"srun_args": ["--cpu-bind=cores"]}, {})
    assert slurm_settings.executor_parameters(preset)["slurm_srun_args"] == ["--kill-on-bad-exit=1",
                                                                               "--cpu-bind=cores"]


def test_requeue_is_bounded_and_logged(slurm_task, monkeypatch, caplog):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    task = slurm_task.FscsTask(["train", "name=x"], max_requeues=2)
    with caplog.at_level(logging.WARNING, logger="fscs.launchers.slurm"):
        first = task.checkpoint()
        assert first.function.requeues == 1 and first.function.argv == ["train", "name=x"]
        second = first.function.checkpoint()
        assert second.function.requeues == 2
        assert second.function.checkpoint() is None  # the limit: submitit then ends the job with an error
    assert "requeue 1 of at most 2" in caplog.text and "requeue 2 of at most 2" in caplog.text
    assert "not requeueing: 2 requeue(s) done" in caplog.text
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # requeues by SLURM itself count too
    assert slurm_task.FscsTask(["bench"], max_requeues=2).checkpoint() is None


def test_train_result_file_and_bad_command(slurm_launcher, slurm_commands, tmp_path, capsys):
    path = slurm_commands.default_result_file(["train", f"out_dir={tmp_path}", "name=r1"])
    assert path == str(tmp_path / "r1" / "train_summary.json")
    assert slurm_commands.default_result_file(["bench", "--run-dir", "x"]) is None
    assert slurm_launcher.main(["--nodes", "1", "--", "shards", "synth"]) == 2
    # `--config=FILE` (argparse's other spelling, accepted by fscs) is the job's config too: not the default's
    # run directory, whose train_summary.json (of another run) --wait would print as this job's result
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: from_yaml\nout_dir: {tmp_path}\n")
    for spelling in (["--config", str(cfg)], [f"--config={cfg}"]):
        path = slurm_commands.default_result_file(["train", *spelling, "train.seed=1"])
        assert path == str(tmp_path / "from_yaml" / "train_summary.json"), spelling
    assert "give an fscs command" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- launchers/torchrun.sh
TORCHRUN_SH = os.path.join(os.path.dirname(__file__), "..", "..", "launchers", "torchrun.sh")


def _torchrun_sh(args: list[str], env: dict[str, str], cwd: str):
    import subprocess

    return subprocess.run(["bash", TORCHRUN_SH, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_torchrun_sh_uses_the_checkout_venv_from_any_directory(tmp_path):
    """Without PYTHON and with no torch on PATH's python, the launcher still finds the checkout's .venv."""
    venv_python = os.path.join(os.path.dirname(TORCHRUN_SH), "..", ".venv", "bin", "python")
    if not os.path.exists(venv_python):
        pytest.skip("no .venv in this checkout (make test builds it)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"
    proc = _torchrun_sh(["1", "--help"], env, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: fscs" in proc.stdout


def test_torchrun_sh_names_the_fix_when_python_lacks_torch(tmp_path):
    env = dict(os.environ, PYTHON="/usr/bin/python3")  # the system python: no torch
    proc = _torchrun_sh(["2", "train"], env, str(tmp_path))
    assert proc.returncode == 2
    assert "cannot import torch and fscs" in proc.stderr and "set PYTHON" in proc.stderr


@pytest.mark.parametrize("nproc", ["0", "-1", "abc", "2x"])
def test_torchrun_sh_bad_process_count_is_one_line(tmp_path, nproc):
    """0 and -1 ended in torchrun's bare AssertionError traceback, 2x in a ValueError traceback, abc in a
    bash 'unbound variable' message."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHON"] = sys.executable
    proc = _torchrun_sh([nproc, "train", "name=x"], env, str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    said = f"NPROC must be a number of processes >= 1, got '{nproc}'"
    assert proc.stderr.strip().count("\n") == 0 and said in proc.stderr, proc.stderr[-2000:]


SLURM_PY = os.path.join(os.path.dirname(__file__), "..", "..", "launchers", "slurm.py")
BARE_PYTHON = "/usr/bin/python3"


def _bare_python_or_skip() -> None:
    import subprocess

    if not os.path.exists(BARE_PYTHON) or subprocess.run([BARE_PYTHON, "-c", "import torch"],
                                                         capture_output=True).returncode == 0:
        pytest.skip(f"needs a {BARE_PYTHON} without torch")


def test_slurm_py_reruns_itself_under_the_checkout_venv(tmp_path):
    import subprocess

    _bare_python_or_skip()
    if not os.path.exists(os.path.join(os.path.dirname(SLURM_PY), "..", ".venv", "bin", "python")):
        pytest.skip("no .venv in this checkout (make test builds it)")
    env = {k: v for k, v in os.environ.items() if k != "FSCS_LAUNCHER_REEXEC"}
    proc = subprocess.run([BARE_PYTHON, SLURM_PY, "--help"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_slurm_py_without_the_project_is_a_one_line_error(tmp_path):
    import subprocess

    _bare_python_or_skip()
    env = dict(os.environ, FSCS_LAUNCHER_REEXEC="1")  # as if the re-run had happened: no second try
    proc = subprocess.run([BARE_PYTHON, SLURM_PY, "--partition", "x", "--", "train", "name=x"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "cannot import" in proc.stderr


def test_a_refused_submission_is_one_line(slurm_launcher, monkeypatch, capsys):
    """What submitit 1.5.4 raises when sbatch fails (FailedJobError with sbatch's stderr), and a failing
    sbatch called directly (CalledProcessError)."""
    import subprocess

    from submitit.core.utils import FailedJobError

    said = "sbatch: error: invalid partition specified: nope\nsbatch: error: Batch job submission failed\n"
    for exc in (FailedJobError(said), subprocess.CalledProcessError(1, ["sbatch"], stderr=said.encode())):
        def refuse(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(slurm_launcher, "submit", refuse)
        assert slurm_launcher.main(["--nodes", "1", "--partition", "nope", "--", "train", "name=z"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "invalid partition specified: nope" in err and "check --partition" in err


def test_max_requeues_also_bounds_submitits_timeout_count(slurm_launcher, slurm_settings, monkeypatch,
                                                           tmp_path):
    """submitit ends a job after max_num_timeout (its default: 3) timeouts even when FscsTask.checkpoint()
    would requeue it: --max-requeues 5 must reach the executor too (seen on a real cluster: the 4th
    time-limit signal ended the job with "timed-out too many times")."""
    import submitit

    made = {}

    class FakeExecutor:
        def __init__(self, **kwargs):
            made["init"] = kwargs

        def update_parameters(self, **kwargs):
            made["params"] = kwargs

        def submit(self, task):
            made["task"] = task
            return "job"

    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    settings = slurm_settings.merge_settings(slurm_settings.load_preset("example"), {"max_requeues": None})
    assert slurm_launcher.submit(["bench", "--run-dir", "x"], settings, tmp_path, cluster="slurm") == "job"
    assert made["task"].max_requeues == settings["max_requeues"] == 5
    assert made["init"]["slurm_max_num_timeout"] == 5


@pytest.mark.parametrize("flags, says", [
    (["--nodes", "-1"], "--nodes (preset key nodes) must be an integer >= 1, got -1"),
    (["--nodes", "0"], "--nodes (preset key nodes) must be an integer >= 1, got 0"),
    (["--gpus-per-node", "-2"], "--gpus-per-node (preset key gpus_per_node) must be an integer >= 0"),
    (["--tasks-per-node", "0"], "--tasks-per-node (preset key tasks_per_node) must be an integer >= 1"),
    (["--time", "0"], "--time (preset key time_min) must be an integer >= 1, got 0"),
    (["--max-requeues", "-1"], "--max-requeues (preset key max_requeues) must be an integer >= 0"),
    (["--time", "1"], "--signal-delay-s 120 is not shorter than --time 1 min"),
])
def test_bad_resource_values_are_one_line_errors_before_sbatch(slurm_launcher, monkeypatch, capsys, flags,
                                                               says):
    """sbatch accepts --nodes=-1 (the job runs; submitit then fails to follow it with an IndexError traceback,
    leaving a job the user never saw the id of), and a signal delay as long as the time limit signals the job
    as soon as it starts (each start burns a requeue): both are refused before anything is submitted."""
    def no_submit(*args, **kwargs):
        raise AssertionError("submitted")

    monkeypatch.setattr(slurm_launcher, "submit", no_submit)
    assert slurm_launcher.main([*flags, "--", "bench", "--run-dir", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and says in err, err


def test_preset_values_are_checked_too(slurm_settings, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("nodes: two\nmem_gb: null\n")
    with pytest.raises(FSCSError, match="--nodes .preset key nodes. must be an integer >= 1, got 'two'"):
        slurm_settings.merge_settings(slurm_settings.load_preset(preset), {})
    preset.write_text("gpus_per_node: null\nmem_gb: null\n")  # null = not passed to sbatch
    assert slurm_settings.merge_settings(slurm_settings.load_preset(preset), {})["tasks_per_node"] == 1


def test_wait_on_a_failed_job_is_one_line_with_fscs_error(slurm_launcher, monkeypatch, capsys, tmp_path):
    """--wait on a job whose `fscs train` stopped with a config error: the launcher printed submitit's
    36-line traceback ending in "exited with code 2 (see this task's stderr)"; now one line carrying the
    task's own error and where the logs are."""
    from submitit.core.utils import FailedJobError

    log = ("12:00:00 [r0] fscs.distributed: process group up: rank 0/2 (gloo, torchrun)\n"
           "fscs train: error: data/x/index.json: no shard index; create the shards first\n"
           "[rank0]: Traceback (most recent call last):\n"
           "[rank0]: RuntimeError: fscs train data.shards=data/x exited with code 2 (see this task's "
           "stderr)\n")

    class FailedJob:
        job_id = "77"
        paths = type("Paths", (), {"folder": tmp_path})()

        def results(self):
            raise FailedJobError("Job (task=0) failed during processing with trace: ...")

        def stderr(self):
            return log

    monkeypatch.setattr(slurm_launcher, "submit", lambda *args, **kwargs: FailedJob())
    assert slurm_launcher.main(["--wait", "--", "train", "data.shards=data/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err == ("launchers/slurm.py: error: job 77 ended without a result: fscs train: error: "
                   f"data/x/index.json: no shard index; create the shards first; logs in {tmp_path}")
    assert slurm_launcher.failure_line("[rank0]: submitit.core.utils.UncompletedJobError: Job not requeued "
                                       "because: timed-out too many times.\n").endswith("too many times.")


def test_a_real_refusing_sbatch_is_said_once(slurm_launcher, monkeypatch, capsys, tmp_path):
    """submitit prints a failing sbatch's stderr itself before raising FailedJobError: the user saw sbatch's
    lines, then the launcher's line repeating them. Here a stand-in sbatch (and srun, which submitit needs to
    pick SLURM) refuses the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\n"
                                    "echo 'sbatch: error: Batch job submission failed' >&2\nexit 1\n")
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    folder = tmp_path / "jobs"
    assert slurm_launcher.main(["--partition", "nope", "--folder", str(folder), "--", "bench", "--run-dir",
                                "x"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err, err
    assert "invalid partition specified: nope" in err and "check --partition" in err


def _scontrol_job(end: str, preempt: str) -> str:
    return ("JobId=4 JobName=fscs JobState=RUNNING Reason=None TimeLimit=00:30:00 "
            f"StartTime=2026-11-27T13:37:53 EndTime={end} Deadline=N/A "
            f"PreemptEligibleTime=2026-11-27T13:37:53 PreemptTime={preempt} SuspendTime=None\n")


def test_a_preempted_task_waits_out_the_grace_time(slurm_task, monkeypatch):
    """SLURM preemption (PreemptMode=REQUEUE, GraceTime=150) sends SIGTERM and kills + requeues the job
    GraceTime later. The tasks used to give up after a fixed 120 s and exit 1, so the job ended FAILED and was
    never requeued (seen on the private cluster); now they wait for the job's new EndTime."""
    from datetime import datetime, timedelta

    now = datetime.now().replace(microsecond=0)
    end = (now + timedelta(seconds=150)).isoformat()
    preempted = _scontrol_job(end, now.isoformat())
    assert 140 <= slurm_task.preemption_grace_s(lambda: preempted) <= 151
    assert slurm_task.preemption_grace_s(lambda: _scontrol_job(end, "None")) == 0  # requeue, scancel
    assert slurm_task.preemption_grace_s(lambda: None) == 0  # scontrol did not answer

    clock = [0.0]  # a fake clock: no real waiting
    monkeypatch.setattr(slurm_task.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(slurm_task.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    with pytest.raises(SystemExit):
        slurm_task.FscsTask._wait_for_slurm("SIGTERM", seconds=120.0, lookup=lambda: preempted)
    assert clock[0] >= 120 + 140  # the usual wait plus the grace time
    clock[0] = 0.0
    with pytest.raises(SystemExit):
        slurm_task.FscsTask._wait_for_slurm("SIGTERM", seconds=120.0, lookup=lambda: None)
    assert 120 <= clock[0] < 125


def test_sweep_expands_to_one_command_per_combination(slurm_commands):
    command = ["train", "name=w_f{fold}_s{seed}", "data.fold={fold}", "train.seed={seed}"]
    tasks = slurm_commands.expand_sweeps(command, ["fold=0,1", "seed=3, 4"])
    assert tasks == [({"fold": "0", "seed": "3"}, ["train", "name=w_f0_s3", "data.fold=0", "train.seed=3"]),
                     ({"fold": "0", "seed": "4"}, ["train", "name=w_f0_s4", "data.fold=0", "train.seed=4"]),
                     ({"fold": "1", "seed": "3"}, ["train", "name=w_f1_s3", "data.fold=1", "train.seed=3"]),
                     ({"fold": "1", "seed": "4"}, ["train", "name=w_f1_s4", "data.fold=1", "train.seed=4"])]
    bench = ["bench", "--run-dir", "r"]
    assert slurm_commands.expand_sweeps(bench, []) == [({}, bench)]


@pytest.mark.parametrize("specs, message", [
    (["fold"], "expected NAME=V1,V2,..."),
    (["data.fold=0,1"], "expected NAME=V1,V2,... with NAME a plain word"),
    (["fold=0,,1"], "an empty value"),
    (["fold=0,0"], "a value is listed twice"),
    (["fold=0", "fold=1"], "--sweep fold is given twice"),
    (["seed=1,2"], "the command has no {seed}, so every task would run the same command"),
])
def test_bad_sweeps_are_one_line_errors(slurm_commands, specs, message):
    with pytest.raises(FSCSError, match=re.escape(message)):
        slurm_commands.expand_sweeps(["train", "name=w_f{fold}", "data.fold={fold}"], specs)


def test_sweep_tasks_sharing_a_run_directory_are_refused_before_sbatch(slurm_launcher, monkeypatch, capsys):
    """Two array tasks training into one run directory would resume from and overwrite each other."""
    monkeypatch.setattr(slurm_launcher, "submit_array", lambda *a, **k: pytest.fail("submitted"))
    assert slurm_launcher.main(["--sweep", "seed=0,1", "--", "train", "name=w", "train.seed={seed}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tasks seed=0 and seed=1 share the run directory" in err
    assert err.endswith("e.g. name=weak_f{fold}")
    assert slurm_launcher.main(["--array-parallelism", "2", "--", "train", "name=w"]) == 2
    assert "--array-parallelism 2: needs --sweep" in capsys.readouterr().err
    # a config error in one task's command is found before anything is submitted
    assert slurm_launcher.main(["--sweep", "lr=1e-3,oops", "--", "train", "name=w{lr}", "train.lr={lr}"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_sweep_submits_one_array_and_waits_for_every_task(slurm_launcher, monkeypatch, capsys, tmp_path):
    submitted = {}

    class Job:
        def __init__(self, i, ok):
            self.job_id, self.ok = f"900_{i}", ok
            self.paths = type("Paths", (), {"folder": tmp_path / f"900_{i}"})()

        def results(self):
            from submitit.core.utils import FailedJobError

            if not self.ok:
                raise FailedJobError("failed")
            return [{"rank": 0, "job": self.job_id}]

        def stderr(self):
            return "fscs bench: error: runs/w_f1/checkpoint.pt: no trained head; train it first\n"

    def submit_array(argvs, settings, folder, name="fscs", parallelism=None):
        submitted.update(argvs=argvs, parallelism=parallelism)
        return [Job(i, ok=i == 0) for i in range(len(argvs))]

    monkeypatch.setattr(slurm_launcher, "submit_array", submit_array)
    code = slurm_launcher.main(["--sweep", "fold=0,1", "--array-parallelism", "1", "--wait", "--",
                                "bench", "--run-dir", "runs/w_f{fold}"])
    assert code == 1  # one task failed
    assert submitted == {"argvs": [["bench", "--run-dir", "runs/w_f0"], ["bench", "--run-dir", "runs/w_f1"]],
                         "parallelism": 1}
    out, err = capsys.readouterr()
    assert out.splitlines() == ["submitted array job 900: 2 array task(s) of 1 node(s) x 1 task(s) each",
                                f"  900_0: fold=0; logs in {tmp_path / '900_0'}",
                                f"  900_1: fold=1; logs in {tmp_path / '900_1'}",
                                "900_0 fold=0: {'rank': 0, 'job': '900_0'}"]
    assert err.strip() == ("launchers/slurm.py: error: job 900_1 ended without a result: fscs bench: error: "
                           "runs/w_f1/checkpoint.pt: no trained head; train it first; "
                           f"logs in {tmp_path / '900_1'}")

#!/usr/bin/env python
"""Run any `fscs` command (train, pretrain, bench) as a SLURM job through submitit, with checkpoint + requeue.

    python launchers/slurm.py --preset example --nodes 2 --gpus-per-node 4 -- train name=weak
    python launchers/slurm.py --partition gpu --time 240 --gpus-per-node 8 -- bench --run-dir runs/weak
    python launchers/slurm.py --sweep fold=0,1,2,3 -- train name=weak_f{fold} data.fold={fold}  # array job

One generic task (`FscsTask`) per SLURM task: it exports the torch.distributed variables from submitit's
`TorchDistributedEnvironment` (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR = first node,
MASTER_PORT) and calls `fscs.cli.main(argv)` in-process: the entry point is never duplicated and the training
code never imports submitit. Preemption / timeout: SLURM sends SIGUSR2 (`--signal=USR2@<delay>`) to every
task; the trainer checkpoints at the next step boundary on every rank and returns 140; rank 0 then runs
submitit's own handler, which calls `FscsTask.checkpoint()` (a DelayedSubmission of the same task, requeue
count + 1, refused beyond --max-requeues) and `scontrol requeue`s the job; the requeued job resumes from the
run's last checkpoint. A SIGTERM alone (`scontrol requeue`, scancel, SLURM's own preemption) also checkpoints
at the next step boundary and then waits for SLURM to end or requeue the job; when SIGUSR2 follows a SIGTERM
(submitit's preemption sequence) the later signal decides.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

if str(Path(__file__).resolve().parent) not in sys.path:  # the helpers beside it, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_commands import _label, check_distinct_outputs, default_result_file, expand_sweeps  # noqa: E402
from slurm_settings import PRESET_DIR, _fail, executor_parameters, load_preset, merge_settings  # noqa: E402
from slurm_task import FscsTask  # noqa: E402


def _executor(settings: dict[str, Any], folder: str | os.PathLike, name: str, cluster: str | None,
              python: str | None) -> Any:
    import shlex

    import submitit

    try:  # the task class travels by value: the job needs fscs + submitit, not this file
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[FscsTask.__module__])
    except (ImportError, ValueError, KeyError):
        pass
    # submitit refuses a requeue after its own count of timeouts (max_num_timeout, default 3) whatever
    # FscsTask.checkpoint() says: both limits are --max-requeues
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_python=python or shlex.quote(sys.executable),
                                     slurm_max_num_timeout=int(settings["max_requeues"]))
    executor.update_parameters(**executor_parameters(settings, name))
    return executor


@contextlib.contextmanager
def _sbatch_stderr_once() -> Any:
    """submitit prints a refusing sbatch's stderr before raising: it is dropped (the refusal is main()'s one
    line, from the exception); what a submission that went through printed is passed on."""
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        yield
    sys.stderr.write(said.getvalue())


def submit(argv: Sequence[str], settings: dict[str, Any], folder: str | os.PathLike, name: str = "fscs",
           cluster: str | None = None, python: str | None = None) -> Any:
    """Submit one job of `fscs <argv>` (settings as merge_settings returns them); returns the submitit Job."""
    executor = _executor(settings, folder, name, cluster, python)
    task = FscsTask(argv, settings["max_requeues"], default_result_file(argv))
    with _sbatch_stderr_once():
        return executor.submit(task)


def submit_array(argvs: Sequence[Sequence[str]], settings: dict[str, Any], folder: str | os.PathLike,
                 name: str = "fscs", cluster: str | None = None, python: str | None = None,
                 parallelism: int | None = None) -> list[Any]:
    """Submit one SLURM array job, one array task per command line (each with the full resources of
    `settings`, its own rendezvous port and its own requeues); returns the submitit Jobs in order."""
    executor = _executor(settings, folder, name, cluster, python)
    executor.update_parameters(slurm_array_parallelism=int(parallelism or len(argvs)))
    tasks = [FscsTask(argv, settings["max_requeues"], default_result_file(argv)) for argv in argvs]
    jobs: list[Any] = []
    with _sbatch_stderr_once(), executor.batch():
        for task in tasks:
            jobs.append(executor.submit(task))
    return jobs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"cluster preset: a name in {PRESET_DIR} or a YAML file")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--tasks-per-node", type=int, help="processes per node (default: GPUs per node, or 1)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem-gb", type=int)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--time", dest="time_min", type=int, help="wall-clock limit in minutes")
    p.add_argument("--max-requeues", type=int, help="requeues after preemption/timeout (default 3)")
    p.add_argument("--signal-delay-s", type=int, help="seconds between SIGUSR2 and the kill (default 120)")
    p.add_argument("--folder", default="runs/slurm/%j", help="submitit logs and pickles")
    p.add_argument("--name", default="fscs", help="job name")
    p.add_argument("--wait", action="store_true", help="wait for the job and print rank 0's result")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="submit an array job, one task per value (repeat for a grid); {NAME} in the command "
                        "becomes the value: --sweep fold=0,1,2,3 -- train name=w_f{fold} data.fold={fold}")
    p.add_argument("--array-parallelism", type=int,
                   help="with --sweep: array tasks running at once (default all)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- then an fscs command line (train ..., bench ...)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or command[0] not in ("train", "pretrain", "bench"):
        print("launchers/slurm.py: error: give an fscs command after --, e.g. -- train name=weak",
              file=sys.stderr)
        return 2
    keys = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "partition", "account",
            "qos", "constraint", "time_min", "max_requeues", "signal_delay_s")
    cli = {k: getattr(args, k) for k in keys}
    from submitit.core.utils import FailedJobError

    from fscs.errors import FSCSError

    try:
        settings = merge_settings(load_preset(args.preset) if args.preset else None, cli)
        if args.array_parallelism is not None and (not args.sweep or args.array_parallelism < 1):
            _fail(f"--array-parallelism {args.array_parallelism}: needs --sweep and a value >= 1")
        tasks = expand_sweeps(command, args.sweep)
        if args.sweep:
            check_distinct_outputs(tasks)
            jobs = submit_array([argv for _, argv in tasks], settings, args.folder, name=args.name,
                                parallelism=args.array_parallelism)
        else:
            jobs = [submit(command, settings, args.folder, name=args.name)]
    except FSCSError as exc:
        print(f"launchers/slurm.py: error: {exc}", file=sys.stderr)
        return 2
    # sbatch refused the job (submitit wraps its stderr in FailedJobError), or sbatch is missing
    except (FailedJobError, subprocess.CalledProcessError, OSError) as exc:
        said = getattr(exc, "stderr", None) or getattr(exc, "output", None) or exc
        said = said.decode(errors="replace") if isinstance(said, bytes) else str(said)
        line = " ".join(said.split())[:300]
        print(f"launchers/slurm.py: error: sbatch could not submit the job ({line}); check --partition, "
              "--account, --qos and that the SLURM controller answers (sinfo)", file=sys.stderr)
        return 2
    shape = f"{settings['nodes']} node(s) x {settings['tasks_per_node']} task(s)"
    if args.sweep:
        array = jobs[0].job_id.split("_")[0]
        print(f"submitted array job {array}: {len(jobs)} array task(s) of {shape} each")
        for job, (values, _) in zip(jobs, tasks):
            print(f"  {job.job_id}: {_label(values)}; logs in {job.paths.folder}")
    else:
        print(f"submitted job {jobs[0].job_id}: {shape}; logs in {jobs[0].paths.folder}")
    if not args.wait:
        return 0
    failed = 0
    for job, (values, _) in zip(jobs, tasks):
        failed += not _print_result(job, _label(values))
    return 1 if failed else 0


def _print_result(job: Any, label: str = "") -> bool:
    """Wait for `job`; print rank 0's result (prefixed by the array task's values), or one error line."""
    from submitit.core.utils import UncompletedJobError

    prefix = f"{job.job_id} {label}: " if label else ""
    try:
        print(f"{prefix}{job.results()[0]}")
        return True
    except UncompletedJobError:  # FailedJobError too: a task raised, or the job ended without a result
        print(f"launchers/slurm.py: error: job {job.job_id} ended without a result: "
              f"{failure_line(job.stderr() or '')}; logs in {job.paths.folder}", file=sys.stderr)
        return False


FSCS_ERROR = re.compile(r"^(?:\[rank\d+\]: )?(fscs [a-z]+: error: .*)$", re.MULTILINE)


def failure_line(log: str) -> str:
    """Why a job failed, from its tasks' stderr: fscs' own one-line error, else the last exception line."""
    found = FSCS_ERROR.findall(log)
    if found:
        return found[-1].strip()
    lines = [ln.strip() for ln in log.splitlines()
             if re.match(r"(\[rank\d+\]: )?[\w.]+(Error|Exception|Interrupt)\b", ln.strip())]
    return lines[-1] if lines else "no error message in the job's stderr (see its logs)"


REEXEC_FLAG = "FSCS_LAUNCHER_REEXEC"


def ensure_project_python() -> None:
    """Re-run this script under the checkout's .venv when the running Python lacks the project.

    The README says `python launchers/slurm.py ...`; a `python` without torch, submitit or fscs would fail with
    a traceback, and submitit starts the job with the submitting interpreter, so the choice matters.
    """
    import importlib.util

    missing = next((m for m in ("fscs", "submitit", "torch") if importlib.util.find_spec(m) is None), None)
    if missing is None:  # found, not imported: --help and submission stay fast
        return
    venv = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"
    if venv.exists() and os.environ.get(REEXEC_FLAG) != "1":
        os.environ[REEXEC_FLAG] = "1"
        os.execv(str(venv), [str(venv), str(Path(__file__).resolve()), *sys.argv[1:]])
    raise SystemExit(f"launchers/slurm.py: {sys.executable} cannot import {missing}; run it with the project's "
                     "Python (.venv/bin/python, built by 'make test')")


if __name__ == "__main__":
    ensure_project_python()
    sys.exit(main())

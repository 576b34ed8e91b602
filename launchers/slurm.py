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
import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger("fscs.launchers.slurm")

PRESET_DIR = Path(__file__).resolve().parent / "presets"
PRESET_KEYS = {"partition", "account", "qos", "constraint", "nodes", "gpus_per_node", "tasks_per_node",
               "cpus_per_task", "mem_gb", "time_min", "max_requeues", "signal_delay_s", "setup", "additional",
               "srun_args"}
DEFAULTS: dict[str, Any] = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": None, "cpus_per_task": 4,
                            "time_min": 60, "max_requeues": 3, "signal_delay_s": 120}
PREEMPTED = 128 + int(signal.SIGUSR2)   # `fscs train` checkpointed after submitit's preemption/timeout signal
TERMINATED = 128 + int(signal.SIGTERM)  # ... after a SIGTERM (scancel, scontrol requeue, SLURM preemption)


def _fail(message: str) -> None:
    from fscs.errors import FSCSError

    raise FSCSError(message)


def load_preset(name: str | os.PathLike) -> dict[str, Any]:
    """A cluster preset: launchers/presets/<name>.yaml or a YAML path; unknown keys are errors."""
    import yaml

    path = Path(name)
    if not path.suffix:
        path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        _fail(f"cluster preset '{name}' not found; use one of: {known}, or a YAML file path")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        _fail(f"preset '{path}' has unknown key(s) {', '.join(unknown)}; "
              f"valid: {', '.join(sorted(PRESET_KEYS))}")
    return data


def merge_settings(preset: dict[str, Any] | None, cli: dict[str, Any]) -> dict[str, Any]:
    """Defaults <- preset <- command line (None on the command line = not given)."""
    settings = {**DEFAULTS, **(preset or {})}
    settings.update({k: v for k, v in cli.items() if v is not None})
    if cli.get("gpus_per_node") is not None and cli.get("tasks_per_node") is None:
        settings["tasks_per_node"] = None  # a preset's tasks_per_node went with the preset's GPU count
    if settings.get("tasks_per_node") is None:  # one process per GPU, or one CPU process
        settings["tasks_per_node"] = max(1, int(settings.get("gpus_per_node") or 0))
    check_settings(settings)
    return settings


MINIMUM = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": 0,
           "time_min": 1, "max_requeues": 0, "signal_delay_s": 0}


def check_settings(settings: dict[str, Any]) -> None:
    """One-line errors for values sbatch would refuse, misread (--nodes=-1 submits a job submitit then cannot
    follow) or turn into a job that is signalled as soon as it starts."""
    for key, low in MINIMUM.items():
        value = settings.get(key)
        if value is None and key in ("mem_gb", "gpus_per_node"):  # null in a preset: not passed
            continue
        flag = "--" + ("time" if key == "time_min" else key.replace("_", "-"))
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _fail(f"{flag} (preset key {key}) must be an integer >= {low}, got {value!r}")
    gpus, tasks = settings.get("gpus_per_node") or 0, settings["tasks_per_node"]
    if gpus and tasks > gpus:
        _fail(f"--tasks-per-node {tasks} is more than --gpus-per-node {gpus}: each task uses the GPU of its "
              "local rank (cuda:LOCAL_RANK); give at most one task per GPU")
    if settings["signal_delay_s"] >= 60 * settings["time_min"]:
        _fail(f"--signal-delay-s {settings['signal_delay_s']} is not shorter than --time "
              f"{settings['time_min']} min: SLURM would send the checkpoint signal as soon as the job "
              "starts; raise --time or lower --signal-delay-s (one step plus a save)")


def executor_parameters(settings: dict[str, Any], name: str = "fscs") -> dict[str, Any]:
    """submitit AutoExecutor.update_parameters(...) keyword arguments of merged settings."""
    params: dict[str, Any] = {"name": name, "nodes": int(settings["nodes"]),
                              "tasks_per_node": int(settings["tasks_per_node"]),
                              "cpus_per_task": int(settings["cpus_per_task"]),
                              "timeout_min": int(settings["time_min"]),
                              "slurm_signal_delay_s": int(settings["signal_delay_s"])}
    if settings.get("gpus_per_node"):
        params["gpus_per_node"] = int(settings["gpus_per_node"])
    if settings.get("mem_gb"):
        params["mem_gb"] = int(settings["mem_gb"])
    for key in ("partition", "account", "qos", "constraint", "setup"):
        if settings.get(key):
            params[f"slurm_{key}"] = settings[key]
    # a task that fails (e.g. rank 0 cannot open the rendezvous port) ends the step: without this srun waits
    # for the other ranks, which wait for rank 0 until torch's 30-minute timeout or the job's time limit
    params["slurm_srun_args"] = ["--kill-on-bad-exit=1", *(settings.get("srun_args") or [])]
    if settings.get("additional"):
        params["slurm_additional_parameters"] = dict(settings["additional"])
    return params


def preemption_grace_s(lookup: Callable[[], str | None] | None = None) -> float:
    """Seconds until a preempted job's EndTime (SLURM moves it to now + GraceTime and sets PreemptTime);
    0 when the job is not being preempted or scontrol does not answer."""
    from datetime import datetime

    out = (lookup or _scontrol_this_job)() or ""
    preempt, end = re.search(r"\bPreemptTime=(\S+)", out), re.search(r"\bEndTime=(\S+)", out)
    if not preempt or not end or preempt.group(1) in ("None", "Unknown"):
        return 0.0
    try:
        return max(0.0, (datetime.fromisoformat(end.group(1)) - datetime.now()).total_seconds())
    except ValueError:
        return 0.0


def _scontrol_this_job() -> str | None:
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def distributed_env(lookup: Callable[[str], str | None] | None = None) -> dict[str, str]:
    """Export and return torch.distributed's variables for this SLURM task (TorchDistributedEnvironment:
    ranks from the SLURM task variables, MASTER_ADDR = first node of the job, MASTER_PORT from the job id)."""
    from submitit.helpers import TorchDistributedEnvironment

    from fscs.distributed import node_address  # inside the job: fscs imports there

    tde = TorchDistributedEnvironment()
    tde.master_addr = node_address(tde.master_addr, lookup)  # DNS, else the node's NodeAddr
    tde.export(set_cuda_visible_devices=False, overwrite=True)  # fscs maps LOCAL_RANK to cuda:LOCAL_RANK
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                       "MASTER_PORT")}


class FscsTask:
    """One SLURM task of an `fscs` command line; checkpointable (submitit requeues it on preemption)."""

    def __init__(self, argv: Sequence[str], max_requeues: int = 3, result_file: str | None = None,
                 requeues: int = 0) -> None:
        self.argv = [str(a) for a in argv]
        self.max_requeues = int(max_requeues)
        self.result_file = result_file
        self.requeues = int(requeues)

    def restarts(self) -> int:
        """Times this job was requeued so far (ours or anyone's: SLURM_RESTART_COUNT counts every requeue)."""
        return max(self.requeues, int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))

    def __call__(self) -> dict[str, Any]:
        import submitit

        from fscs.cli import main as fscs_main
        from fscs.distributed import IN_PROCESS_ENV

        job = submitit.JobEnvironment()
        dist_env = distributed_env()
        level = logging.INFO if job.global_rank == 0 else logging.WARNING
        logging.basicConfig(level=level, datefmt="%H:%M:%S",
                            format=f"%(asctime)s [r{job.global_rank}] %(name)s: %(message)s")
        os.environ[IN_PROCESS_ENV] = "1"  # fscs' finish() returns instead of ending this process
        logger.info("job %s task %s/%s start %d (requeues so far %d, at most %d): fscs %s; master %s:%s",
                    job.job_id, dist_env["RANK"], dist_env["WORLD_SIZE"], self.restarts() + 1,
                    self.restarts(), self.max_requeues, " ".join(self.argv), dist_env["MASTER_ADDR"],
                    dist_env["MASTER_PORT"])
        code = fscs_main(list(self.argv))
        code = 0 if code is None else int(code)
        if code == PREEMPTED:
            self._requeue(job.global_rank)
        if code == TERMINATED:
            self._wait_for_slurm("SIGTERM: checkpoint written; waiting for SLURM to end or requeue the job")
        if code != 0:
            raise RuntimeError(f"fscs {' '.join(self.argv)} exited with code {code} (see this task's stderr)")
        result: dict[str, Any] = {"rank": int(dist_env["RANK"]), "world_size": int(dist_env["WORLD_SIZE"]),
                                  "job_id": job.job_id, "returncode": code, "restarts": self.restarts(),
                                  "argv": self.argv, "result": None}
        if self.result_file and Path(self.result_file).is_file():
            import json

            result["result"] = json.loads(Path(self.result_file).read_text())
        return result

    def _requeue(self, rank: int) -> None:
        """After the collective checkpoint: rank 0 runs submitit's handler (checkpoint() + scontrol requeue +
        exit); the other ranks wait for the requeue to stop them."""
        handler = signal.getsignal(signal.SIGUSR2)
        if rank == 0 and callable(handler):
            logger.warning("preempted or timed out: checkpoint written, requeueing through submitit")
            handler(signal.SIGUSR2, None)
        self._wait_for_slurm("preempted: checkpoint written; waiting for rank 0's requeue")

    @staticmethod
    def _wait_for_slurm(reason: str, seconds: float = 120.0,
                        lookup: Callable[[], str | None] | None = None) -> None:
        """Wait for SLURM to kill this task (KillWait after a requeue/scancel; a preempted job's GraceTime,
        which can be longer than `seconds`: leaving early would end the job FAILED instead of requeued)."""
        grace = preemption_grace_s(lookup)
        logger.warning("%s%s", reason, f" (preempted: {grace:.0f} s of GraceTime left)" if grace else "")
        deadline = time.monotonic() + seconds + grace
        while time.monotonic() < deadline:
            time.sleep(1.0)
        logger.error("SLURM neither ended nor requeued the job within %.0f s of the signal: this task stops "
                     "(exit 1) at its checkpoint; submit the same command again to resume", seconds + grace)
        raise SystemExit(1)  # never a result pickle: the job is ending or being requeued

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: the same task (it resumes from the checkpoint), or None past the limit."""
        from submitit.helpers import DelayedSubmission

        done = self.restarts()
        if done >= self.max_requeues:
            logger.error("not requeueing: %d requeue(s) done, limit --max-requeues %d", done,
                         self.max_requeues)
            return None
        logger.warning("requeue %d of at most %d: the job resumes from its last checkpoint", done + 1,
                       self.max_requeues)
        return DelayedSubmission(FscsTask(self.argv, self.max_requeues, self.result_file, requeues=done + 1))


def run_config(argv: Sequence[str]) -> Any:
    """The validated config of a `train` or `pretrain` command line (what the job will load), else None."""
    if not argv or argv[0] not in ("train", "pretrain"):
        return None
    rest, config = list(argv[1:]), None
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 == len(rest):
            _fail(f"fscs {argv[0]}: --config needs a YAML file after it")
        config, rest = rest[i + 1], rest[:i] + rest[i + 2:]
    elif any(a.startswith("--config=") for a in rest):  # argparse's other spelling, which fscs accepts too
        i = next(i for i, a in enumerate(rest) if a.startswith("--config="))
        config, rest = rest[i].partition("=")[2], rest[:i] + rest[i + 1:]
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    if argv[0] == "train":
        from fscs.config import load_config

        return load_config(config, overrides)
    from fscs.pretrain_config import load_pretrain_config

    return load_pretrain_config(config, overrides)


def default_result_file(argv: Sequence[str]) -> str | None:
    """For `train`: the run's train_summary.json (absolute), so the job's result carries the summary."""
    if not argv or argv[0] != "train":
        return None
    return str((run_config(argv).run_dir / "train_summary.json").resolve())


SWEEP = re.compile(r"^([A-Za-z_]\w*)=(.*)$")


def expand_sweeps(command: Sequence[str], specs: Sequence[str]) -> list[tuple[dict[str, str], list[str]]]:
    """One command per combination of the --sweep values: [(values, argv)], in the order of the product
    (the first --sweep varies slowest). Every `{NAME}` in the command becomes the task's value of NAME.

    `--sweep fold=0,1,2,3 -- train name=weak_f{fold} data.fold={fold}` -> 4 commands. A NAME the command
    never mentions, an empty or repeated value, or a NAME given twice is a one-line error.
    """
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        match = SWEEP.match(spec)
        if not match:
            _fail(f"--sweep {spec!r}: expected NAME=V1,V2,... with NAME a plain word, e.g. "
                  "--sweep fold=0,1,2,3 and {fold} in the command")
        name, values = match[1], [v.strip() for v in match[2].split(",")]
        if not all(values):
            _fail(f"--sweep {spec}: an empty value; list the values separated by commas, e.g. {name}=0,1,2,3")
        if len(set(values)) < len(values):
            _fail(f"--sweep {spec}: a value is listed twice (two tasks would run the same command)")
        if name in dict(axes):
            _fail(f"--sweep {name} is given twice; list all its values in one --sweep {name}=...")
        if not any("{" + name + "}" in arg for arg in command):
            _fail(f"--sweep {name}: the command has no {{{name}}}, so every task would run the same command; "
                  f"use it where the value goes, e.g. name=weak_f{{{name}}} data.fold={{{name}}}")
        axes.append((name, values))
    tasks = []
    for combo in itertools.product(*(values for _, values in axes)):
        chosen = dict(zip((name for name, _ in axes), combo))
        argv = list(command)
        for name, value in chosen.items():
            argv = [arg.replace("{" + name + "}", value) for arg in argv]
        tasks.append((chosen, argv))
    return tasks


def _label(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def check_distinct_outputs(tasks: Sequence[tuple[dict[str, str], list[str]]]) -> None:
    """Two array tasks of one run directory would overwrite each other's checkpoints: a one-line error
    naming both (train/pretrain: the resolved run directory; other commands: the whole command line)."""
    seen: dict[str, dict[str, str]] = {}
    for values, argv in tasks:
        cfg = run_config(argv)
        key = str(cfg.run_dir.resolve()) if cfg is not None else " ".join(argv)
        if key in seen:
            what = f"the run directory {key}" if cfg is not None else f"the command `{key}`"
            _fail(f"--sweep: tasks {_label(seen[key])} and {_label(values)} share {what}; put the sweep's "
                  "{NAME} in name= (train/pretrain) or in --run-dir/--out (bench), e.g. name=weak_f{fold}")
        seen[key] = values


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

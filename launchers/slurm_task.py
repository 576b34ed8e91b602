"""Inside each SLURM task: `FscsTask` (torch.distributed variables, `fscs` in-process, checkpoint + requeue)."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

logger = logging.getLogger("fscs.launchers.slurm")

PREEMPTED = 128 + int(signal.SIGUSR2)   # `fscs train` checkpointed after submitit's preemption/timeout signal
TERMINATED = 128 + int(signal.SIGTERM)  # ... after a SIGTERM (scancel, scontrol requeue, SLURM preemption)


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

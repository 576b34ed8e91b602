"""The only module that reads rank/world environment variables (torchrun, SLURM, or a single process)."""
from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"
    """torchrun, slurm or single."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot parse SLURM node list '{nodelist}'")
    prefix, _, ranges = head.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def resolve_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read torchrun's variables, else SLURM's (one task per process), else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    # Only an srun step's tasks are ranks: a batch script (or salloc shell) sees the allocation's SLURM_NTASKS
    # and SLURM_PROCID=0 too, and would wait forever for ranks nobody starts. srun sets SLURM_STEP_NUM_TASKS.
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "0") or 0)
    if "SLURM_PROCID" in env and step_tasks > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        tasks_per_node = (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE")
                          or env.get("SLURM_TASKS_PER_NODE", "1"))
        local_ws = int(re.match(r"\d+", tasks_per_node).group(0))  # type: ignore[union-attr]
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=step_tasks,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=local_ws,
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            source="slurm",
        )
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        logger.info("SLURM job %s has %s tasks, but this process is not a task of an srun step: running as one "
                    "process (start the ranks with srun, or launchers/slurm.py)", env["SLURM_JOB_ID"],
                    env["SLURM_NTASKS"])
    return DistEnv()


def node_address(host: str, lookup: Callable[[str], str | None] | None = None) -> str:
    """An address for `host` (a SLURM node name): the name when DNS resolves it, else the node's NodeAddr."""
    import socket

    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        pass
    return (lookup or _scontrol_node_addr)(host) or host


def _scontrol_node_addr(host: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\bNodeAddr=(\S+)", out)
    return match.group(1) if match else None


def init(env: DistEnv, backend: str | None = None) -> None:
    """Start the process group (gloo on CPU, nccl on CUDA) when the job has several processes."""
    if not env.distributed or dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if env.source == "slurm" and "MASTER_ADDR" not in os.environ:
        # a node name outside DNS (NodeAddr= in slurm.conf) would leave every rank retrying it for 30 min
        os.environ["MASTER_ADDR"] = node_address(env.master_addr)
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    store = _restart_store(env)
    if env.is_main:
        logger.info("waiting for %d ranks at %s:%s (%s)", env.world_size, os.environ["MASTER_ADDR"],
                    os.environ["MASTER_PORT"], env.source)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, store=store)
    logger.info("process group up: rank %d/%d (%s, %s)", env.rank, env.world_size, backend, env.source)


def _restart_store(env: DistEnv) -> "dist.Store | None":
    """Under torchrun restarts (--max-restarts), a store whose keys are private to this attempt.

    torchrun --standalone keeps one agent store at the same MASTER_PORT across restarts, so a restarted
    group would read the dead workers' gloo addresses; the attempt prefix keeps each attempt apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                           is_master=False, timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"fscs/attempt_{attempt}", client)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: object) -> list:
    """Every rank's object, in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


IN_PROCESS_ENV = "FSCS_IN_PROCESS"
"""Set to 1 by launchers that call an entry point inside their own process (submitit tasks): finish() then
returns instead of ending the process, so the launcher can hand back a result."""


def finish(code: int = 0, hard_exit: bool | None = None) -> None:
    """End a distributed entry point: barrier, destroy the group, flush, hard exit.

    gloo can abort during interpreter teardown after the work is done; leaving with os._exit
    after an explicit barrier avoids that without losing output. hard_exit=False (default: unless
    $FSCS_IN_PROCESS is 1) stops after destroying the group and returns to the caller instead.
    """
    if hard_exit is None:
        hard_exit = os.environ.get(IN_PROCESS_ENV) != "1"
    try:
        if dist.is_available() and dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if hard_exit:
            logging.shutdown()
            os._exit(code)

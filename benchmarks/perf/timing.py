"""Timing and machine helpers for the perf benchmarks: interleaved rounds, medians, CPU/wall clocks, RSS."""
from __future__ import annotations

import logging
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Clock:
    """What a benchmark measures on `device`.

    On CPU the process CPU time (time.process_time) with torch pinned to `threads` threads: with one thread
    it is the compute time of the measured code, and unlike wall time it does not grow when other processes
    share the cores. On CUDA the wall time between two synchronisations.
    """

    device: torch.device
    threads: int = 1

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "wall (cuda synchronised)"
        return f"process CPU time, {self.threads} thread(s)"

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()

    def time(self, fn: Callable[[], Any]) -> float:
        start = self.now()
        fn()
        return self.now() - start


@dataclass
class Samples:
    """Seconds per call of each named function, collected round by round."""

    runs: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.runs[name])

    def spread(self, name: str) -> float:
        """(max - min) / median of the measured calls (0 for one call)."""
        vals = self.runs[name]
        return (max(vals) - min(vals)) / statistics.median(vals) if len(vals) > 1 else 0.0


def interleaved(clock: Clock, fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> Samples:
    """Call every function once per round, in turn (round-robin), after `warmup` untimed rounds.

    Side-by-side rounds make ratios between the functions robust to slow drifts of the machine's load.
    """
    out = Samples({name: [] for name in fns})
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            dt = clock.time(fn)
            if r >= warmup:
                out.runs[name].append(dt)
        logger.info("round %d/%d: %s", r + 1, warmup + rounds,
                    ", ".join(f"{n}={v[-1]:.3f}s" for n, v in out.runs.items() if v and r >= warmup))
    return out


def set_threads(n: int) -> None:
    """Pin torch's intra-op pool to n threads (and say so to OpenMP/MKL children)."""
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)


def peak_rss_mib() -> float:
    """Peak resident set size of this process image so far, MiB.

    VmHWM of /proc/self/status (reset by exec); ru_maxrss only where /proc is missing, as on Linux it also
    remembers the parent's size at fork time and would overstate a fresh subprocess.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Current resident set size, MiB (from /proc/self/statm; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in wanted if f in flags)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def git_commit() -> str:
    """The checkout's commit (+ a note when files differ), else $FSCS_COMMIT (a copy without .git), else
    'unknown'."""
    given = os.environ.get("FSCS_COMMIT", "").strip()
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if not head:
            return given or "unknown"
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return given or "unknown"


def machine_info(device: torch.device) -> dict[str, str]:
    """The facts a reader needs to compare numbers across machines."""
    mem = ""
    try:
        kib = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal")).split()[1])
        mem = f"{kib / 2**20:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    info = {
        "cpu": f"{_cpu_model()} ({os.cpu_count()} logical cores; {_cpu_flags()}) {mem}".strip(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "load average at start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return info

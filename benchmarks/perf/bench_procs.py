"""Benchmarks 6 (1 vs 2 processes under torchrun) and 7 (peak memory per batch size), each run in fresh
subprocesses of worker.py."""
from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from setups import Setting
from timing import REPO

logger = logging.getLogger(__name__)

WORKER = Path(__file__).resolve().parent / "worker.py"
GIB = 1024.0


def _run_worker(cmd: list[str], threads: int, timeout: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fscs-perf-") as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd + ["--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"worker failed ({proc.returncode}): {' | '.join(tail)}")
        return json.loads(out.read_text())


def _args(setting: Setting, shards: str, precision: str, device: str) -> list[str]:
    return ["--shards", shards, "--backbone", setting.backbone, "--size", str(setting.image_size),
            "--batch", str(setting.batch), "--precision", precision, "--device", device]


def bench_scaling(setting: Setting, shards: str, *, precision: str, steps: int, warmup: int,
                  timeout: int = 1800) -> dict[str, Any]:
    """Throughput of 1 process x 1 thread, 2 processes x 1 thread (DDP, gloo) and 1 process x 2 threads."""
    runs = []
    for procs, threads in ((1, 1), (2, 1), (1, 2)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               str(WORKER), "scale", *_args(setting, shards, precision, "cpu"), "--threads", str(threads),
               "--steps", str(steps), "--warmup", str(warmup)]
        res = _run_worker(cmd, threads, timeout)
        step = statistics.median(res["step_wall_s"])
        runs.append({"processes": procs, "threads_per_process": threads, "step_wall_s": step,
                     "step_cpu_s": statistics.median(res["step_cpu_s_rank0"]),
                     "samples_per_s": procs * setting.batch / step})
    base = runs[0]["samples_per_s"]
    for r in runs:
        cores = r["processes"] * r["threads_per_process"]
        r["speedup"] = r["samples_per_s"] / base
        r["efficiency"] = r["speedup"] / cores
    return {"setting": setting.label, "precision": precision, "steps": steps, "runs": runs}


def bench_memory(setting_of, shards: str, *, batches: list[int], reference_batches: list[int], precision: str,
                 device: str, budget_gib: float = 24.0, timeout: int = 3600) -> dict[str, Any]:
    """Peak memory of one training step per batch size (fresh process each); linear fit -> largest batch.

    setting_of(batch) -> Setting. On CPU the peak RSS, on CUDA the peak allocated GPU memory.
    """
    key = "cuda_peak_allocated_mib" if device == "cuda" else "peak_rss_mib"
    out: dict[str, Any] = {"budget_gib": budget_gib, "measure": key, "precision": precision, "impls": {}}
    for impl, sizes in (("ours", batches), ("reference", reference_batches)):
        points = []
        for b in sizes:
            cmd = [sys.executable, str(WORKER), "memory", *_args(setting_of(b), shards, precision, device),
                   "--impl", impl, "--steps", "1"]
            try:
                res = _run_worker(cmd, 1, timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                logger.warning("memory %s batch %d failed: %s", impl, b, exc)
                points.append({"batch": b, "error": str(exc)[:200]})
                continue
            points.append({"batch": b, "peak_mib": res[key], "before_step_mib": res["rss_before_step_mib"],
                           "step_cpu_s": res["step_cpu_s"]})
        good = [p for p in points if "peak_mib" in p]
        fit = None
        if len(good) >= 2:
            xs, ys = [p["batch"] for p in good], [p["peak_mib"] for p in good]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            intercept = my - slope * mx
            largest = int((budget_gib * GIB - intercept) // slope) if slope > 0 else None
            fit = {"mib_per_episode": slope, "intercept_mib": intercept,
                   "predicted_peak_batch12_mib": intercept + 12 * slope, "largest_batch_in_budget": largest}
        out["impls"][impl] = {"points": points, "fit": fit}
    return out

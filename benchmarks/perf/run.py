"""Perf benchmarks of issue 7 in one command; writes RESULTS.md (+ results.json) with machine, command, date.

    python benchmarks/perf/run.py                  # everything this CPU allows (~20-30 min on 1 thread)
    python benchmarks/perf/run.py --quick          # smoke run, small step counts (~5 min)
    python benchmarks/perf/run.py --device cuda --only eq,1,3,7 --out RESULTS-cuda.md   (see benchmarks/gpu)

Benchmarks: eq = A/B equality of the optimised code vs the old one; 1 = step / backbone bound;
2 = distillation share; 3 = evaluation feature reuse; 4 = loader headroom; 5 = fp32 / bf16 / compile;
6 = 1 vs 2 processes; 7 = peak memory and the largest batch in 24 GiB. See docs/perf.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_data import bench_loader  # noqa: E402
from bench_eval import bench_eval_reuse  # noqa: E402
from bench_procs import bench_memory, bench_scaling  # noqa: E402
from bench_train import bf16_metric_check, bench_step  # noqa: E402
from equivalence import run_equivalence  # noqa: E402
from report_md import render  # noqa: E402
from setups import Setting, ensure_shards, offline_default, vit_s8_400  # noqa: E402
from timing import Clock, load_average, machine_info, set_threads  # noqa: E402

from fscs.atomic import write_text_atomic  # noqa: E402

logger = logging.getLogger("benchmarks.perf")

ALL = ("eq", "1", "2", "3", "4", "5", "6", "7")


def _profile(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """Step counts and sizes per mode (quick / default / full) and device."""
    if args.quick:
        return dict(rounds=2, rounds_big=1, warmup=1, big_batch=1, compile=False, check_steps=5,
                    check_episodes=16, loader_samples=24, scale_steps=2, mem_batches=[1, 2], mem_ref=[1],
                    eval_big=False)
    p = dict(rounds=5, rounds_big=3, warmup=1, big_batch=2, compile=not cuda, check_steps=60,
             check_episodes=64, loader_samples=96, scale_steps=5, mem_batches=[1, 2, 4, 12],
             mem_ref=[1, 2, 4], eval_big=True)
    if cuda:
        p.update(rounds=6, rounds_big=4, big_batch=12, mem_batches=[4, 8, 12], mem_ref=[4])
    if args.full:
        p.update(big_batch=12)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--only", default=",".join(ALL), help=f"comma list of {', '.join(ALL)}")
    parser.add_argument("--quick", action="store_true", help="small step counts (smoke run)")
    parser.add_argument("--full", action="store_true", help="ViT-S/8 400 px steps at batch 12 (slow on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (ratios assume 1)")
    parser.add_argument("--shards", default=None,
                        help="shard dir (default: the config's, else a small synthetic set)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    parser.add_argument("--json", default=None, help="raw results (default: OUT with .json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("fscs", "torch", "webdataset"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    set_threads(args.threads)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = sorted(set(only) - set(ALL))
    if bad:
        parser.error(f"--only: unknown {bad}; choose from {', '.join(ALL)}")
    prof = _profile(args, cuda)
    clock = Clock(device, args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="fscs-perf-"))
    shards = ensure_shards(args.shards, scratch)
    small, big = offline_default(), vit_s8_400(prof["big_batch"])
    precisions = ("fp32", "bf16")
    device_default = "bf16" if cuda else "fp32"  # evaluation and memory run in the device's default precision
    results: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device), "clock": clock.kind, "machine": machine_info(device), "profile": prof,
        "shards": shards, "errors": {},
    }

    out = Path(args.out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")

    def flush() -> None:
        """Write what is measured so far (atomically): a run killed by its time budget keeps its tables."""
        write_text_atomic(json_path, json.dumps(results, indent=2, default=str))
        write_text_atomic(out, render(results))

    def attempt(key: str, fn, *a, **kw) -> Any:
        logger.info("=== %s", key)
        try:
            results[key] = fn(*a, **kw)
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not lose the others
            logger.error("%s failed: %s", key, exc)
            results["errors"][key] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        flush()
        return results.get(key)

    if "eq" in only:
        attempt("equivalence", run_equivalence, device, small.backbone, small.image_size)
    if {"1", "2", "4", "5"} & set(only):
        attempt("step_small", bench_step, small, shards, clock, precisions=precisions, rounds=prof["rounds"],
                warmup=prof["warmup"], reference=True, compile_head=prof["compile"] and "5" in only,
                skip_ab="5" in only)
    if {"1", "2"} & set(only):
        attempt("step_big", bench_step, big, shards, clock, precisions=precisions, rounds=prof["rounds_big"],
                warmup=prof["warmup"], reference=True, compile_head=False)
    if "3" in only:
        ev_small = Setting(f"{small.backbone}, {small.image_size} px", small.backbone, small.image_size, 2,
                           way=2, shot=5)
        attempt("eval_small", bench_eval_reuse, ev_small, shards, clock, episodes=2, rounds=prof["rounds"],
                warmup=prof["warmup"], precision=device_default)
        if prof["eval_big"]:
            ev_big = Setting(f"{big.backbone}, 400 px random weights", big.backbone, big.image_size, 1,
                             way=2, shot=2)
            attempt("eval_big", bench_eval_reuse, ev_big, shards, clock, episodes=1,
                    rounds=prof["rounds_big"], warmup=prof["warmup"], precision=device_default)
    if "4" in only and results.get("step_small"):
        rates = {r["precision"]: r["samples_per_s"] for r in results["step_small"]["rows"]}
        attempt("loader_small", bench_loader, small, shards, rates, samples=prof["loader_samples"])
        if results.get("step_big"):
            rates = {r["precision"]: r["samples_per_s"] for r in results["step_big"]["rows"]}
            attempt("loader_big", bench_loader, big, shards, rates,
                    samples=max(12, prof["loader_samples"] // 4))
    if "5" in only:
        attempt("bf16_check", bf16_metric_check, small, shards, device, train_steps=prof["check_steps"],
                episodes=prof["check_episodes"])
    if "6" in only and not cuda:
        attempt("scaling", bench_scaling, small, shards, precision="fp32", steps=prof["scale_steps"],
                warmup=2)
    if "7" in only:
        attempt("memory", bench_memory, vit_s8_400, shards, batches=prof["mem_batches"],
                reference_batches=prof["mem_ref"], precision=device_default, device=device.type)
    results["machine"]["load average at end"] = load_average()
    flush()
    logger.info("wrote %s and %s", out, json_path)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""`fscs demo`: shards -> weak and full training under torchrun -> 1w1s/2w1s evaluation -> one table."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from fscs.atomic import write_text_atomic
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

REGIMES = ("weak", "full")
SETTINGS = ("1w1s", "2w1s")


def _budget(quick: bool) -> dict[str, int]:
    if quick:
        return {"images": 600, "epochs": 1, "steps": 4, "batch": 4, "episodes": 40}
    return {"images": 6000, "epochs": 4, "steps": 100, "batch": 8, "episodes": 1000}


def _torchrun(nproc: int, args: list[str], log: Path) -> None:
    """Run `python -m fscs ARGS` under torchrun with nproc CPU processes; raise with the log tail on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fscs", *args]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise FSCSError(f"'{' '.join(args[:1])}' failed (exit {proc.returncode}); see {log}: " + " | ".join(tail))


def results_table(results: list[dict]) -> str:
    """Markdown table: one row per (regime, setting) with ER, mIoU, FB-IoU and their 95 % CIs."""
    lines = ["| regime | setting | ER | mIoU | FB-IoU | episodes |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (REGIMES.index(r["regime"]), r["way"], r["shot"])):
        m, ci = r["metrics"], r.get("ci95") or {}

        def cell(key: str) -> str:
            lo_hi = ci.get(key)
            return f"{m[key]:.1f}" + (f" [{lo_hi[0]:.1f}, {lo_hi[1]:.1f}]" if lo_hi else "")

        lines.append(f"| {r['regime']} | {r['way']}w{r['shot']}s | {cell('er')} | {cell('miou')} | "
                     f"{cell('fbiou')} | {m['episodes']} |")
    return "\n".join(lines)


def run_demo(out: Path, shards: Path, nproc: int = 2, quick: bool = False) -> Path:
    """Run the whole offline pipeline; returns the path of the Markdown report."""
    from fscs.config import ModelConfig
    from fscs.data.synthetic import build_synthetic_shards

    t0 = time.time()
    b = _budget(quick)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    shards = build_synthetic_shards(shards, num_images=b["images"])
    print(f"[demo] shards: {shards} ({time.time() - t0:.0f} s)", flush=True)
    results = []
    for regime in REGIMES:
        common = [f"name={regime}", f"out_dir={out}", f"data.shards={shards}", f"train.regime={regime}",
                  f"train.epochs={b['epochs']}", f"train.steps_per_epoch={b['steps']}",
                  f"data.batch_size={b['batch']}"]
        _torchrun(nproc, ["train", *common], logs / f"train_{regime}.log")
        print(f"[demo] trained {regime} ({time.time() - t0:.0f} s)", flush=True)
        _torchrun(nproc, ["bench", "--run-dir", str(out / regime), f"bench.settings=[{','.join(SETTINGS)}]",
                          f"bench.episodes={b['episodes']}"], logs / f"bench_{regime}.log")
        for s in SETTINGS:
            path = out / regime / "results" / f"{regime}_{regime}_fold0_{s}.json"
            results.append(json.loads(path.read_text()))
        print(f"[demo] evaluated {regime} ({time.time() - t0:.0f} s)", flush=True)
    table = results_table(results)
    weights = ModelConfig().weights
    note = ("\n> Backbone: the offline default ViT is **randomly initialised**, so its attention pseudo-masks are "
            "noise and weak-regime numbers mean little.\n" if not weights else
            "\n> Backbone: the shipped self-supervised ViT (`fscs/assets/README.md`), pretrained on training-split "
            "images without fold 0's classes; pseudo-mask rule `otsu_border`. Valid for fold 0 only.\n")
    r0 = results[0]
    report = (f"# fscs demo — synthetic-5i, fold 0\n\nBackbone `{r0['backbone']['name']}` "
              f"({r0['backbone'].get('weights_sha256', 'random-init')[:12]}), {r0['episodes']} episodes per "
              f"setting, seed {r0['seed']}, 95 % bootstrap CIs in brackets.\n{note}\n{table}\n\n"
              f"Wall time {time.time() - t0:.0f} s. Results JSON: `{out}/*/results/`.\n")
    path = out / "RESULTS.md"
    write_text_atomic(path, report)
    from fscs.bench.report import write_report

    page = write_report([out / r / "results" for r in REGIMES], out / "report", title="fscs demo: synthetic-5i")
    print("\n" + table + note)
    print(f"[demo] table: {path}")
    print(f"[demo] report: {page} (+ {page.parent / 'LEADERBOARD.md'})  ({time.time() - t0:.0f} s)")
    return path

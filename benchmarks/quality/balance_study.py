"""Presence-balanced batches vs the plain stream, over seeds, at the demo's budget.

Each (arm, seed) is one `fscs train` + `fscs bench` under torchrun exactly as `make demo` runs them (2 CPU
processes, batch 8 per process, 4 x 100 steps, fold 0, the shipped backbone), with `train.seed=SEED` and,
in the balanced arm, `data.balance_presence=true`. Every run is evaluated on the same 1w1s and 2w1s test
episodes. Finished runs are reused (delete <out> for fresh ones). Prints a markdown table and writes
<out>/results.json.

    python benchmarks/quality/balance_study.py --seeds 0 1 2 3 4 5 [--regime weak] [--out runs/balance_study]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fscs.demo import SETTINGS, _torchrun  # noqa: E402

ARMS = {"plain": [], "balanced": ["data.balance_presence=true"]}


def run_one(arm: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and evaluate one (arm, seed); returns the final epoch's CE(cls) and the test metrics."""
    name = f"{args.regime}_{arm}_s{seed}"
    run = args.out / name
    results = {s: run / "results" / f"{name}_{args.regime}_fold0_{s}.json" for s in SETTINGS}
    t0 = time.time()
    if not all(p.exists() for p in results.values()):
        common = [f"name={name}", f"out_dir={args.out}", f"data.shards={args.shards}",
                  f"train.regime={args.regime}", "train.epochs=4", "train.steps_per_epoch=100",
                  "data.batch_size=8", f"train.seed={seed}", *ARMS[arm]]
        _torchrun(2, ["train", *common], args.out / f"{name}.train.log")
        _torchrun(2, ["bench", "--run-dir", str(run), f"bench.settings=[{','.join(SETTINGS)}]",
                      f"bench.episodes={args.episodes}"], args.out / f"{name}.bench.log")
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in log if r.get("epoch") == max(x.get("epoch", 0) for x in log) and "cls" in r]
    row = {"arm": arm, "seed": seed, "final_cls": round(statistics.fmean(r["cls"] for r in last), 4),
           "wall_s": round(time.time() - t0)}
    for s, path in results.items():
        m = json.loads(path.read_text())["metrics"]
        row[s] = {"er": m["er"], "miou": m["miou"], "fbiou": m["fbiou"]}
    return row


def table(rows: list[dict]) -> str:
    """Per-seed rows, then mean and sample sd per arm."""
    lines = ["| arm | seed | final CE(cls) | 1w1s ER | 1w1s mIoU | 2w1s ER | 2w1s mIoU |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['final_cls']:.3f} | {r['1w1s']['er']:.1f} | "
                     f"{r['1w1s']['miou']:.1f} | {r['2w1s']['er']:.1f} | {r['2w1s']['miou']:.1f} |")
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        if len(rs) < 2:
            continue

        def ms(vals: list[float]) -> str:
            return f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1):.1f}"  # as `fscs report` computes them

        lines.append(f"| **{arm}** | mean ± sd ({len(rs)}) | {statistics.fmean(r['final_cls'] for r in rs):.3f} | "
                     + " | ".join(ms([r[s][k] for r in rs]) for s in SETTINGS for k in ("er", "miou")) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--regime", default="weak", choices=["weak", "full"])
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--shards", type=Path, default=ROOT / "data/synthetic-5i")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/balance_study")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            rows.append(run_one(arm, seed, args))
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(sorted(rows, key=lambda r: (list(ARMS).index(r["arm"]), r["seed"]))))


if __name__ == "__main__":
    main()

"""Weak vs mixed (several GT fractions) vs full: same training budget, same fold, same test episodes.

Trains one head per regime with fscs.train.Trainer (single process), evaluates all of them on the same
index-seeded episodes of the test fold, and measures the support-side pseudo-mask IoU on test-class images
(attention rule vs each mixed model's enhancer). Prints a markdown table and writes <out>/results.json.

    python benchmarks/quality/mixed_vs_fraction.py --steps 60 --episodes 300 [model.weights=PATH ...]

Extra `key=value` arguments are config overrides applied to every run (e.g. model.backbone=...,
model.weights=fscs/assets/....safetensors, model.image_size=...).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fscs.config import RunConfig, load_config
from fscs.data.shards import load_samples, read_index
from fscs.data.transforms import resize_mask, to_tensor_image
from fscs.distributed import DistEnv
from fscs.model.fscs_model import FSCSModel
from fscs.train import Trainer

logger = logging.getLogger(__name__)


def train_one(name: str, regime: str, fraction: float, args: argparse.Namespace
              ) -> tuple[RunConfig, Trainer, dict]:
    """Train (or resume) one run of the comparison in <out>/<name>; returns (config, trainer, summary)."""
    overrides = [f"name={name}", f"out_dir={args.out}", f"data.shards={args.shards}",
                 f"data.fold={args.fold}", f"train.regime={regime}", f"train.gt_fraction={fraction}",
                 "train.epochs=1", f"train.steps_per_epoch={args.steps}",
                 f"data.batch_size={args.batch_size}", "data.num_workers=0", f"train.seed={args.seed}",
                 *args.overrides]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, DistEnv())
    t0 = time.time()
    summary = trainer.fit()
    summary["wall_s"] = round(time.time() - t0, 1)
    return cfg, trainer, summary


def _evaluate_all(jobs: list[tuple[str, FSCSModel, str]], args: argparse.Namespace) -> dict[str, dict]:
    """Every (label, model, test-time regime) on the same episodes (shared backbone passes if possible)."""
    index = read_index(args.shards)
    common = {"fold": args.fold, "way": 1, "shot": 1, "episodes": args.episodes, "seed": args.seed,
              "batch_size": 8, "bootstrap": args.bootstrap}
    try:
        from fscs.bench.runner import EvalJob, evaluate_jobs

        results = evaluate_jobs([EvalJob(m, r, label) for label, m, r in jobs], index, artifacts=False,
                                **common)
        return {label: res for (label, _, _), res in zip(jobs, results)}
    except ImportError:
        from fscs.bench.runner import evaluate

        return {label: evaluate(m, index, regime=r, **common) for label, m, r in jobs}


@torch.no_grad()
def mask_iou(models: dict[str, FSCSModel], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Support-side pseudo-mask foreground IoU on test-fold images (own CLS vs own keys) against GT.

    Returns {method: {"mean_iou": per-image mean, "pooled_iou": total intersection / union}} for the
    attention rule, all-foreground, and each model's enhancer.
    """
    index = read_index(args.shards)
    entries = index.fold_entries("test", args.fold)[: args.mask_images]
    samples = load_samples(index, {k for k, _ in entries}, decode_masks=True)
    any_model = next(iter(models.values()))
    size, grid = any_model.image_size, any_model.backbone.grid
    stats: dict[str, list[tuple[int, int]]] = {}
    for start in range(0, len(entries), 16):
        chunk = entries[start : start + 16]
        images = torch.stack([to_tensor_image(samples[k].image, size) for k, _ in chunk])
        gt = torch.stack([resize_mask(samples[k].mask, size) == c for k, c in chunk])
        keep = torch.stack([resize_mask(samples[k].mask, size) != 255 for k, _ in chunk])
        feats = any_model.features(images)
        preds = {"attention rule": any_model.distiller.support_masks(feats.q, feats.k, grid, size).bool(),
                 "all foreground": torch.ones_like(gt)}
        for label, model in models.items():
            enh = model.enhancer
            assert enh is not None
            preds[f"enhancer of {label}"] = enh.probs(model.enhancer_logits(feats.q, feats.k), (size, size)) > 0.5
        for method, pred in preds.items():
            for p, g, kp in zip(pred, gt, keep):
                stats.setdefault(method, []).append((int((p & g & kp).sum()), int(((p | g) & kp).sum())))
    out = {}
    for method, pairs in stats.items():
        arr = np.array(pairs, dtype=np.float64)
        per_image = np.where(arr[:, 1] > 0, arr[:, 0] / np.maximum(arr[:, 1], 1), 1.0)
        out[method] = {"mean_iou": round(100 * float(per_image.mean()), 1),
                       "pooled_iou": round(100 * float(arr[:, 0].sum() / max(arr[:, 1].sum(), 1)), 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="data/synthetic-5i")
    p.add_argument("--out", default="runs/mixed_vs_fraction")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2])
    p.add_argument("--steps", type=int, default=60, help="training steps per regime (same budget for all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--episodes", type=int, default=300, help="1-way 1-shot test episodes (same for all)")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--mask-images", type=int, default=200, help="test-class images for the pseudo-mask IoU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true",
                   help="delete earlier runs in --out (else they are resumed)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value for every run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    mixed = [(f"mixed{f:g}", "mixed", f) for f in args.fractions]
    runs = [("weak", "weak", 0.0), *mixed, ("full", "full", 0.0)]
    t0 = time.time()
    trained: dict[str, tuple[RunConfig, Trainer, dict]] = {}
    for name, regime, fraction in runs:
        trained[name] = train_one(name, regime, fraction, args)
        logger.info("trained %s in %.1f s", name, trained[name][2]["wall_s"])
    jobs: list[tuple[str, FSCSModel, str]] = []
    for name, regime, _ in runs:
        model = trained[name][1].model.eval()
        jobs.append((name, model, regime))
        if regime == "mixed":  # ablation: the mixed head with raw attention pseudo-masks for the supports
            jobs.append((f"{name} (weak supports)", model, "weak"))
    results = _evaluate_all(jobs, args)
    masks = mask_iou({n: trained[n][1].model for n, r, _ in runs if r == "mixed"}, args)
    report: dict[str, Any] = {"args": dict(vars(args)), "seconds": round(time.time() - t0, 1),
                              "backbone": trained["weak"][1].model.backbone.identity, "runs": {},
                              "pseudo_mask_iou": masks}
    for label, _, regime in jobs:
        res, summary = results[label], trained[label.split(" ")[0]][2]
        report["runs"][label] = {"test_regime": regime,
                                 "metrics": {k: res["metrics"][k] for k in ("er", "miou", "fbiou")},
                                 "ci95": res.get("ci95"), "manifest_hash": res["manifest_hash"],
                                 "train_last": summary["history"][-1] if summary["history"] else None,
                                 "train_wall_s": summary["wall_s"]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(report, indent=2, default=str))
    hashes = {r["manifest_hash"] for r in report["runs"].values()}
    same = "same for all" if len(hashes) == 1 else "DIFFERENT"
    print(f"\nfold {args.fold}, 1-way 1-shot, {args.episodes} episodes (manifest {min(hashes)[:12]}, "
          f"{same}), {args.steps} steps x batch {args.batch_size}, backbone {report['backbone']}\n")
    print("| run | test-time supports | ER | mIoU | FB-IoU | mIoU 95% CI |\n|---|---|---|---|---|---|")
    for label, r in report["runs"].items():
        m, ci = r["metrics"], (r["ci95"] or {}).get("miou")
        ci_s = f"[{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "-"
        print(f"| {label} | {r['test_regime']} | {m['er']:.1f} | {m['miou']:.1f} | {m['fbiou']:.1f} "
              f"| {ci_s} |")
    print("\n| support pseudo-mask (test-class images) | mean IoU | pooled IoU |\n|---|---|---|")
    for method, v in masks.items():
        print(f"| {method} | {v['mean_iou']:.1f} | {v['pooled_iou']:.1f} |")
    print(f"\ntotal {report['seconds']:.0f} s; results in {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

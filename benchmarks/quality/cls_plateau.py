"""Why the weak-regime classifier sits at CE = ln 2 for hundreds of steps on the offline default.

Trains the head for --steps steps (single process, batch data.batch_size, 1-way 1-shot) in several
variants that swap one ingredient at a time, every variant on the same episode stream per seed:

    support masks (attention masking): pseudo (weak) or GT;  segmentation target: pseudo (weak) or GT;
    plus the weak recipe with train.cls_weight=1.0 and with train.lr=3e-3.

The pseudo masks are the configured rule's (model.mask_rule), exactly what `train.regime=weak` uses; (GT, GT)
is `train.regime=full`. Prints the classification CE averaged over windows of 25 steps, one row per
(variant, seed), and writes <out>/cls_plateau.json.

    python benchmarks/quality/cls_plateau.py --steps 200 --seeds 0 1 [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fscs.atomic import write_text_atomic
from fscs.config import load_config
from fscs.distributed import DistEnv
from fscs.losses import fscs_loss
from fscs.train import Trainer

WINDOW = 25
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    # name: (support masks, segmentation target, extra overrides)
    "weak": ("pseudo", "pseudo", []),
    "weak, cls_weight=1": ("pseudo", "pseudo", ["train.cls_weight=1.0"]),
    "weak, lr=3e-3": ("pseudo", "pseudo", ["train.lr=3e-3"]),
    "GT support masks, pseudo target": ("gt", "pseudo", []),
    "pseudo support masks, GT target": ("pseudo", "gt", []),
    "full (GT, GT)": ("gt", "gt", []),
}


def train_variant(support: str, target: str, overrides: list[str], seed: int, steps: int, out: Path
                  ) -> list[float]:
    """Per-step classification CE of one variant. The stream carries GT masks for every variant (the
    full-regime stream: same episodes for all); a variant only uses what its columns say."""
    cfg = load_config(None, [f"out_dir={out}", "name=plateau", "data.num_workers=0", "train.regime=full",
                             "train.epochs=1", f"train.steps_per_epoch={steps}", f"train.seed={seed}",
                             *overrides])
    trainer = Trainer(cfg, DistEnv())
    model, engine = trainer.model, trainer.engine
    loader = trainer._loader()
    loader.set_epoch(0)
    history = []
    for batch in loader:
        loss, parts = variant_loss(model, engine.module, batch, support, target, cfg.train.cls_weight,
                                   cfg.train.seg_fg_weight)
        engine.step(loss)
        history.append(float(parts["cls"]))
    return history


def variant_loss(model: Any, head: Any, batch: dict[str, torch.Tensor], support: str, target: str,
                 cls_weight: float, fg_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one variant on a full-regime batch (support_mask and query_target present).

    support / target: "pseudo" (the configured rule's masks, as train.regime=weak) or "gt". With both
    "pseudo" this is the weak step; with both "gt" the full step (boundary pixels as background).
    """
    presence = batch["presence"]
    feats = model.encode_episode(batch["query_img"], batch["support_img"])
    with torch.no_grad():
        pseudo_support, pseudo_query = model.pseudo_masks(feats, presence)
    gt_query = batch["query_target"]
    gt_query = torch.where(gt_query == 255, torch.zeros_like(gt_query), gt_query)
    masks = batch["support_mask"].float() if support == "gt" else pseudo_support
    seg_target = gt_query if target == "gt" else pseudo_query.long()
    cls, seg = head(feats.corr, masks.flatten(0, 2), model.backbone.grid, feats.size)
    return fscs_loss(cls.view(*presence.shape, 2), seg.view(*presence.shape, 2, *feats.size), presence,
                     seg_target, cls_weight=cls_weight, fg_weight=fg_weight)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    ap.add_argument("--out", default="runs/cls_plateau")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides applied to every variant")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.variants:
        support, target, extra = VARIANTS[name]
        for seed in args.seeds:
            t0 = time.time()
            hist = train_variant(support, target, [*args.overrides, *extra], seed, args.steps, out)
            windows = [sum(hist[i:i + WINDOW]) / len(hist[i:i + WINDOW]) for i in range(0, len(hist), WINDOW)]
            rows.append({"variant": name, "seed": seed, "cls_ce_windows": windows, "seconds": time.time() - t0})
            print(f"{name} seed {seed}: " + " ".join(f"{w:.3f}" for w in windows), flush=True)
    header = " | ".join(f"{i + WINDOW}" for i in range(0, args.steps, WINDOW))
    lines = [f"CE(cls) averaged over steps (i-{WINDOW}, i], ln 2 = {math.log(2):.3f}", "",
             f"| variant | seed | {header} |", "|---|---|" + "---|" * len(range(0, args.steps, WINDOW))]
    lines += [f"| {r['variant']} | {r['seed']} | " + " | ".join(f"{w:.3f}" for w in r["cls_ce_windows"]) + " |"
              for r in rows]
    print("\n".join(lines))
    write_text_atomic(out / "cls_plateau.json", json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

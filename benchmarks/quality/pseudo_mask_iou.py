"""Support-side pseudo-mask foreground IoU on the synthetic test-class images (one command, writes RESULTS.md).

Each test-split image whose labels are all test classes of the fold is passed through the frozen backbone;
its own CLS query against its own keys gives a pseudo-mask per rule (as the weak regime's support side),
scored against the ground-truth foreground (any class id 1..C; 255 boundary pixels ignored).

    .venv/bin/python benchmarks/quality/pseudo_mask_iou.py            # default backbone, fold 0

Rows: the default backbone with each rule, all-foreground, and a random-init ViT of the same shape with each
rule; plus the token-grid ceiling (best per-image threshold of the ground truth itself pooled to the token
grid and upsampled like a pseudo-mask) and, as a diagnostic, each map's best single fixed threshold.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

from fscs.data.shards import iter_shard_samples, read_index  # noqa: E402
from fscs.data.transforms import to_tensor_image  # noqa: E402
from fscs.model.backbone import FrozenBackbone  # noqa: E402
from fscs.model.distill import MASK_RULES, cls_key_cosine, pseudo_mask, upsample_map  # noqa: E402


@dataclass(frozen=True)
class EvalSet:
    """Test-class images of one fold: images uint8 [N, H, W, 3], fg bool [N, H, W], valid bool [N, H, W]."""

    keys: list[str]
    images: np.ndarray
    fg: np.ndarray
    valid: np.ndarray


def load_eval_set(shards: str | Path, fold: int = 0, split: str = "test", limit: int | None = None) -> EvalSet:
    """Images of `split` whose labels are all classes of `fold` (the fold's test classes), with GT fg masks."""
    index = read_index(shards)
    test_classes = set(index.folds[fold])
    keys, images, fgs, valids = [], [], [], []
    for sample in iter_shard_samples(index.shard_paths(split)):
        if not sample.labels or not set(sample.labels) <= test_classes or sample.mask is None:
            continue
        keys.append(sample.key)
        images.append(sample.image)
        fgs.append((sample.mask > 0) & (sample.mask != 255))
        valids.append(sample.mask != 255)
        if limit is not None and len(keys) >= limit:
            break
    if not keys:
        raise SystemExit(f"{shards}: no {split} images with only fold-{fold} classes")
    return EvalSet(keys, np.stack(images), np.stack(fgs), np.stack(valids))


@torch.no_grad()
def backbone_qk(backbone: FrozenBackbone, images: np.ndarray, batch: int = 32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS queries [N, h, dh] and image keys [N, h, T, dh] of the last block for uint8 images [N, H, W, 3]."""
    qs, ks = [], []
    for start in range(0, len(images), batch):
        x = torch.stack([to_tensor_image(img, backbone.image_size) for img in images[start:start + batch]])
        out = backbone(x)
        qs.append(out.q[:, :, 0])
        ks.append(out.k[:, :, 1:])
    return torch.cat(qs), torch.cat(ks)


def foreground_iou(pred: torch.Tensor, fg: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """pred [N, H, W] {0,1} vs fg/valid [N, H, W] -> mean per-image IoU, pooled IoU, predicted fg share."""
    p = pred.bool().numpy() & valid
    g = fg & valid
    inter = (p & g).sum(axis=(1, 2)).astype(np.float64)
    union = (p | g).sum(axis=(1, 2)).astype(np.float64)
    per_image = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"miou": float(per_image.mean()), "pooled": float(inter.sum() / max(union.sum(), 1)),
            "fg_share": float(p.sum() / max(valid.sum(), 1))}


def rule_scores(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int], data: EvalSet, rules: list[str],
                threshold: float) -> dict[str, dict[str, float]]:
    """IoU per rule (+ 'best fixed threshold' diagnostic on the head-mean map) for one backbone's q/k."""
    size = data.images.shape[1:3]
    cos = cls_key_cosine(q, k, grid)
    out = {}
    for rule in rules:
        masks = pseudo_mask(cos, size, rule, threshold, q_cls=q, k=k)
        out[rule] = foreground_iou(masks, data.fg, data.valid)
    up = upsample_map(cos, size)
    best = max(((t, foreground_iou((up > t).float(), data.fg, data.valid)["miou"])
                for t in np.linspace(-0.9, 0.9, 37)), key=lambda kv: kv[1])
    out["best-fixed-cos"] = {"miou": best[1], "pooled": float("nan"), "fg_share": float("nan"),
                             "cos_threshold": float(best[0])}
    return out


def grid_ceiling(data: EvalSet, grid: tuple[int, int]) -> float:
    """Mean IoU of the GT fg, area-pooled to the token grid, upsampled (bilinear) and thresholded at 0.5."""
    fg = torch.from_numpy(data.fg.astype(np.float32))
    pooled = F.adaptive_avg_pool2d(fg[:, None], grid)[:, 0]
    return foreground_iou((upsample_map(pooled, data.fg.shape[1:]) > 0.5).float(), data.fg, data.valid)["miou"]


def _row(name: str, rule: str, s: dict[str, float]) -> str:
    extra = f" (cos > {s['cos_threshold']:+.2f})" if "cos_threshold" in s else ""
    pooled = "—" if np.isnan(s["pooled"]) else f"{s['pooled']:.3f}"
    share = "—" if np.isnan(s["fg_share"]) else f"{s['fg_share']:.3f}"
    return f"| {name} | {rule}{extra} | **{s['miou']:.3f}** | {pooled} | {share} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="data/synthetic-5i", help="synthetic-5i shards (fscs shards synth)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--backbone", default=None, help="registry name (default: the config default)")
    p.add_argument("--weights", default=None, help="weights file (default: the config default)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--rules", default=",".join(MASK_RULES), help="comma-separated rules of fscs.model.distill")
    p.add_argument("--default-rule", default=None, help="the rule the default config uses (marked in the table)")
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--split", default="test", help="shard split of the images (test; val for tuning runs)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images")
    p.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")), help="results file ('' = none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from fscs import assets
    from fscs.config import ModelConfig

    defaults = ModelConfig()
    if defaults.weights is None:  # the config does not name weights yet: measure the shipped default
        defaults = ModelConfig(backbone=assets.DEFAULT_BACKBONE, weights=str(assets.DEFAULT_BACKBONE_WEIGHTS),
                               image_size=assets.DEFAULT_IMAGE_SIZE, mask_rule=assets.DEFAULT_MASK_RULE)
    name = args.backbone or defaults.backbone
    weights = assets.resolve_weights(args.weights if args.weights is not None else defaults.weights)
    size = args.image_size or defaults.image_size
    default_rule = args.default_rule or defaults.mask_rule
    rules = [r for r in args.rules.split(",") if r]
    t0 = time.time()
    data = load_eval_set(args.shards, args.fold, split=args.split, limit=args.limit)
    trained = FrozenBackbone(name, weights, size)
    random_bb = FrozenBackbone(name, None, size)
    grid = trained.grid
    results = {"trained": rule_scores(*backbone_qk(trained, data.images), grid, data, rules, args.threshold),
               "random": rule_scores(*backbone_qk(random_bb, data.images), grid, data, rules, args.threshold)}
    all_fg = foreground_iou(torch.ones(data.fg.shape), data.fg, data.valid)
    ceiling = grid_ceiling(data, grid)
    seconds = time.time() - t0

    wname = Path(weights).name if weights else "random init"
    lines = [f"# Pseudo-mask quality: support-side foreground IoU, fold {args.fold} test-class images", "",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads)",
             f"- command: `{' '.join(shlex.quote(a) for a in ['.venv/bin/python', 'benchmarks/quality/pseudo_mask_iou.py', *(argv if argv is not None else sys.argv[1:])])}`",
             f"- images: {len(data.keys)} {args.split}-split images of {args.shards} containing only fold-{args.fold} "
             f"classes {read_index(args.shards).folds[args.fold]}; GT fg share "
             f"{data.fg.sum() / data.valid.sum():.3f}; 255 pixels ignored",
             f"- backbone: `{name}` at {size} px (token grid {grid[0]}x{grid[1]}), weights `{wname}`; "
             f"default rule: `{default_rule}`",
             f"- mIoU = mean per-image foreground IoU; pooled = dataset-level intersection / union; "
             f"fg share = predicted foreground fraction; {seconds:.0f} s", "",
             "| backbone | rule | mIoU | pooled IoU | fg share |", "|---|---|---|---|---|"]
    for label, key in ((f"trained (`{wname}`)", "trained"), ("random init, same shape", "random")):
        for rule, s in results[key].items():
            mark = " ← default" if rule == default_rule and key == "trained" else ""
            lines.append(_row(label, rule + mark, s))
    lines.append(_row("all-foreground", "—", all_fg))
    lines += ["", f"Token-grid ceiling ({grid[0]}x{grid[1]} tokens, GT pooled to the grid, bilinear, > 0.5): "
              f"{ceiling:.3f}. `best-fixed-cos` picks one cosine threshold with the ground truth (diagnostic "
              "only, not a rule).", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

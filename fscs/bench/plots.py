"""Pictures and text: episode panels (runner, TensorBoard), report figures (matplotlib Agg), epoch tables."""
from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from fscs.data.transforms import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

IGNORE = 255
# RGB colour of way k (1-based: PALETTE[k - 1]); ignore pixels are drawn light grey.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (0, 130, 200), (60, 180, 75), (255, 225, 25), (145, 30, 180),
    (245, 130, 48), (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 0, 128),
)
IGNORE_RGB = (200, 200, 200)
PANEL_TITLES = ("query", "ground truth", "pseudo-mask", "prediction")


# ----------------------------------------------------------------------------------------------- panels
def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def ways_to_labels(masks: Any) -> np.ndarray:
    """Per-way binary masks [N, H, W] (1 = way's class, 0, 255 = ignore) -> label map [H, W] uint8.

    Pixel = k (1-based) for the first way whose mask is 1, 255 where no way is 1 and some way says ignore.
    """
    m = _as_numpy(masks).astype(np.int64)
    if m.ndim != 3:
        raise ValueError(f"ways_to_labels: need [N, H, W], got {m.shape}")
    fg = m == 1
    labels = np.where(fg.any(0), fg.argmax(0) + 1, 0)
    labels[(~fg.any(0)) & (m == IGNORE).any(0)] = IGNORE
    return labels.astype(np.uint8)


def colorize(img: np.ndarray, labels: np.ndarray | None, alpha: float = 0.55) -> np.ndarray:
    """Overlay a label map [h, w] (0 bg, k = way k, 255 ignore; any size) on an RGB uint8 image [H, W, 3].

    labels None -> the image greyed out (a "not available" tile).
    """
    base = np.asarray(img, dtype=np.uint8)
    if labels is None:
        grey = base.mean(axis=2, keepdims=True)
        return np.repeat(grey * 0.35 + 120, 3, axis=2).astype(np.uint8)
    lab = np.asarray(labels)
    if lab.shape != base.shape[:2]:
        lab = np.asarray(Image.fromarray(lab.astype(np.uint8)).resize(base.shape[1::-1], Image.NEAREST))
    colors = np.zeros((256, 3), dtype=np.float32)
    for k, rgb in enumerate(PALETTE, start=1):
        colors[k] = rgb
    colors[len(PALETTE) + 1 : IGNORE] = PALETTE[-1]
    colors[IGNORE] = IGNORE_RGB
    out = base.astype(np.float32)
    paint = lab != 0
    out[paint] = (1 - alpha) * out[paint] + alpha * colors[lab[paint]]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _fit_height(tile: np.ndarray, height: int) -> np.ndarray:
    h, w = tile.shape[:2]
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(tile).resize((width, height), Image.BILINEAR))


def episode_panel(query_img: Any, gt: Any, pseudo: Any, pred: Any, tile: int = 128, gap: int = 2
                  ) -> np.ndarray:
    """One episode as a row of 4 tiles: query | GT | pseudo-mask | prediction -> uint8 [tile, W, 3] (HWC).

    query_img: RGB uint8 [H, W, 3]; gt / pseudo / pred: label maps (0 bg, k = way k, 255 ignore) of any size
    (resized nearest to the query), or None for a greyed tile (e.g. no pseudo-mask in the full regime; a
    greyed ground-truth tile is labelled "no mask").
    Colours: PALETTE[k - 1] for way k. Suitable for TensorBoard `add_image(..., dataformats="HWC")`.
    """
    img = _as_numpy(query_img).astype(np.uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"episode_panel: query_img must be [H, W, 3] uint8, got {img.shape}")
    tiles = [img] + [colorize(img, None if m is None else _as_numpy(m)) for m in (gt, pseudo, pred)]
    tiles = [_fit_height(t, tile) for t in tiles]
    if gt is None:
        tiles[1] = _label(tiles[1], "no mask")
    sep = np.full((tile, gap, 3), 255, dtype=np.uint8)
    row: list[np.ndarray] = []
    for t in tiles:
        row += [t, sep]
    return np.concatenate(row[:-1], axis=1)


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    """The tile with `text` written in its top-left corner (PIL's built-in font)."""
    im = Image.fromarray(np.ascontiguousarray(tile))
    draw = ImageDraw.Draw(im)
    draw.rectangle((2, 2, 4 + 6 * len(text), 14), fill=(60, 60, 60))
    draw.text((3, 3), text, fill=(255, 255, 255))
    return np.asarray(im)


def tensor_to_image(img: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """A normalised image tensor [3, S, S] -> RGB uint8 [S, S, 3] (undoes the mean/std normalisation)."""
    x = img.detach().float().cpu()
    x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()


def train_panel(batch: Mapping[str, torch.Tensor], out: Any, b: int = 0, tile: int = 128) -> np.ndarray:
    """TensorBoard panel of training episode `b`: query | GT (if the batch has masks) | pseudo | prediction.

    batch: a TrainEpisodeStream batch (query_img [B,3,S,S], optional query_target [B,N,S,S]);
    out: the EpisodeOutput of that batch (cls_logits [B,N,2], mask_logits [B,N,2,S,S], pseudo_query [B,N,S,S]
    or None). Returns uint8 [tile, W, 3].
    """
    img = tensor_to_image(batch["query_img"][b])
    gt = ways_to_labels(batch["query_target"][b]) if "query_target" in batch else None
    pq = getattr(out, "pseudo_query", None)
    pseudo = ways_to_labels(pq[b]) if pq is not None else None
    fg = out.mask_logits[b].detach().float().softmax(1)[:, 1]  # [N, S, S]
    best, arg = fg.max(0)
    pred = torch.where(best >= 0.5, arg + 1, torch.zeros_like(arg)).cpu().numpy().astype(np.uint8)
    return episode_panel(img, gt, pseudo, pred, tile=tile)


@torch.no_grad()
def training_panels(model: Any, batch: Mapping[str, torch.Tensor], regime: str, count: int = 2,
                    tile: int = 128) -> list[np.ndarray]:
    """Panels of the first `count` episodes of a training batch, from a separate no-grad forward of `model`.

    model: FSCSModel (its current head); batch: a TrainEpisodeStream batch on the model's device; regime:
    weak | full | mixed (full uses batch["support_mask"]; mixed uses enhanced pseudo-masks for every support).
    Query pseudo-masks use the batch's image-level presence, as in weak training.
    Returns a list of uint8 [tile, W, 3].
    Log them with `writer.add_image(f"episodes/{i}", img, step, dataformats="HWC")`.
    """
    was_training = model.head.training
    model.head.eval()
    try:
        n = min(count, batch["query_img"].shape[0])
        sub = {k: v[:n] for k, v in batch.items()}
        masks = sub.get("support_mask") if regime == "full" else None
        out = model.forward_episode(sub["query_img"], sub["support_img"], masks, regime=regime,
                                    query_presence=sub["presence"])
        if out.pseudo_query is None:  # full regime: show the attention pseudo-mask it did not use
            out.pseudo_query = model.pseudo_masks(model.encode_episode(sub["query_img"], sub["support_img"]),
                                                  sub["presence"])[1]
        return [train_panel(sub, out, b, tile) for b in range(n)]
    finally:
        model.head.train(was_training)


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- text
def epoch_table(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> str:
    """Fixed-width text table of one dict per row (columns = union of keys, first-seen order).

    Floats print with 4 significant digits; e.g. rows = [{"epoch": 1, "loss": 0.71, "val/miou": 12.3}].
    """
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    line = "-+-".join("-" * w for w in widths)  # '+' under every ' | ' of the rows
    out = [] if title is None else [title]
    out += [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), line]
    out += [" | ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- figures
def _tx(text: object) -> str:
    """Plain text for matplotlib (a '$' in a class or run name must not start mathtext)."""
    return str(text).replace("$", r"\$")


def _color(i: int) -> np.ndarray:
    """Matplotlib RGB (0..1) of series i."""
    return np.array(PALETTE[i % len(PALETTE)]) / 255


def _figure(width: float, height: float, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def figure_png(fig: Any, dpi: int = 90) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def grouped_bars(title: str, groups: Sequence[str], series: Mapping[str, Sequence[tuple[float, list | None]]],
                 metrics: Sequence[str]) -> bytes:
    """One subplot per metric; x = groups, one bar per series.

    series[name][m * len(groups) + g] = (value, ci) of metric m, group g; ci is [lo, hi] (an error bar)
    or None.
    """
    fig, axes = _figure(max(5.0, 1.2 * len(groups) * max(1, len(series)) ** 0.5 + 3), 3.6, len(metrics))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for m, (ax, metric) in enumerate(zip(axes, metrics)):
        for s, (name, vals) in enumerate(series.items()):
            vs = vals[m * len(groups) : (m + 1) * len(groups)]
            heights = [v for v, _ in vs]
            err = np.array([[v - ci[0], ci[1] - v] if ci else [0.0, 0.0] for v, ci in vs]).T
            ax.bar(x + (s - (len(series) - 1) / 2) * width, heights, width, yerr=err, capsize=2,
                   label=_tx(name), color=_color(s))
        ax.set_xticks(x, [_tx(g) for g in groups], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(_tx(title), fontsize=10)
    return figure_png(fig)


def lines_by_fraction(title: str, series: Mapping[str, Sequence[tuple[float, float, float]]],
                      metrics: Sequence[str]) -> bytes:
    """One subplot per metric; x = GT-mask fraction (0 weak .. 1 full).

    series[name] = [(fraction, value of metric 0, value of metric 1), ...].
    """
    fig, axes = _figure(8.0, 3.4, len(metrics))
    for m, (ax, metric) in enumerate(zip(axes, metrics)):
        for s, (name, pts) in enumerate(series.items()):
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1 + m] for p in pts], marker="o", label=_tx(name),
                    color=_color(s))
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(-0.002, 1.2)
        ax.set_xlabel("fraction of training images with GT masks")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(_tx(title), fontsize=10)
    return figure_png(fig)


def class_bars(title: str, classes: Sequence[str], series: Mapping[str, Sequence[float]]) -> bytes:
    """Per-class IoU bars: x = class names, one bar per series (model)."""
    fig, axes = _figure(max(6.0, 0.35 * len(classes) * max(1, len(series)) + 2), 3.6)
    ax = axes[0]
    width = 0.8 / max(1, len(series))
    x = np.arange(len(classes))
    for s, (name, vals) in enumerate(series.items()):
        ax.bar(x + (s - (len(series) - 1) / 2) * width, vals, width, label=_tx(name),
               color=_color(s))
    ax.set_xticks(x, [_tx(c) for c in classes], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(_tx(title), fontsize=10)
    return figure_png(fig)


def reliability_stats(prob: np.ndarray, true: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Equal-width bins of presence probability: mean prob, observed frequency, count per bin, and the ECE."""
    p, t = np.asarray(prob, dtype=np.float64).ravel(), np.asarray(true, dtype=np.float64).ravel()
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    conf = np.bincount(idx, weights=p, minlength=bins) / np.maximum(count, 1)
    freq = np.bincount(idx, weights=t, minlength=bins) / np.maximum(count, 1)
    ece = float(np.sum(count * np.abs(conf - freq)) / max(len(p), 1))
    return {"conf": conf, "freq": freq, "count": count, "ece": ece}


def reliability_plot(title: str, series: Mapping[str, tuple[np.ndarray, np.ndarray]], bins: int = 10
                     ) -> bytes:
    """Reliability diagram of presence probabilities: series[name] = (prob [M], true [M] 0/1)."""
    fig, axes = _figure(4.6, 4.2)
    ax = axes[0]
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect")
    for s, (name, (prob, true)) in enumerate(series.items()):
        st = reliability_stats(prob, true, bins)
        keep = st["count"] > 0
        ax.plot(st["conf"][keep], st["freq"][keep], marker="o",
                label=f"{_tx(name)} (ECE {100 * st['ece']:.1f})", color=_color(s))
    ax.set_xlabel("predicted presence probability")
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(_tx(title), fontsize=10)
    return figure_png(fig)

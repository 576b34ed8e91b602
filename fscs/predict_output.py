"""What `fscs predict` writes: class colours, label maps, overlays, per-query files and the contact sheet."""
from __future__ import annotations

import colorsys
import html
import json
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fscs.atomic import write_atomic_with, write_text_atomic
from fscs.bench.metrics import predict_from_probs
from fscs.model.fscs_model import upsample_logits

_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")
_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def class_colour(i: int) -> tuple[int, int, int]:
    """Display colour of class index i (0-based): a fixed table, then golden-ratio hues."""
    if i < len(_COLOURS):
        return _COLOURS[i]
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def work_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    """(h, w) scaled down so the longer side is at most max_side (0 = keep the size)."""
    scale = 1.0 if max_side <= 0 else min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def label_map(presence: torch.Tensor, logits: torch.Tensor, size: tuple[int, int], threshold: float
              ) -> np.ndarray:
    """presence [C], mask log-probs [C, 2, S, S] -> uint8 [H, W]: class i+1 where its foreground probability
    is the largest, >= 0.5 and the class is decided present (p > threshold); 0 elsewhere."""
    fg = upsample_logits(logits, size).softmax(1)[:, 1]
    fg = fg * (presence > threshold).to(fg.dtype)[:, None, None]
    _, pred = predict_from_probs(presence, fg, threshold, 0.5)
    return pred.to(torch.uint8).numpy()


def overlay_image(image: np.ndarray, labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    base = np.asarray(Image.fromarray(image).resize(labels.shape[::-1], Image.BILINEAR)).astype(np.float32)
    colour = palette[labels].astype(np.float32)
    alpha = np.where(labels > 0, 0.5, 0.0)[..., None]
    return Image.fromarray((base * (1 - alpha) + colour * alpha).round().astype(np.uint8))


def unique_names(paths: Sequence[Path]) -> list[str]:
    """File-system-safe output names per query, unique (case-insensitively) and never a fixed output's name."""
    names, used = [], {"classes", "index", "predictions", "summary"}
    for p in paths:
        base = _NAME_BAD.sub("_", p.stem).strip("_") or "image"
        name, n = base, 1
        while name.lower() in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name.lower())
        names.append(name)
    return names


def write_index_html(out: Path, records: list[dict[str, Any]], classes: list[dict[str, Any]],
          skipped: list[dict[str, str]], meta: dict[str, Any]) -> None:
    """index.html: legend, one card per query (overlay + probabilities), skipped files; names escaped."""
    esc, url = html.escape, urllib.parse.quote
    legend = " ".join(f'<span class="sw" style="background:{c["color"]}"></span>{esc(c["name"])}'
                      for c in classes)
    cards = []
    for r in records:
        items = sorted(r["classes"], key=lambda c: -c["probability"])
        rows = "".join(f'<li class="{"on" if c["present"] else "off"}">{esc(c["name"])} '
                       f'{c["probability"]:.2f}</li>' for c in items)
        cards.append(f'<figure><a href="{url(r["overlay"])}"><img src="{url(r["overlay"])}" loading="lazy" '
                     f'alt="{esc(r["name"])}"></a><figcaption><b title="{esc(r["image"])}">'
                     f'{esc(Path(r["image"]).name)}</b><ul>{rows}</ul></figcaption></figure>')
    bad = "".join(f"<li>{esc(s['image'])}: {esc(s['error'])}</li>" for s in skipped)
    about = (f'run {esc(str(meta["run"]))}, regime {esc(meta["regime"])}, threshold {meta["threshold"]}; '
             "bold = present")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fscs predict</title><style>
body{{font-family:sans-serif;margin:1em}} .grid{{display:flex;flex-wrap:wrap;gap:12px}}
figure{{margin:0;width:240px}} img{{max-width:240px;max-height:240px}} ul{{margin:0;padding-left:1.2em}}
.on{{font-weight:bold}} .off{{color:#888}} .sw{{display:inline-block;width:1em;height:1em;margin:0 4px}}
</style></head><body>
<h1>fscs predict: {len(records)} images</h1>
<p>{about}</p>
<p>{legend}</p>
<div class="grid">{"".join(cards)}</div>
{f"<h2>Skipped ({len(skipped)})</h2><ul>{bad}</ul>" if skipped else ""}
</body></html>
"""
    write_text_atomic(out / "index.html", page)


def write_query(out: Path, name: str, path: Path, image: np.ndarray, presence: torch.Tensor,
                 logits: torch.Tensor, classes: list[dict[str, Any]], palette: np.ndarray, threshold: float,
                 max_side: int, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Write `<name>.mask.png` (original size), `<name>.overlay.png` and `<name>.json`; returns the record.

    presence [C] probabilities, logits [C, 2, S, S] mask log-probs of one query; size: the original (H, W)
    when `image` was read downscaled (default: image's own size).
    """
    h, w = size or image.shape[:2]
    labels = label_map(presence, logits, work_size(h, w, max_side), threshold)
    full = labels
    if labels.shape != (h, w):
        full = np.asarray(Image.fromarray(labels).resize((w, h), Image.NEAREST))
    mask_img = Image.fromarray(full, "P")
    mask_img.putpalette(palette.reshape(-1).tolist())
    write_atomic_with(out / f"{name}.mask.png", lambda fh: mask_img.save(fh, format="PNG"))
    overlay = overlay_image(image, labels, palette)
    write_atomic_with(out / f"{name}.overlay.png", lambda fh: overlay.save(fh, format="PNG"))
    area = np.bincount(labels.reshape(-1), minlength=len(classes) + 1) / labels.size
    per_class = [{"id": c["id"], "name": c["name"], "probability": round(float(presence[i]), 6),
                  "present": bool(presence[i] > threshold), "area": round(float(area[i + 1]), 6)}
                 for i, c in enumerate(classes)]
    rec = {"name": name, "image": str(path), "width": w, "height": h, "threshold": threshold,
           "classes": per_class, "present": [c["name"] for c in per_class if c["present"]],
           "mask": f"{name}.mask.png", "overlay": f"{name}.overlay.png"}
    write_text_atomic(out / f"{name}.json", json.dumps(rec, indent=2))
    return rec

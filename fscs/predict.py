"""`fscs predict`: which support classes are in new images and where (JSON, mask, overlay, contact sheet).

The run; its inputs (support folder, query images) are read in `fscs.predict_inputs`, the model side (feature
cache, Predictor) is `fscs.predict_model`, and the files it writes are made in `fscs.predict_output`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fscs.atomic import make_output_dir, remove_stale_tmp, write_text_atomic
from fscs.data.transforms import to_tensor_image
from fscs.errors import FSCSError
from fscs.predict_inputs import _READ_ERRORS, expand_queries, read_image
from fscs.predict_model import Predictor
from fscs.predict_output import class_colour, unique_names, write_index_html, write_query

logger = logging.getLogger(__name__)


def _previous_outputs(out: Path) -> list[Path]:
    """The per-query files an earlier `fscs predict` into `out` listed in its summary.json (existing ones)."""
    try:
        previous = json.loads((out / "summary.json").read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [out / name for name in previous
            if isinstance(name, str) and Path(name).name == name and (out / name).is_file()]


def _remove_previous_outputs(out: Path) -> None:
    """Remove the per-query files an earlier `fscs predict` into `out` listed in its summary.json, so the
    folder holds one run's predictions (other files there are left alone)."""
    gone = 0
    for path in _previous_outputs(out):
        path.unlink()
        gone += 1
    for table in ("index.html", "predictions.csv"):  # they listed the files just removed
        (out / table).unlink(missing_ok=True)
    if gone:
        logger.info("%s: removed %d files of the previous prediction run", out, gone)


def run_predict(run_dir: str | Path, support: str | Path, queries: Sequence[str], out_dir: str | Path, *,
                batch_size: int = 8, threshold: float = 0.5, device: str = "auto", regime: str = "auto",
                cache_dir: str | Path | None = None, max_side: int = 1024, progress: bool = True
                ) -> dict[str, Any]:
    """Predict every query image into `out_dir`: per query `<name>.json`, `<name>.mask.png` (0 = background,
    i = class i of classes.json), `<name>.overlay.png`; plus classes.json, predictions.csv, summary.json and
    index.html. Unreadable queries are logged and listed as skipped."""
    from fscs.progress import progress_bar

    if not 0.0 <= threshold <= 1.0 or batch_size < 1 or max_side < 0:
        raise FSCSError(f"--threshold {threshold} must be in [0, 1], --batch-size {batch_size} >= 1 and "
                        f"--max-side {max_side} >= 0 (0 = original size)")
    paths = expand_queries(queries)
    ours = {p.resolve() for p in _previous_outputs(Path(out_dir))}  # `--query new/ --out new/pred`, rerun
    if ours and any(p.resolve() in ours for p in paths):
        logger.info("%s: the previous prediction's masks and overlays there are not queries", out_dir)
        paths = [p for p in paths if p.resolve() not in ours]
    if not paths:
        raise FSCSError(f"--query {' '.join(queries)}: no images found; pass image files, folders or quoted "
                        "globs")
    if isinstance(support, (str, Path)) and Path(out_dir).resolve().is_relative_to(Path(support).resolve()):
        raise FSCSError(f"--out {out_dir} is inside --support {support}, whose every sub-folder is a class; "
                        "write the predictions elsewhere")
    t0 = time.time()
    created = [d for d in (Path(out_dir), *Path(out_dir).parents) if not d.exists()]  # innermost first
    out = make_output_dir(out_dir, "--out")  # before the model is loaded and the supports encoded
    try:
        pred = Predictor(run_dir, support, device=device, regime=regime, cache_dir=cache_dir,
                         batch_size=batch_size)
    except BaseException:  # a bad run or support folder: no empty --out left behind
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty (another process wrote there): kept
                break
        raise
    remove_stale_tmp(out)  # files of a killed earlier run
    _remove_previous_outputs(out)
    names = unique_names(paths)
    planned = sorted(f"{n}{ext}" for n in names for ext in (".json", ".mask.png", ".overlay.png"))
    # listed before the first is written: a rerun after an interrupted run removes what it left
    write_text_atomic(out / "summary.json", json.dumps({"complete": False, "queries": len(paths),
                                                        "out": str(out), "files": planned}, indent=2))
    colours = [class_colour(i) for i in range(len(pred.classes))]
    palette = np.array([(0, 0, 0), *colours] + [(0, 0, 0)] * (255 - len(colours)), dtype=np.uint8)
    classes = [{"id": i, "name": sc.name, "color": "#{:02x}{:02x}{:02x}".format(*colours[i - 1]),
                "support": [str(f) for f in sc.files], "support_masks": sum(m is not None for m in sc.masks)}
               for i, sc in enumerate(pred.classes, start=1)]
    meta = {"format": "fscs-predict/1", "run": str(run_dir), "checkpoint_sha256": pred.checkpoint_sha256,
            "backbone": pred.model.backbone.identity, "regime": pred.regime, "threshold": threshold,
            "mask_values": "0 = background, i = classes[i - 1].id", "classes": classes}
    write_text_atomic(out / "classes.json", json.dumps(meta, indent=2))
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    bar = progress_bar(total=len(paths), unit="img", desc="predict", disable=not progress)

    def flush(batch: list[tuple[Path, str, np.ndarray, tuple[int, int]]]) -> None:
        x = torch.stack([to_tensor_image(b[2], pred.size) for b in batch])
        presence, logits = pred.predict_tensors(x)
        for (path, name, image, full), p, lg in zip(batch, presence, logits):
            records.append(write_query(out, name, path, image, p, lg, classes, palette, threshold, max_side,
                                       full))
        bar.update(len(batch))

    read_side = max(max_side, pred.size) if max_side else 0  # images over ~179 MP: read downscaled
    batch: list[tuple[Path, str, np.ndarray, tuple[int, int]]] = []
    for path, name in zip(paths, names):
        try:
            batch.append((path, name, *read_image(path, read_side)))
        except _READ_ERRORS as exn:
            logger.warning("%s: unreadable query image (%s); skipped", path, exn)
            skipped.append({"image": str(path), "error": f"{type(exn).__name__}: {exn}"})
            bar.update(1)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["image", "present"] + [c["name"] for c in classes])
    for r in records:
        probs = [f"{c['probability']:.4f}" for c in r["classes"]]
        writer.writerow([r["image"], ";".join(r["present"]), *probs])
    write_text_atomic(out / "predictions.csv", table.getvalue())
    write_index_html(out, records, classes, skipped, meta)
    summary = {"complete": True, "queries": len(paths), "predicted": len(records), "skipped": skipped,
               "seconds": round(time.time() - t0, 2), "device": str(pred.device), "out": str(out),
               "files": sorted({f for r in records for f in (f"{r['name']}.json", r["mask"], r["overlay"])})}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    logger.info("predicted %d images (%d skipped) in %.1f s -> %s", len(records), len(skipped),
                summary["seconds"], out / "index.html")
    return summary

"""The report's pictures: metric plots per dataset and setting, and the saved episode panels, as PNG bytes."""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fscs.bench import plots
from fscs.bench.report import _order, _settings
from fscs.bench.report_inputs import Result

logger = logging.getLogger(__name__)


@dataclass
class Picture:
    """A PNG shown in the report: a plot or an episode panel."""

    kind: str  # plot | panel
    name: str  # file name under figures/ or panels/
    title: str
    png: bytes
    caption: str = ""


def _slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(p) for p in parts)).strip("_")


def _display(key: tuple[str, str, str, str], keys: Sequence[tuple]) -> str:
    """Legend name of a model: its regime label, plus name / test regime / backbone to tell models apart."""
    name, label, test, backbone = key
    out = label if test == label.split("@")[0] else f"{label}→test {test}"
    if len({k[0] for k in keys}) > 1 and name != label:
        out = f"{name} · {out}"
    if len({k[3] for k in keys}) > 1:
        out += f" · {backbone.split(' ')[0]}"
    return out


def build_plots(results: Sequence[Result], summaries: dict[tuple, dict[str, Any]]
                ) -> dict[str, list[Picture]]:
    """Per dataset: metrics by regime and by GT fraction; per setting: per-class IoU, presence reliability."""
    out: dict[str, list[Picture]] = {}
    for dataset in sorted({r.data["dataset"] for r in results}):
        ds = [r for r in results if r.data["dataset"] == dataset]
        keys = sorted({r.model_key for r in ds}, key=lambda k: _order(k, ds))
        settings = _settings(ds)
        names = [_display(k, keys) for k in keys]
        series: dict[str, list[tuple[float, list | None]]] = {}
        for s in settings:
            vals = []
            for m in ("miou", "er"):
                for k in keys:
                    fm = summaries.get((dataset, s, k))
                    v = fm["metrics"][m] if fm else None
                    if v is None:
                        vals.append((float("nan"), None))
                    elif fm.get("sd"):  # several training seeds: mean ± sd
                        vals.append((v, [v - fm["sd"][m], v + fm["sd"][m]]))
                    else:
                        vals.append((v, (fm["ci95"] or {}).get(m)))
            series[s] = vals
        png = plots.grouped_bars(f"{dataset}: mean over folds, 95 % CI", names, series, ("mIoU", "ER"))
        several = any(fm.get("sd") for (d, _, _), fm in summaries.items() if d == dataset)
        pics = [Picture("plot", f"{_slug(dataset, 'by-regime')}.png", f"{dataset}: mIoU and ER by regime",
                        png, "bars: mean over the folds present; error bars: fold-bootstrap 95 % CI"
                        + ("; for a model trained with several seeds, mean over the seeds ± their sd" if several
                           else ""))]
        lines: dict[str, list[tuple[float, float, float]]] = {}
        for k in keys:
            frac = next(r.gt_fraction for r in ds if r.model_key == k)
            if frac is None or k[2] != k[1].split("@")[0]:
                continue
            for s in settings:
                fm = summaries.get((dataset, s, k))
                if fm:
                    name = s if len({kk[3] for kk in keys}) == 1 else f"{s} · {k[3].split(' ')[0]}"
                    miou = fm["metrics"]["miou"]
                    lines.setdefault(name, []).append((frac, float("nan") if miou is None else miou,
                                                       fm["metrics"]["er"]))
        png = plots.lines_by_fraction(f"{dataset}: by share of GT-masked training images", lines,
                                      ("mIoU", "ER"))
        pics.append(Picture("plot", f"{_slug(dataset, 'by-gt-fraction')}.png",
                            f"{dataset}: mIoU and ER by GT fraction", png,
                            "x: 0 = weak (image-level labels only), 1 = full; models tested in their own "
                            "regime"))
        for s in settings:
            rs = [r for r in ds if r.setting == s]
            class_names: dict[int, str] = {}
            for r in rs:
                class_names.update({int(c): str(n) for c, n in (r.data.get("class_names") or {}).items()})
            for r in rs:
                for c in r.data["metrics"]["per_class_iou"] or {}:  # None: no query had a mask
                    class_names.setdefault(int(c), str(c))
            ids = sorted(class_names)
            bars = {}
            for k, nm in zip(keys, names):
                per: dict[int, list[float]] = {}  # a class's IoU from each training seed of its fold
                for r in rs:
                    if r.model_key == k:
                        for c, v in (r.data["metrics"]["per_class_iou"] or {}).items():
                            per.setdefault(int(c), []).append(v)
                if per:
                    bars[nm] = [float(np.mean(per[c])) if c in per else float("nan") for c in ids]
            if bars:  # no per-class plot when no result of this setting had a query mask
                png = plots.class_bars(f"{dataset} {s}: per-class IoU", [class_names[c] for c in ids], bars)
                pics.append(Picture("plot", f"{_slug(dataset, s, 'per-class')}.png",
                                    f"{dataset} {s}: per-class IoU", png,
                                    "each class is a test class of one fold; IoU from that fold's result "
                                    "(episodes whose query has a mask; the mean over training seeds for a "
                                    "model trained with several)"))
            rel = {}
            for k, nm in zip(keys, names):
                arrs = [r.presence() for r in rs if r.model_key == k]
                arrs = [a for a in arrs if a is not None]
                if arrs:
                    rel[nm] = (np.concatenate([a[0] for a in arrs]), np.concatenate([a[1] for a in arrs]))
            pics.append(Picture("plot", f"{_slug(dataset, s, 'reliability')}.png",
                                f"{dataset} {s}: reliability of presence probabilities",
                                plots.reliability_plot(f"{dataset} {s}: presence reliability", rel),
                                "10 equal-width bins over all ways of all episodes (folds and training "
                                "seeds pooled); ECE in "
                                "the legend"))
        out[dataset] = pics
    return out


_PANEL_KEYS = frozenset({"file", "classes", "present", "pred_present", "index", "kind", "query"})
"""What the bench writes for each saved episode panel (results_io.write_result)."""


def build_panels(results: Sequence[Result]) -> dict[tuple[str, str], list[Picture]]:
    """Per (dataset, setting): each model's saved episode panels of its lowest fold (first + worst)."""
    out: dict[tuple[str, str], list[Picture]] = {}
    done: set[tuple] = set()
    order = sorted(results, key=lambda r: (r.data["dataset"], r.setting, _order(r.model_key, results),
                                           r.data["fold"]))
    for r in order:
        pics = out.setdefault((r.data["dataset"], r.setting), [])
        if (r.data["dataset"], r.setting, r.model_key) in done or not r.data.get("panels"):
            continue  # this model already has panels from a lower fold
        done.add((r.data["dataset"], r.setting, r.model_key))
        names = {int(c): str(n) for c, n in (r.data.get("class_names") or {}).items()}
        for p in r.data.get("panels") or []:
            if not isinstance(p, dict) or not _PANEL_KEYS <= p.keys():
                logger.warning("a panel entry of %s lacks %s; skipped", r.path, sorted(_PANEL_KEYS))
                continue
            f = r.path.parent / str(p["file"])
            if f.suffix != ".png" or not f.resolve().is_relative_to(r.path.parent.resolve()):
                # a result from elsewhere must not embed an arbitrary file into a report that gets shared
                logger.warning("panel %s of %s is not a PNG beside its result; skipped", p["file"], r.path)
                continue
            if not f.is_file():
                logger.warning("panel %s of %s is missing; skipped", f, r.path)
                continue
            ways = "; ".join(f"{names.get(c, c)}: {'present' if t else 'absent'}, predicted "
                             f"{'present' if q else 'absent'}"
                             for c, t, q in zip(p["classes"], p["present"], p["pred_present"]))
            test = "" if r.data["regime"] == r.label.split("@")[0] else f", test {r.data['regime']}"
            who = r.label if r.model == r.label else f"{r.model} ({r.label})"
            title = f"{who}{test} · fold {r.data['fold']}"
            iou = "no query mask" if p.get("iou") is None else f"IoU {p['iou']:.1f}"
            caption = (f"episode {p['index']} ({p['kind']}), {iou}, query {p['query']}; "
                       f"ways: {ways}")
            name = _slug(r.data["dataset"], r.setting, r.path.stem, p["file"])
            pics.append(Picture("panel", name, title, f.read_bytes(), caption))
    return out

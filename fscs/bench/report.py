"""`fscs report`: results -> LEADERBOARD.md + a self-contained index.html (tables with CIs, plots, panels)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fscs.atomic import make_output_dir, write_bytes_atomic, write_text_atomic
from fscs.bench.metrics import FSCSMetric, bootstrap_replicates
from fscs.bench.report_inputs import Result, check_comparable, collect_results
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

METRICS = ("er", "miou", "fbiou")
METRIC_NAMES = {"er": "ER", "miou": "mIoU", "fbiou": "FB-IoU"}
# Published 4-fold means (ER, mIoU) of Kang et al., CVPR 2023 (shared/reference/cst.md, "Published numbers").
PUBLISHED: tuple[tuple[str, str, tuple[tuple[str, str, float, float], ...]], ...] = (
    ("CST", "weak", (("pascal", "1w1s", 79.9, 33.2), ("pascal", "2w1s", 64.6, 31.9),
                     ("coco", "1w1s", 78.2, 19.6), ("coco", "2w1s", 62.4, 18.3))),
    ("CST", "full", (("pascal", "1w1s", 85.7, 55.5), ("pascal", "2w1s", 70.4, 53.7),
                     ("coco", "1w1s", 80.8, 38.3), ("coco", "2w1s", 64.0, 36.2))),
    ("ASNet (iFSL)", "full", (("pascal", "1w1s", 84.9, 52.3), ("pascal", "2w1s", 68.3, 47.8),
                              ("coco", "1w1s", 78.6, 35.8), ("coco", "2w1s", 63.1, 31.6))),
    ("HSNet", "full", (("pascal", "1w1s", 83.7, 49.7), ("pascal", "2w1s", 67.3, 43.5),
                       ("coco", "1w1s", 77.0, 34.3), ("coco", "2w1s", 62.5, 29.5))),
    ("PANet", "full", (("pascal", "1w1s", 69.0, 36.2), ("pascal", "2w1s", 50.9, 37.2),
                       ("coco", "1w1s", 66.7, 25.2), ("coco", "2w1s", 48.5, 23.6))),
)
PUBLISHED_SOURCE = ("Kang et al., CVPR 2023 (4-fold mean, 1,000 episodes per fold, boundary pixels counted "
                    "as background)")
MEAN_CI_METHOD = ("percentile bootstrap over the per-fold episode sets: each of B replicates resamples every "
                  "fold's episodes with replacement, recomputes each fold's ER / mIoU / FB-IoU from the "
                  "resampled sums and averages over the folds (folds and their classes are held fixed: the "
                  "interval covers episode-sampling noise only); shown only when every fold's per-episode "
                  "records are available")
UNSEEN_MARK = "†"
"""After an mIoU that counts fold classes with no pixel in the episodes as IoU 0 (explained in the note)."""
NO_MASK = "n/a"
"""Cell of a segmentation metric that could not be measured (no test query had a mask)."""


# ----------------------------------------------------------------------------------------------- statistics
def segmentation_episodes(result: Result) -> int:
    """Episodes of a result whose query had a mask (results without the field: every episode)."""
    d = result.data
    return int(d.get("segmentation_episodes", d["metrics"]["episodes"]))


def fold_mean(results: Sequence[Result], bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean over folds of each metric and, when all records exist, its fold-bootstrap 95 % CI.

    results: one model's results of one (dataset, setting), one per fold. A metric missing in any fold
    (mIoU / FB-IoU without query masks) is None in the mean, and so is its CI.
    """
    mean = {m: None if any(r.data["metrics"].get(m) is None for r in results)
            else float(np.mean([r.data["metrics"][m] for r in results])) for m in METRICS}
    recs = [r.records() for r in results]
    ci = None
    if bootstrap and all(x is not None and len(x) for x in recs):
        reps: dict[str, np.ndarray | None] = {m: np.zeros(bootstrap) for m in METRICS}
        for r, rec in zip(results, recs):
            rng = np.random.default_rng([seed, int(r.data["fold"])])
            for m, v in bootstrap_replicates(rec, bootstrap, rng).items():
                reps[m] = None if v is None or reps[m] is None else reps[m] + v / len(results)
        ci = {m: None if v is None else [float(x) for x in np.percentile(v, [2.5, 97.5])]
              for m, v in reps.items()}
    no_ci = None if ci else "--bootstrap 0" if not bootstrap else "records missing"
    return {"metrics": mean, "ci95": ci, "no_ci": no_ci, "folds": sorted(int(r.data["fold"]) for r in results),
            "episodes": sum(int(r.data["metrics"]["episodes"]) for r in results),
            "segmentation_episodes": sum(segmentation_episodes(r) for r in results)}


def seed_mean(results: Sequence[Result]) -> dict[str, Any]:
    """Mean and sample sd over training seeds of each seed's mean over folds.

    results: one model's results of one (dataset, setting), one per (fold, training seed); every seed must
    cover the same folds (else a one-line FSCSError). The sd is the spread between training runs, which an
    episode bootstrap does not see; no CI is given.
    """
    by_seed: dict[int | None, list[Result]] = {}
    for r in results:
        by_seed.setdefault(r.train_seed, []).append(r)
    order = sorted(by_seed, key=str)
    folds = {seed: sorted(int(r.data["fold"]) for r in by_seed[seed]) for seed in order}
    if len({tuple(f) for f in folds.values()}) > 1:
        cover = "; ".join(f"seed {seed}: folds {f}" for seed, f in folds.items())
        raise FSCSError(f"model '{results[0].model}' {results[0].setting}: its training seeds cover different folds "
                        f"({cover}); a mean over seeds needs every seed on the same folds: evaluate the missing "
                        "folds or report those runs separately")
    per_seed = [fold_mean(by_seed[seed], bootstrap=0) for seed in order]
    mean: dict[str, float | None] = {}
    sd: dict[str, float | None] = {}
    for m in METRICS:
        vals = [p["metrics"][m] for p in per_seed]
        mean[m] = None if any(v is None for v in vals) else float(np.mean(vals))
        sd[m] = None if mean[m] is None else float(np.std(vals, ddof=1))
    return {"metrics": mean, "sd": sd, "ci95": None, "no_ci": f"± sd over {len(by_seed)} training seeds",
            "folds": folds[order[0]],
            "episodes": sum(int(r.data["metrics"]["episodes"]) for r in results),
            "segmentation_episodes": sum(segmentation_episodes(r) for r in results)}


# ----------------------------------------------------------------------------------------------- layout
@dataclass
class Row:
    kind: str  # fold | mean | published
    cells: dict[str, str]
    title: str = ""


@dataclass
class Table:
    dataset: str
    setting: str
    note: str
    rows: list[Row]


def _cell(metrics: dict, ci: dict | None, m: str, mark: str = "", sd: dict | None = None) -> str:
    """'v[mark] [lo, hi]' with a CI, 'v[mark] ± sd' with an sd over training seeds, NO_MASK when unmeasured."""
    v = metrics.get(m)
    if v is None:
        return NO_MASK
    if sd is not None:
        return f"{v:.1f}{mark} ± {sd[m]:.1f}"
    lo_hi = (ci or {}).get(m)
    return f"{v:.1f}{mark}" + (f" [{lo_hi[0]:.1f}, {lo_hi[1]:.1f}]" if lo_hi else "")


def classes_without_pixels(result: Result) -> list[str]:
    """Names of the fold classes with no pixel (zero summed union) in a result's episodes: each counts as IoU 0
    in its mIoU. From metrics.classes_without_pixels, or for older results from the records when available."""
    d = result.data
    names = {str(c): str(n) for c, n in (d.get("class_names") or {}).items()}
    ids = d["metrics"].get("classes_without_pixels")
    if ids is None and d["metrics"].get("miou") is not None and names:
        rec = result.records()
        classes = sorted(int(c) for c in names)
        if rec is not None and rec.shape[1] == 6 + 2 * len(classes):
            ids = FSCSMetric.from_records(classes, rec).compute()["classes_without_pixels"]
    return [names.get(str(c), str(c)) for c in ids or []]


def _episodes_cell(episodes: int, with_masks: int) -> str:
    """Episode count, plus how many had a query mask (the mIoU / FB-IoU episodes) when not all did."""
    return str(episodes) if with_masks == episodes else f"{episodes} ({with_masks} with query masks)"


def _settings(results: Iterable[Result]) -> list[str]:
    """Distinct settings, 1-shot before 5-shot, then by way."""
    def key(s: str) -> tuple[int, int]:
        way, shot = s.rstrip("s").split("w")
        return int(shot), int(way)

    return sorted({r.setting for r in results}, key=key)


PUBLISHED_DATASETS = {"pascal-5i": "pascal", "coco-20i": "coco"}
"""Dataset names (index.json) of the converters of the standard benchmarks -> family of PUBLISHED."""


def _family(dataset: str) -> str | None:
    """'pascal' / 'coco' for the standard PASCAL-5i / COCO-20i shards only: a folder dataset whose name
    happens to contain 'pascal' has other images, classes and folds than the published numbers."""
    return PUBLISHED_DATASETS.get(dataset)


def _order(key: tuple[str, str, str, str], results: Sequence[Result]) -> tuple:
    frac = next((r.gt_fraction for r in results if r.model_key == key), None)
    return (-1.0 if frac is None else frac, key)


def summarize(results: Sequence[Result], bootstrap: int = 1000, seed: int = 0) -> dict[tuple, dict[str, Any]]:
    """{(dataset, setting, model_key): that model's summary} (one entry per model): fold_mean of its per-fold
    results, or seed_mean when it was trained with several seeds."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.data["dataset"], r.setting, r.model_key), []).append(r)
    return {k: seed_mean(g) if len({r.train_seed for r in g}) > 1
            else fold_mean(sorted(g, key=lambda r: r.data["fold"]), bootstrap, seed) for k, g in groups.items()}


def build_tables(results: Sequence[Result], summaries: dict[tuple, dict[str, Any]]) -> list[Table]:
    """One table per (dataset, setting): per-fold rows and a fold-mean row per model, then published rows."""
    tables = []
    for dataset in sorted({r.data["dataset"] for r in results}):
        ds = [r for r in results if r.data["dataset"] == dataset]
        for setting in _settings(ds):
            rs = [r for r in ds if r.setting == setting]
            rows: list[Row] = []
            unseen: list[str] = []
            several_seeds = False  # some model of the table was trained with several seeds
            for key in sorted({r.model_key for r in rs}, key=lambda k: _order(k, rs)):
                group = sorted((r for r in rs if r.model_key == key),
                               key=lambda r: (r.data["fold"], str(r.train_seed)))
                seeds = len({r.train_seed for r in group})
                several_seeds |= seeds > 1
                base = {"model": key[0], "train": key[1], "test": key[2], "backbone": key[3]}
                marked = False
                for r in group:
                    d = r.data
                    empty = classes_without_pixels(r)
                    if empty:
                        marked = True
                        unseen.append(f"{key[0]} fold {d['fold']}: {', '.join(empty)}")
                    rows.append(Row("fold", {**base, "fold": str(d["fold"]) + (f" · seed {r.train_seed}"
                                                                                if seeds > 1 else ""),
                                             **{m: _cell(d["metrics"], d.get("ci95"), m,
                                                         UNSEEN_MARK if empty and m == "miou" else "")
                                                for m in METRICS},
                                             "episodes": _episodes_cell(int(d["metrics"]["episodes"]),
                                                                        segmentation_episodes(r)),
                                             "manifest": d["manifest_hash"][:12]}, title=str(r.path)))
                if len(group) > 1:
                    fm = summaries[(dataset, setting, key)]
                    if seeds > 1:
                        folds = len(fm["folds"])
                        label = f"mean ± sd of {seeds} seeds" + (f" × {folds} folds" if folds > 1 else "")
                    else:
                        label = f"mean of {len(group)}" + ("" if fm["ci95"] else f" (no CI: {fm['no_ci']})")
                    rows.append(Row("mean", {**base, "fold": label,
                                             **{m: _cell(fm["metrics"], fm["ci95"], m,
                                                         UNSEEN_MARK if marked and m == "miou" else "",
                                                         fm.get("sd"))
                                                for m in METRICS},
                                             "episodes": _episodes_cell(fm["episodes"],
                                                                        fm["segmentation_episodes"]),
                                             "manifest": "—"}))
            ib = rs[0].data.get("ignore_boundary", True)
            if rs[0].data.get("role", "test") == "test":  # published numbers are test-fold numbers
                rows += _published_rows(dataset, setting, boundary_ignored=ib)
            seeds = sorted({int(r.data["seed"]) for r in rs})
            note = (f"{len(rs)} results; episode seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
                    f"role {rs[0].data.get('role', 'test')}; "
                    f"boundary pixels {'ignored' if ib else 'counted as background (reference code)'}")
            if several_seeds:
                note += ("; ± is the sample sd over training seeds of each seed's mean over folds (the spread "
                         "between training runs, not an interval)")
            if any(segmentation_episodes(r) < int(r.data["metrics"]["episodes"]) for r in rs):
                note += ("; ER over all episodes, mIoU / FB-IoU over the episodes whose query has a mask "
                         f"({NO_MASK}: none had one)")
            if unseen:
                note += (f"; {UNSEEN_MARK} mIoU counts fold classes without any pixel (truth or prediction) in "
                         f"the episodes as IoU 0, as the protocol's I / max(U, 1) does: evaluate more episodes "
                         f"({'; '.join(unseen)})")
            tables.append(Table(dataset, setting, note, rows))
    return tables


def _published_rows(dataset: str, setting: str, boundary_ignored: bool = False) -> list[Row]:
    """The published baselines of a PASCAL/COCO setting, marked as published (and, beside results that
    ignore boundary pixels, as counting them as background: the published code did)."""
    rows = []
    for name, regime, entries in PUBLISHED:
        for family, s, er, miou in entries:
            if family == _family(dataset) and s == setting:
                tag = "published, boundary pixels as background" if boundary_ignored else "published"
                cells = {"model": f"{name} ({tag})", "train": regime, "test": regime,
                         "backbone": "ViT-S/8 (DINO)" if name == "CST" else "as published",
                         "fold": "4-fold mean", "er": f"{er:.1f}", "miou": f"{miou:.1f}", "fbiou": "—",
                         "episodes": "1000 / fold", "manifest": "—"}
                rows.append(Row("published", cells, title=PUBLISHED_SOURCE))
    return rows


def write_report(result_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                 title: str = "fscs leaderboard", bootstrap: int = 1000, seed: int = 0) -> Path:
    """Collect results, refuse incomparable ones, write OUT/LEADERBOARD.md, OUT/index.html (self-contained),
    OUT/figures/*.png and OUT/panels/*.png; returns the path of index.html."""
    from fscs.bench.figures import build_panels, build_plots  # both import this module (tables, ordering)
    from fscs.bench.render import render_html, render_markdown

    if bootstrap < 0:
        raise FSCSError(f"--bootstrap {bootstrap}: the number of resamples must be >= 0 (0 = no fold-mean CI)")
    results = collect_results(result_paths)
    check_comparable(results)
    out = make_output_dir(out_dir, "--out")
    summaries = summarize(results, bootstrap, seed)
    tables = build_tables(results, summaries)
    plot_pics = build_plots(results, summaries)
    panel_pics = build_panels(results)
    for sub, pics in (("figures", [p for ps in plot_pics.values() for p in ps]),
                      ("panels", [p for ps in panel_pics.values() for p in ps])):
        for pic in pics:
            write_bytes_atomic(out / sub / pic.name, pic.png)
    write_text_atomic(out / "LEADERBOARD.md", render_markdown(title, tables, plot_pics, panel_pics))
    page = out / "index.html"
    write_text_atomic(page, render_html(title, tables, plot_pics, panel_pics, results))
    logger.info("report of %d results: %s (+ LEADERBOARD.md)", len(results), page)
    return page

"""`fscs report`'s inputs: result JSONs found, checked field by field, and refused when not comparable."""
from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fscs.bench.metrics import FSCSMetric
from fscs.errors import FSCSError


@dataclass
class Result:
    """One result JSON (fscs-result/1) and where it lies."""

    path: Path
    data: dict[str, Any]
    _records: np.ndarray | None = field(default=None, repr=False)

    @property
    def setting(self) -> str:
        return f"{self.data['way']}w{self.data['shot']}s"

    @property
    def label(self) -> str:
        return str(self.data.get("train_regime") or self.data.get("regime"))

    @property
    def gt_fraction(self) -> float | None:
        from fscs.bench.runs import label_gt_fraction

        return label_gt_fraction(self.label)

    @property
    def backbone(self) -> str:
        bb = self.data.get("backbone") or {}
        sha = str(bb.get("weights_sha256", "?"))
        weights = sha if sha.startswith("random") else sha[:10]
        return f"{bb.get('name', '?')} ({weights}, {bb.get('image_size', '?')} px)"

    @property
    def train_seed(self) -> int | None:
        """train.seed of the run that made the result (its recorded train_config); None when not recorded."""
        seed = ((self.data.get("train_config") or {}).get("train") or {}).get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def model(self) -> str:
        """Run name without a trailing fold marker (runs weak_f0..weak_f3, weak-fold0.., weakfold0.. form one
        model; a bare 'f' needs a separator: run 'half0' stays 'half0'), then without a trailing training-seed
        marker `_s<k>`, `-s<k>`, `_seed<k>` or `-seed<k>` (before or after the fold marker) where k is the recorded
        train.seed (runs weak_s0..weak_s5 are six training seeds of one model; 'vit_s8' trained with another seed
        keeps its name)."""
        name = str(self.data.get("run") or self.path.stem)

        def without_seed(n: str) -> str:
            return n if self.train_seed is None else re.sub(rf"[_-](?:seed|s){self.train_seed}$", "", n) or n

        name = re.sub(rf"(?:[_-](?:fold|f)|fold){self.data['fold']}$", "", without_seed(name)) or name
        return without_seed(name)

    @property
    def model_key(self) -> tuple[str, str, str, str]:
        return (self.model, self.label, str(self.data["regime"]), self.backbone)

    def records(self) -> np.ndarray | None:
        """Per-episode metric records [E, 6 + 2C] (None when the side file is missing).

        FSCSError when the file is unreadable or does not reproduce this result's metrics (e.g. a stale file of
        another run at the same name): a CI from it would be about other episodes.
        """
        if self._records is None:
            ref = (self.data.get("records") or {}).get("file")
            path = self.path.parent / ref if ref else None
            if path is None or not path.is_file():
                return None
            try:
                with np.load(path) as npz:
                    arr = np.asarray(npz["records"])
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise FSCSError(f"records file '{path}' of '{self.path}' is unreadable ({type(exc).__name__}); "
                                "rerun the bench (or delete it: the fold mean is then shown without a CI)"
                                ) from None
            self._records = self._check_records(path, arr)
        return self._records

    def _check_records(self, path: Path, arr: np.ndarray) -> np.ndarray:
        """arr [E, 6 + 2C] when it holds this result's episodes and reproduces its metrics, else FSCSError."""
        metrics = self.data["metrics"]
        e = int(metrics["episodes"])
        why = ""
        if arr.ndim != 2 or arr.shape[0] != e or arr.shape[1] < 8 or arr.shape[1] % 2:
            why = f"shape {list(arr.shape)}, expected [{e}, 6 + 2 x classes]"
        else:
            try:
                again = FSCSMetric.from_records(range(1, (arr.shape[1] - 6) // 2 + 1), arr).compute()
            except FSCSError as exc:
                why = str(exc)
            else:
                for m in ("er", "miou", "fbiou"):
                    a, b = again[m], metrics.get(m)
                    if (a is None) != (b is None) or (a is not None and abs(a - b) > 1e-6):
                        why = f"{m} {a} from the records, {b} in the result"
                        break
        if why:
            raise FSCSError(f"records file '{path}' does not match '{self.path}' ({why}); it belongs to another "
                            "evaluation: rerun the bench (or delete it: the fold mean is then shown without a CI)")
        return arr

    def presence(self) -> tuple[np.ndarray, np.ndarray] | None:
        p = self.data.get("presence")
        if not p or not p.get("prob"):
            return None
        return np.asarray(p["prob"], dtype=np.float64), np.asarray(p["true"], dtype=np.float64)


# ----------------------------------------------------------------------------------------------- loading
def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FSCSError(f"result file '{path}' is unreadable ({type(exc).__name__}); delete it or rerun the "
                        "bench") from None


RESULT_FIELDS = ("dataset", "fold", "way", "shot", "regime", "seed", "manifest_hash", "metrics")


def _check_fields(path: Path, data: dict[str, Any]) -> None:
    """A result JSON has what the report reads: one-line error naming the file and the first missing key."""
    missing = [k for k in RESULT_FIELDS if k not in data]
    if not missing and not isinstance(data["metrics"], dict):
        missing = ["metrics (an object)"]
    if not missing and "episodes" not in data["metrics"]:
        missing = ["metrics.episodes"]
    if not missing and "per_class_iou" not in data["metrics"]:
        missing = ["metrics.per_class_iou"]
    if missing:
        raise FSCSError(f"result file '{path}' has no '{missing[0]}'; it is not a complete fscs bench result: "
                        "rerun the bench or leave the file out")
    bad = _bad_value(data)
    if bad:
        raise FSCSError(f"result file '{path}' has {bad[0]} = {bad[1]!r}, {bad[2]}; rerun the bench or leave the "
                        "file out")


def _is_int(x: Any, least: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= least


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


def _bad_value(data: dict[str, Any]) -> tuple[str, Any, str] | None:
    """(key, value, what it must be) of the first value the report cannot show honestly (a NaN, a string
    number, 0 episodes), else None."""
    m = data["metrics"]
    checks: list[tuple[str, Any, bool, str]] = [
        ("fold", data["fold"], _is_int(data["fold"], 0), "must be an integer >= 0"),
        ("way", data["way"], _is_int(data["way"], 1), "must be an integer >= 1"),
        ("shot", data["shot"], _is_int(data["shot"], 1), "must be an integer >= 1"),
        ("seed", data["seed"], _is_int(data["seed"], 0), "must be an integer >= 0"),
        ("manifest_hash", data["manifest_hash"], isinstance(data["manifest_hash"], str), "must be a string"),
        ("metrics.episodes", m["episodes"], _is_int(m["episodes"], 1),
         "must be an integer >= 1 (a result of no episodes has no metric)"),
        ("metrics.er", m.get("er"), _is_num(m.get("er")), "must be a finite number"),
    ]
    checks += [(f"metrics.{k}", m.get(k), m.get(k) is None or _is_num(m.get(k)),
                "must be a finite number, or null when no query had a mask") for k in ("miou", "fbiou")]
    pc = m["per_class_iou"]
    checks.append(("metrics.per_class_iou", pc, pc is None or (isinstance(pc, dict) and all(
        _is_num(v) for v in pc.values())), "must map class ids to finite numbers, or be null"))
    if "classes_without_pixels" in m:
        cw = m["classes_without_pixels"]
        checks.append(("metrics.classes_without_pixels", cw, isinstance(cw, list), "must be a list of class ids"))
    if "segmentation_episodes" in data:
        se = data["segmentation_episodes"]
        checks.append(("segmentation_episodes", se, _is_int(se, 0) and _is_int(m["episodes"], 1)
                       and se <= m["episodes"], "must be an integer in 0..metrics.episodes"))
    names = data.get("class_names")
    checks.append(("class_names", names, names is None or isinstance(names, dict), "must be an object or null"))
    ci = data.get("ci95")
    checks.append(("ci95", ci, ci is None or isinstance(ci, dict), "must be an object or null"))
    for k, v in (ci.items() if isinstance(ci, dict) else ()):
        ok = v is None or (isinstance(v, list) and len(v) == 2 and all(_is_num(x) for x in v) and v[0] <= v[1])
        checks.append((f"ci95.{k}", v, ok, "must be [lo, hi] of finite numbers, or null"))
    return next(((k, v, what) for k, v, ok, what in checks if not ok), None)


def collect_results(paths: Iterable[str | os.PathLike]) -> list[Result]:
    """Result JSONs from files, suite indexes (OUT/suite-*.json) and directories.

    A directory contributes the results listed by its suite-*.json indexes when it has any (a rerun's stale
    cache entries are then left out), else every fscs-result JSON below it.
    """
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            indexes = sorted(p.glob("suite-*.json"))
            files += indexes or sorted(q for q in p.rglob("*.json") if q.parent.name != "manifests")
        elif p.is_file():
            files.append(p)
        else:
            raise FSCSError(f"'{p}' does not exist; pass result JSON files, suite-*.json indexes or bench "
                            "output directories")
    seen: dict[Path, Result] = {}
    for f in files:
        data = _read(f)
        if not isinstance(data, dict):
            continue  # some other JSON file in a results folder
        if data.get("format") == "fscs-suite-index/1":
            if not isinstance(data.get("results"), list):
                raise FSCSError(f"suite index '{f}' has no 'results' list; rerun the bench")
            for rel in data["results"]:
                q = (f.parent / rel).resolve()
                if not q.is_file():
                    raise FSCSError(f"suite index '{f}' lists '{rel}', which is missing; rerun the bench")
                data_q = _read(q)
                _check_fields(q, data_q)
                seen.setdefault(q, Result(q, data_q))
        elif str(data.get("format", "")).startswith("fscs-result/"):
            _check_fields(f, data)
            seen.setdefault(f.resolve(), Result(f.resolve(), data))
    if not seen:
        raise FSCSError(f"no fscs results found in {', '.join(map(str, paths))}; run `fscs bench` first")
    return list(seen.values())


def check_comparable(results: Sequence[Result]) -> None:
    """Refuse results of one (dataset, role, fold, setting) made on different manifests, results of one
    (dataset, role, setting) table with different boundary rules, two results of the same model and training
    seed in one cell, and test and select results of one dataset (a model's fold mean and the dataset's plots
    would pool validation episodes with test episodes)."""
    cells: dict[tuple, Result] = {}
    roles: dict[str, Result] = {}
    tables: dict[tuple, Result] = {}
    models: dict[tuple, Result] = {}
    heads: dict[tuple, Result] = {}
    for r in results:
        d = r.data
        cell = (d["dataset"], d.get("role", "test"), d["fold"], r.setting)
        same_ds = roles.setdefault(d["dataset"], r)
        if same_ds.data.get("role", "test") != cell[1]:
            raise FSCSError(f"results for {cell[0]} mix role {same_ds.data.get('role', 'test')} and role {cell[1]} "
                            f"episodes: '{same_ds.path}' vs '{r.path}'; validation (select) and test results "
                            "are not averaged together: report them separately")
        sha = d.get("checkpoint_sha256")
        if sha:  # a fold mean needs one head per fold, each trained without its test fold's classes
            same = heads.setdefault((d["dataset"], d.get("role", "test"), r.setting, r.model_key, sha), r)
            if same.data["fold"] != d["fold"]:
                raise FSCSError(f"'{same.path}' (fold {same.data['fold']}) and '{r.path}' (fold {d['fold']}) "
                                f"evaluate one checkpoint ({sha[:12]}): a head has one test fold, the others' "
                                "classes were its training classes; train one run per data.fold")
        first = cells.setdefault(cell, r)
        if first.data["manifest_hash"] != d["manifest_hash"]:
            raise FSCSError(
                f"results made on different episode manifests for {cell[0]} fold {cell[2]} {cell[3]}: "
                f"'{first.path}' ({first.data['manifest_hash'][:12]}) vs '{r.path}' "
                f"({d['manifest_hash'][:12]}); "
                "rerun them with one suite (fscs bench --suite) or report them separately")
        ours, theirs = first.data.get("data_sha256"), d.get("data_sha256")
        if ours and theirs and ours != theirs:
            raise FSCSError(f"results for {cell[0]} fold {cell[2]} {cell[3]} share the episode manifest but read "
                            f"other images, masks or labels (data_sha256 {ours[:12]} vs {theirs[:12]}): "
                            f"'{first.path}' vs '{r.path}'; rerun both on the same shards")
        table = tables.setdefault((cell[0], cell[1], cell[3]), r)  # one boundary rule per table
        if table.data.get("ignore_boundary") != d.get("ignore_boundary"):
            raise FSCSError(f"results for {cell[0]} {cell[3]} use different boundary rules (ignore_boundary): "
                            f"'{table.path}' (fold {table.data['fold']}) vs '{r.path}' (fold {cell[2]}); a fold "
                            "mean or a table cannot mix them: report them separately")
        other = models.setdefault(cell + r.model_key + (r.train_seed,), r)
        if other is not r:
            seed = "" if r.train_seed is None else f" trained with seed {r.train_seed}"
            raise FSCSError(f"two results of model '{r.model}' ({r.label}, test {d['regime']}){seed} for "
                            f"{cell[0]} fold {cell[2]} {cell[3]}: '{other.path}' and '{r.path}'; pass one (e.g. "
                            "the suite index)")

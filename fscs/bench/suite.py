"""Benchmark suites: a typed YAML loader and `bench --suite`, which evaluates many runs on frozen manifests
with shared backbone passes and a result cache keyed by (checkpoint, manifest, regime, boundary rule)."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING

from fscs.atomic import make_output_dir, remove_stale_tmp
from fscs.bench.metrics import FSCSMetric, format_metrics
from fscs.bench.results_io import write_json_atomic, write_result
from fscs.bench.runner import EvalJob, check_settings, evaluate_jobs
from fscs.bench.runs import LoadedRun, label_gt_fraction, load_run, regime_label, run_metadata
from fscs.config import load_structured, parse_setting
from fscs.data.episodes import EpisodeSampler, build_manifest, manifest_hash
from fscs.data.shard_check import shards_fingerprint
from fscs.data.shards import EncodedSample, read_index
from fscs.distributed import DistEnv, all_gather_objects
from fscs.errors import FSCSError
from fscs.runtime import resolve_device

logger = logging.getLogger(__name__)

SUITE_INDEX_FORMAT = "fscs-suite-index/1"


def regime_matches(label: str, wanted: str) -> bool:
    """Whether a run's regime label ('weak', 'full', 'mixed@0.05') is covered by a suite entry (plain 'mixed'
    covers every fraction; fractions compare as numbers)."""
    if wanted == "mixed":
        return label.startswith("mixed")
    a, b = label_gt_fraction(label), label_gt_fraction(wanted)
    return label.split("@")[0] == wanted.split("@")[0] and a is not None and a == b


def _valid_regime(r: str) -> bool:
    frac = label_gt_fraction(r)
    return r in ("weak", "full", "mixed") or (r.startswith("mixed@") and frac is not None and 0 < frac <= 1)


@dataclass
class SuiteConfig:
    """A standard benchmark: which episodes (dataset, folds, settings, count, seed) and which regimes."""

    name: str = MISSING
    """Suite name; the bench writes OUT/suite-<name>.json."""
    dataset: str = MISSING
    """Shard directory (holds index.json), relative to the working directory or absolute."""
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Test folds; a checkpoint is evaluated on the fold it was trained for (data.fold) only."""
    settings: list[str] = field(default_factory=lambda: ["1w1s", "2w1s", "1w5s", "2w5s"])
    """Way/shot grid, written <N>w<K>s."""
    regimes: list[str] = field(default_factory=lambda: ["weak", "full"])
    """Training regimes covered: weak, full, mixed@<gt fraction> (runs with other regimes are skipped)."""
    eval_regimes: list[str] = field(default_factory=lambda: ["own"])
    """Test-time supervision per checkpoint: own (= its training regime), weak, full or mixed."""
    episodes: int = 1000
    seed: int = 0
    role: str = "test"
    """test (the fold's classes) or select (validation episodes from the training classes)."""
    ignore_boundary: bool = True
    """True = 255 pixels excluded from the metrics; False = counted as background (reference code)."""
    batch_size: int = 8
    """Episodes per backbone pass; also the unit of the rank split (fixed global batches)."""
    bootstrap: int = 1000
    """Bootstrap resamples of the per-fold 95 % CIs."""
    panels_first: int = 4
    """Episode panels kept for episodes 0..panels_first-1 ..."""
    panels_worst: int = 4
    """... and for the panels_worst lowest-IoU other episodes (failures)."""


def _check(suite: SuiteConfig, source: str) -> None:
    bad = [r for r in suite.regimes if not _valid_regime(r)]
    if bad or not suite.regimes:
        raise FSCSError(f"suite {source}: key 'regimes' has {bad or 'nothing'}; use weak, full or "
                        "mixed@<fraction> (e.g. mixed@0.05)")
    bad = [r for r in suite.eval_regimes if r not in ("own", "weak", "full", "mixed")]
    if bad or not suite.eval_regimes:
        raise FSCSError(f"suite {source}: key 'eval_regimes' has {bad or 'nothing'}; use own, weak, full "
                        "or mixed")
    for s in suite.settings:
        parse_setting(s)
    checks = [("folds", bool(suite.folds) and all(f >= 0 for f in suite.folds)),
              ("episodes", suite.episodes >= 1), ("batch_size", suite.batch_size >= 1),
              ("bootstrap", suite.bootstrap >= 0),
              ("role", suite.role in ("test", "select")), ("settings", bool(suite.settings)),
              ("panels_first", suite.panels_first >= 0), ("panels_worst", suite.panels_worst >= 0),
              ("name", bool(re.fullmatch(r"[A-Za-z0-9_.-]+", suite.name)))]
    for key, ok in checks:
        if not ok:
            raise FSCSError(f"suite {source}: key '{key}' = {getattr(suite, key)!r} is invalid; see "
                            "benchmarks/suites/*.yaml and docs/reports.md")


def load_suite(path: str | os.PathLike, overrides: list[str] | None = None) -> SuiteConfig:
    """Suite YAML (+ `key=value` overrides) -> validated SuiteConfig; bad/unknown keys are one-line errors."""
    suite: SuiteConfig = load_structured(SuiteConfig, path, overrides, what="suite", example="episodes=200",
                                         not_found="pass one of benchmarks/suites/*.yaml")
    source = f"{path}" + (f" (overrides {' '.join(overrides)})" if overrides else "")
    _check(suite, source)
    return suite


# ----------------------------------------------------------------------------------------------- cache
def cache_name(checkpoint_sha256: str, mhash: str, regime: str, ignore_boundary: bool) -> str:
    """File stem of a cached result: one per (checkpoint, manifest, test regime, boundary rule)."""
    return f"{checkpoint_sha256[:16]}-{mhash[:16]}-{regime}-{'ib' if ignore_boundary else 'bg'}"


def _cache_hit(path: Path, sha: str, mhash: str, regime: str, ib: bool, shards: str) -> bool:
    """A cached result exists, is complete (records file present), really has this key and was made on the
    shards as they are now (`shards_fingerprint`: regenerated shards with the same keys are computed again)."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    rec = res.get("records") or {}
    return (res.get("checkpoint_sha256") == sha and res.get("manifest_hash") == mhash
            and res.get("regime") == regime and res.get("ignore_boundary") == ib
            and res.get("shards_fingerprint") == shards
            and bool(rec.get("file")) and (path.parent / rec["file"]).is_file())


def _refresh_ci(path: Path, bootstrap: int) -> None:
    """Recompute a cached result's CIs from its records when the suite asks for another bootstrap count."""
    res = json.loads(path.read_text())
    if res.get("bootstrap") == bootstrap:
        return
    records = np.load(path.parent / res["records"]["file"])["records"]
    metric = FSCSMetric.from_records(sorted(int(c) for c in res["class_names"]), records)
    res["ci95"] = metric.bootstrap_ci(bootstrap, res["seed"]) if bootstrap else None
    res["bootstrap"] = bootstrap
    write_json_atomic(path, res)


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class SuiteSummary:
    """What a suite bench did: result files (this suite's, cached or not), counts, skipped runs."""

    results: list[Path] = field(default_factory=list)
    computed: int = 0
    cached: int = 0
    backbone_groups: int = 0
    skipped: list[str] = field(default_factory=list)
    index_file: Path | None = None


def _select_runs(suite: SuiteConfig, run_dirs: list[Path], dataset: str, summary: SuiteSummary
                 ) -> list[LoadedRun]:
    """Load the runs; keep those of the suite's folds and regimes (others noted in summary.skipped)."""
    runs: list[LoadedRun] = []
    for d in run_dirs:
        loaded = load_run(d)
        if any(r.checkpoint_sha256 == loaded.checkpoint_sha256 for r in runs):
            summary.skipped.append(f"{d}: same checkpoint as a run given before")
            continue
        label = regime_label(loaded.cfg)
        run_index = Path(loaded.cfg.data.shards) / "index.json"
        if run_index.is_file():
            trained_on = json.loads(run_index.read_text()).get("dataset")
            if trained_on != dataset:
                raise FSCSError(f"run '{d}' was trained on dataset '{trained_on}', suite '{suite.name}' "
                                f"evaluates '{dataset}'; pass runs of this dataset")
        if loaded.cfg.data.fold not in suite.folds:
            summary.skipped.append(f"{d}: trained for fold {loaded.cfg.data.fold}, suite folds {suite.folds}")
        elif not any(regime_matches(label, r) for r in suite.regimes):
            summary.skipped.append(f"{d}: regime {label} not in suite regimes {suite.regimes}")
        else:
            runs.append(loaded)
    for s in summary.skipped:
        logger.warning("suite %s: skipped %s", suite.name, s)
    if not runs:
        raise FSCSError(f"suite '{suite.name}': none of the {len(run_dirs)} runs fits its folds "
                        f"{suite.folds} and regimes {suite.regimes} ({'; '.join(summary.skipped)[:300]})")
    return runs


def _share_backbones(runs: list[LoadedRun], device: torch.device) -> int:
    """Move models to `device`; runs with the same backbone identity use one backbone module. -> #groups."""
    shared: dict[str, Any] = {}
    for r in runs:
        key = json.dumps(r.model.backbone.identity, sort_keys=True)
        if key in shared:
            r.model.backbone = shared[key]
        else:
            shared[key] = r.model.backbone
        r.model.to(device).eval()
    return len(shared)


def _eval_regimes(suite: SuiteConfig, run: LoadedRun) -> list[str]:
    out: list[str] = []
    for r in suite.eval_regimes:
        r = run.cfg.train.regime if r == "own" else r
        if r not in out:
            out.append(r)
    return out


def bench_suite(suite: SuiteConfig, run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike,
                env: DistEnv | None = None) -> SuiteSummary:
    """Evaluate every (checkpoint x its fold x setting x test regime) of `suite` into `out_dir`.

    Per (fold, setting) one frozen manifest is built; results already in OUT/results (same checkpoint sha256,
    manifest hash, test regime, boundary rule) are reused, the missing ones are computed in one pass over the
    episodes in which every backbone identity runs once per batch and all heads decode its features. Rank 0
    decides what is missing (then broadcasts it) and writes; ranks split the fixed global batches.
    Writes OUT/suite-<name>.json listing this suite's result files.
    """
    env = env or DistEnv()
    out = Path(out_dir)
    results_dir = out / "results"
    index = read_index(suite.dataset)
    summary = SuiteSummary()
    fingerprint = shards_fingerprint(index)
    runs = _select_runs(suite, [Path(d) for d in run_dirs], index.dataset, summary)
    summary.backbone_groups = _share_backbones(runs, resolve_device("auto", env))
    if env.is_main:  # only rank 0 writes here (other hosts cannot tell whether its pids are alive)
        make_output_dir(results_dir, "--out")  # before any episode: an unusable --out costs no evaluation
        remove_stale_tmp(results_dir)  # files of a killed earlier attempt
    run_folds = {r.cfg.data.fold for r in runs}
    for fold in (f for f in suite.folds if f in run_folds):  # before the first episode of any fold
        check_settings(index, suite.role, fold, suite.settings, suite.seed)
    for fold in suite.folds:
        fold_runs = [r for r in runs if r.cfg.data.fold == fold]
        if not fold_runs:
            continue
        samples: dict[str, EncodedSample] = {}  # shard bytes, shared by the settings of the fold
        for setting in suite.settings:
            way, shot = parse_setting(setting)
            sampler = EpisodeSampler(index, suite.role, fold, way, shot, suite.seed)
            manifest = build_manifest(sampler, suite.episodes)
            mhash = manifest_hash(manifest)
            jobs = [(r, reg) for r in fold_runs for reg in _eval_regimes(suite, r)]
            ib = suite.ignore_boundary
            paths = [results_dir / f"{cache_name(r.checkpoint_sha256, mhash, reg, ib)}.json"
                     for r, reg in jobs]
            hits = [_cache_hit(p, r.checkpoint_sha256, mhash, reg, ib, fingerprint) if env.is_main else None
                    for p, (r, reg) in zip(paths, jobs)]
            hits = all_gather_objects(hits)[0]  # rank 0's view, before anyone writes this setting
            todo = [k for k, hit in enumerate(hits) if not hit]
            summary.cached += len(jobs) - len(todo)
            summary.computed += len(todo)
            summary.results += paths
            logger.info("suite %s fold %d %s (manifest %s): %d cached, %d to compute", suite.name, fold,
                        setting, mhash[:12], len(jobs) - len(todo), len(todo))
            if env.is_main:
                for k, hit in enumerate(hits):
                    if hit:
                        _refresh_ci(paths[k], suite.bootstrap)
            if not todo:
                continue
            evals = evaluate_jobs(
                [EvalJob(jobs[k][0].model, jobs[k][1], jobs[k][0].cfg.name) for k in todo], index, fold=fold,
                way=way, shot=shot, episodes=suite.episodes, seed=suite.seed, role=suite.role,
                ignore_boundary=suite.ignore_boundary, batch_size=suite.batch_size, bootstrap=suite.bootstrap,
                env=env, panels=(suite.panels_first, suite.panels_worst), manifest=manifest, samples=samples)
            for k, res in zip(todo, evals):
                run, reg = jobs[k]
                res.update(run_metadata(run), suite=suite.name, shards_fingerprint=fingerprint)
                logger.info("%s [%s, test %s] fold %d %s: %s", run.cfg.name, regime_label(run.cfg), reg, fold,
                            setting, format_metrics(res["metrics"], res["segmentation_episodes"]))
                if env.is_main:
                    write_result(res, paths[k], manifest_dir=out / "manifests")
    if env.is_main:
        summary.index_file = out / f"suite-{suite.name}.json"
        write_json_atomic(summary.index_file, {
            "format": SUITE_INDEX_FORMAT, "suite": asdict(suite), "dataset": index.dataset,
            "results": [os.path.relpath(p, out) for p in summary.results], "computed": summary.computed,
            "cached": summary.cached, "skipped": summary.skipped})
    logger.info("suite %s: %d results (%d computed, %d cached) in %s", suite.name, len(summary.results),
                summary.computed, summary.cached, out)
    return summary

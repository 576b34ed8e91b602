"""Benchmark runner: index-seeded episodes split across ranks, shared backbone passes, results JSON."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fscs.atomic import make_output_dir, remove_stale_tmp
from fscs.bench.episode_scoring import _payload, _pick_panels, _score, _Track
from fscs.bench.eval_samples import _check_support_masks, _decode_batch, _image_keys, _load, spec_from_dict
from fscs.bench.metrics import FSCSMetric, format_metrics
from fscs.bench.results_io import clear_predictions, write_json_atomic, write_result
from fscs.bench.runs import LoadedRun, run_metadata
from fscs.config import RunConfig, config_to_dict, parse_setting
from fscs.data.episodes import EpisodeSampler, build_manifest, make_episode_tensors, manifest_hash
from fscs.data.shards import EncodedSample, ShardIndex, data_digest, read_index
from fscs.distributed import DistEnv, all_gather_objects, barrier
from fscs.errors import FSCSError
from fscs.model.fscs_model import FSCSModel
from fscs.runtime import resolve_device

logger = logging.getLogger(__name__)

RESULT_FORMAT = "fscs-result/1"


def _batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


@dataclass
class EvalJob:
    """One model evaluated under one test-time regime ('weak', 'full', 'mixed'); jobs whose models share a
    backbone identity share one backbone pass per episode batch (their features are computed once)."""

    model: FSCSModel
    regime: str
    name: str = ""
    predictions_dir: Path | None = None
    """If set, every episode's manifest entry, presence per way and predicted label map are written here."""


@torch.no_grad()
def evaluate_jobs(
    jobs: Sequence[EvalJob],
    index: ShardIndex,
    *,
    fold: int,
    way: int,
    shot: int,
    episodes: int,
    seed: int = 0,
    role: str = "test",
    ignore_boundary: bool = True,
    batch_size: int = 8,
    bootstrap: int = 1000,
    env: DistEnv | None = None,
    panels: tuple[int, int] = (4, 4),
    artifacts: bool = True,
    manifest: Mapping[str, Any] | None = None,
    samples: dict[str, EncodedSample] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate several (model, regime) jobs on the same `episodes` index-seeded episodes; one result per job.

    Episodes are grouped into fixed batches of consecutive indices and rank r takes batches r, r + P, ...
    (no padding, no duplicates). For each batch, the jobs are grouped by backbone identity and every group
    runs the backbone once (`encode_episode`); each job then only runs its head (`decode_episode`).
    Per-episode records are gathered and every rank rebuilds the same metric from them: P = 1 and P = 2
    agree bit for bit.
    Queries without a mask (image-level labels only): their ways' presence comes from the labels, so ER,
    its CI and the presence data cover every episode; mIoU / FB-IoU / per-class IoU pool the episodes whose
    query has a mask (result["segmentation_episodes"] of result["episodes"]) and are None when none has one.
    The full regime needs a mask on every support image (FSCSError otherwise).
    panels = (first, worst): episode panels (query | GT | pseudo-mask | prediction) of episodes 0..first-1
    and of the `worst` lowest foreground-IoU others among the episodes with a query mask (iou None and a GT
    tile marked "no mask" for a first episode without one). artifacts=True adds result["artifacts"] =
    {"records" [E, 6 + 2C] int64, "record_columns", "panels": [{index, kind, iou, ..., "png": bytes}]} (not
    JSON: save with write_result). `manifest`: a prebuilt build_manifest(...) of these settings; `samples`: a
    shared {key: EncodedSample} cache that is filled as needed (reused across settings of a fold): samples are
    kept as their shard bytes and decoded again for each batch of episodes that uses them.
    """
    env = env or DistEnv()
    if not jobs:
        return []
    sampler = EpisodeSampler(index, role, fold, way, shot, seed)
    if manifest is None:
        manifest = build_manifest(sampler, episodes)
    expect = {"dataset": index.dataset, "role": role, "fold": fold, "way": way, "shot": shot, "seed": seed,
              "count": episodes}
    if any(manifest.get(k) != v for k, v in expect.items()):
        raise FSCSError(f"evaluate: the manifest given does not match {expect}; rebuild it with "
                        "build_manifest")
    all_specs = [spec_from_dict(d) for d in manifest["episodes"]]
    my_batches = _batches(list(range(episodes)), batch_size)[env.rank :: env.world_size]
    my_specs = [all_specs[i] for b in my_batches for i in b]
    samples = _load(index, my_specs, samples)
    digests: dict[str, str] = {}
    for part in all_gather_objects({k: samples[k].digest for k in _image_keys(my_specs)}):
        digests.update(part)
    data_sha256 = data_digest(digests)  # what every rank read: the same pixels, masks and labels or not
    support_masks = any(job.regime == "full" for job in jobs)  # only the full regime reads them
    if support_masks:
        _check_support_masks(str(index.root), my_specs, samples)
    fold_classes = sorted(index.fold_classes(role, fold))
    n_first, n_worst = (panels if artifacts else (0, 0))
    tracks = [_Track(FSCSMetric(fold_classes), n_first, n_worst) for _ in jobs]
    groups: dict[str, list[int]] = {}
    for j, job in enumerate(jobs):
        groups.setdefault(json.dumps(job.model.backbone.identity, sort_keys=True), []).append(j)
    t0 = time.time()
    for batch in my_batches:
        specs = [all_specs[i] for i in batch]
        decoded = _decode_batch(specs, samples, support_masks)
        items_by_size: dict[int, list[dict[str, torch.Tensor]]] = {}
        for members in groups.values():
            encoder = jobs[members[0]].model
            device = next(encoder.head.parameters()).device
            size = encoder.image_size
            if size not in items_by_size:
                items_by_size[size] = [make_episode_tensors(s, decoded, size) for s in specs]
            items = items_by_size[size]
            query = torch.stack([it["query_img"] for it in items]).to(device)
            support = torch.stack([it["support_img"] for it in items]).to(device)
            feats = encoder.encode_episode(query, support)
            masks = None
            for j in members:
                job = jobs[j]
                if job.regime == "full" and masks is None:
                    masks = torch.stack([it["support_mask"] for it in items]).to(device)
                # masks at the head's own resolution, upsampled once to each query's size in _score (cst.md)
                out = job.model.decode_episode(feats, masks if job.regime == "full" else None,
                                               regime=job.regime, out_size=job.model.mask_size)
                _score(job, tracks[j], feats, out, specs, items, decoded, ignore_boundary)
        del decoded  # before the next batch decodes its own
    gathered = all_gather_objects([_payload(t) for t in tracks])
    seconds = round(time.time() - t0, 2)
    results = []
    for j, job in enumerate(jobs):
        parts = [g[j] for g in gathered]
        records = np.concatenate([p["records"] for p in parts if len(p["records"])], axis=0)
        metric = FSCSMetric.from_records(fold_classes, records)
        prob = {i: v for p in parts for i, v in p["prob"].items()}
        true = {i: v for p in parts for i, v in p["true"].items()}
        order = sorted(prob)
        metrics = metric.compute()
        if metrics["classes_without_pixels"] and env.is_main:
            logger.warning("fold %d %dw%ds %s: classes %s have no pixel in the truth or the prediction of the "
                           "%d episodes; their IoU counts as 0 in the mIoU (the protocol's I / max(U, 1)): "
                           "evaluate more episodes", fold, way, shot, job.regime,
                           metrics["classes_without_pixels"], episodes)
        result = {
            "format": RESULT_FORMAT,
            "dataset": index.dataset,
            "fold": fold, "way": way, "shot": shot, "regime": job.regime, "role": role,
            "episodes": episodes, "seed": seed,
            "segmentation_episodes": metric.segmentation_episodes(),
            "manifest_hash": manifest_hash(manifest),
            "manifest": dict(manifest),
            "data_sha256": data_sha256,
            "ignore_boundary": ignore_boundary,
            "metrics": metrics,
            "ci95": metric.bootstrap_ci(bootstrap, seed) if bootstrap else None,
            "bootstrap": bootstrap,
            "class_names": {str(c): index.class_names.get(c, str(c)) for c in fold_classes},
            "presence": {"shape": [len(order), way],
                         "prob": [round(float(x), 4) for i in order for x in prob[i]],
                         "true": [int(x) for i in order for x in true[i]]},
            "world_size": env.world_size,
            "seconds": seconds,
        }
        if artifacts:
            result["artifacts"] = {"records": metric.episode_records(),
                                   "record_columns": metric.record_columns(),
                                   "panels": _pick_panels(parts, n_first, n_worst)}
        results.append(result)
    return results


def evaluate(
    model: FSCSModel,
    index: ShardIndex,
    *,
    fold: int,
    way: int,
    shot: int,
    regime: str,
    episodes: int,
    seed: int = 0,
    role: str = "test",
    ignore_boundary: bool = True,
    batch_size: int = 8,
    bootstrap: int = 1000,
    env: DistEnv | None = None,
    panels: tuple[int, int] = (4, 4),
    artifacts: bool = False,
) -> dict[str, Any]:
    """Evaluate one (fold, way, shot, regime) on `episodes` index-seeded episodes (see evaluate_jobs).

    The result is JSON-ready (metrics, ci95, manifest, presence {"shape": [E, N], "prob", "true"} flat lists)
    unless artifacts=True adds the per-episode records and episode panels (save those with write_result).
    """
    return evaluate_jobs([EvalJob(model, regime)], index, fold=fold, way=way, shot=shot, episodes=episodes,
                         seed=seed, role=role, ignore_boundary=ignore_boundary, batch_size=batch_size,
                         bootstrap=bootstrap, env=env, panels=panels, artifacts=artifacts)[0]


def check_settings(index: ShardIndex, role: str, fold: int, settings: Sequence[str], seed: int) -> None:
    """Every setting's episodes can be drawn from the fold (one-line FSCSError otherwise): checked before the
    first episode is evaluated, not after hours of the settings before it."""
    for setting in settings:
        EpisodeSampler(index, role, fold, *parse_setting(setting), seed)


def check_unseen_fold(train_cfg: RunConfig, cfg: RunConfig, index: ShardIndex) -> None:
    """Refuse to test a head on another fold of the dataset it was trained on: that fold's classes were among
    its training classes. Another dataset (a cross-domain test) may use any fold."""
    train = train_cfg.data
    if cfg.data.fold == train.fold:
        return
    same = Path(cfg.data.shards).resolve() == Path(train.shards).resolve()
    if not same:
        try:
            same = read_index(train.shards).dataset == index.dataset
        except FSCSError:  # the training shards are not on this machine: datasets unknown
            same = False
    if same:
        raise FSCSError(f"data.fold={cfg.data.fold}: run '{train_cfg.name}' was trained for fold {train.fold} of "
                        f"{index.dataset}, so fold {cfg.data.fold}'s classes were among its training classes; "
                        f"drop the data.fold override (or train a run with data.fold={cfg.data.fold})")


def bench_run(loaded: LoadedRun, cfg: RunConfig, env: DistEnv, out_dir: Path, regime: str | None = None,
              save_predictions: Path | None = None) -> list[dict]:
    """Evaluate a run on every setting of cfg.bench; rank 0 writes a JSON per setting (+ side files)."""
    index = read_index(cfg.data.shards)
    check_unseen_fold(loaded.cfg, cfg, index)
    check_settings(index, cfg.bench.role, cfg.data.fold, cfg.bench.settings, cfg.bench.seed)
    regime = regime or loaded.cfg.train.regime
    if env.is_main:  # before the first episode: an unusable --out must not cost the whole evaluation
        make_output_dir(out_dir, "--out")
        remove_stale_tmp(out_dir)  # files of a killed earlier attempt
    if save_predictions is not None:  # one run's predictions per folder, and which run made them
        if env.is_main:
            for setting in cfg.bench.settings:
                folder = make_output_dir(Path(save_predictions) / setting, "--save-predictions")
                if clear_predictions(folder):
                    logger.warning("%s: removed the episode files of an earlier --save-predictions run", folder)
                write_json_atomic(folder / "predictions.json", {
                    "run": loaded.cfg.name, "checkpoint": str(loaded.checkpoint),
                    "checkpoint_sha256": loaded.checkpoint_sha256, "setting": setting, "regime": regime,
                    "fold": cfg.data.fold, "episodes": cfg.bench.episodes, "seed": cfg.bench.seed})
        barrier()
    loaded.model.to(resolve_device("auto", env))
    results = []
    samples: dict[str, EncodedSample] = {}
    for setting in cfg.bench.settings:
        way, shot = parse_setting(setting)
        res = evaluate_jobs(
            [EvalJob(loaded.model, regime, loaded.cfg.name,
                     None if save_predictions is None else Path(save_predictions) / setting)],
            index, fold=cfg.data.fold, way=way, shot=shot,
            episodes=cfg.bench.episodes, seed=cfg.bench.seed, role=cfg.bench.role,
            ignore_boundary=cfg.bench.ignore_boundary, batch_size=cfg.bench.batch_size,
            bootstrap=cfg.bench.bootstrap, env=env, samples=samples,
        )[0]
        res.update(run_metadata(loaded), bench_config=config_to_dict(cfg.bench))
        logger.info("%s %s fold %d %s: %s", loaded.cfg.name, regime, cfg.data.fold, setting,
                    format_metrics(res["metrics"], res["segmentation_episodes"]))
        if env.is_main:
            path = out_dir / f"{loaded.cfg.name}_{regime}_fold{cfg.data.fold}_{setting}.json"
            res = write_result(res, path)
        results.append(res)
    return results

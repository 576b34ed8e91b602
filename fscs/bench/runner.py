"""Benchmark runner: index-seeded episodes split across ranks, metrics reduced exactly, results JSON."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fscs.bench.metrics import FSCSMetric, episodic_target
from fscs.config import RunConfig, config_from_dict, config_to_dict, parse_setting
from fscs.data.episodes import EpisodeSampler, build_manifest, make_episode_tensors, manifest_hash
from fscs.data.shards import ShardIndex, load_samples, read_index
from fscs.distributed import DistEnv, all_gather_objects
from fscs.errors import FSCSError
from fscs.model.fscs_model import FSCSModel, upsample_logits
from fscs.train import CHECKPOINT, build_model, check_backbone_identity, load_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """A trained run: its config, model (head loaded) and checkpoint path/hash."""

    cfg: RunConfig
    model: FSCSModel
    checkpoint: Path
    checkpoint_sha256: str


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Rebuild the model of a run directory from its checkpoint (config stored inside it)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FSCSError(f"no checkpoint at '{path}'; train first (fscs train name=... ) or pass the right --run")
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    check_backbone_identity(state["backbone"], model, path)
    model.head.load_state_dict(state["engine"]["head"])
    return LoadedRun(cfg, model.eval(), path, file_sha256(path))


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


@torch.no_grad()
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
) -> dict[str, Any]:
    """Evaluate one (fold, way, shot, regime) on `episodes` index-seeded episodes.

    Episodes are grouped into fixed batches of consecutive indices and rank r takes batches r, r + P, ...
    (no padding, no duplicates), so every episode is computed in the same batch whatever P is; per-episode
    records are gathered and every rank rebuilds the same metric from them: P = 1 and P = 2 agree bit for bit.
    """
    env = env or DistEnv()
    device = next(model.head.parameters()).device
    sampler = EpisodeSampler(index, role, fold, way, shot, seed)
    manifest = build_manifest(sampler, episodes)
    my_batches = _batches(list(range(episodes)), batch_size)[env.rank :: env.world_size]
    specs = {i: sampler.episode(i) for batch in my_batches for i in batch}
    keys = {s.query for s in specs.values()} | {k for s in specs.values() for shots in s.support for k in shots}
    samples = load_samples(index, keys, decode_masks=True)
    fold_classes = sorted(index.fold_classes(role, fold))
    metric = FSCSMetric(fold_classes)
    size = model.image_size
    t0 = time.time()
    for batch in my_batches:
        items = [make_episode_tensors(specs[i], samples, size) for i in batch]
        query = torch.stack([it["query_img"] for it in items]).to(device)
        support = torch.stack([it["support_img"] for it in items]).to(device)
        masks = torch.stack([it["support_mask"] for it in items]).to(device) if regime == "full" else None
        out = model.forward_episode(query, support, masks, regime=regime)
        presence_p = out.cls_logits.float().softmax(-1)[..., 1]
        for j, i in enumerate(batch):
            it, spec = items[j], specs[i]
            gt = it["query_mask_abs"]
            logits = upsample_logits(out.mask_logits[j], tuple(gt.shape[-2:]))  # [N, 2, H, W] at original size
            fg = logits.softmax(1)[:, 1]
            best, arg = fg.max(0)
            pred = torch.where(best >= 0.5, arg + 1, torch.zeros_like(arg)).cpu()
            target = episodic_target(gt, spec.classes, ignore_boundary=ignore_boundary)
            metric.update(pred, target, list(spec.classes), (presence_p[j] > 0.5).cpu(),
                          it["presence"].bool(), episode_index=spec.index)
    records = np.concatenate([r for r in all_gather_objects(metric.episode_records()) if len(r)], axis=0)
    metric = FSCSMetric.from_records(fold_classes, records)
    result = {
        "format": "fscs-result/1",
        "dataset": index.dataset,
        "fold": fold, "way": way, "shot": shot, "regime": regime, "role": role,
        "episodes": episodes, "seed": seed,
        "manifest_hash": manifest_hash(manifest),
        "manifest": manifest,
        "ignore_boundary": ignore_boundary,
        "metrics": metric.compute(),
        "ci95": metric.bootstrap_ci(bootstrap, seed) if bootstrap else None,
        "world_size": env.world_size,
        "seconds": round(time.time() - t0, 2),
    }
    return result


def bench_run(loaded: LoadedRun, cfg: RunConfig, env: DistEnv, out_dir: Path, regime: str | None = None) -> list[dict]:
    """Evaluate a loaded run on every setting of cfg.bench; rank 0 writes one JSON per setting."""
    index = read_index(cfg.data.shards)
    regime = regime or loaded.cfg.train.regime
    results = []
    for setting in cfg.bench.settings:
        way, shot = parse_setting(setting)
        res = evaluate(
            loaded.model, index, fold=cfg.data.fold, way=way, shot=shot, regime=regime,
            episodes=cfg.bench.episodes, seed=cfg.bench.seed, role=cfg.bench.role,
            ignore_boundary=cfg.bench.ignore_boundary, batch_size=cfg.bench.batch_size,
            bootstrap=cfg.bench.bootstrap, env=env,
        )
        res.update(checkpoint=str(loaded.checkpoint), checkpoint_sha256=loaded.checkpoint_sha256,
                   backbone=loaded.model.backbone.identity, run=loaded.cfg.name,
                   train_config=config_to_dict(loaded.cfg), bench_config=config_to_dict(cfg.bench))
        m = res["metrics"]
        logger.info("%s %s fold %d %s: ER %.1f mIoU %.1f FB-IoU %.1f (%d episodes)", loaded.cfg.name, regime,
                    cfg.data.fold, setting, m["er"], m["miou"], m["fbiou"], m["episodes"])
        manifest = res.pop("manifest")
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out_dir / "manifests" / f"{res['manifest_hash'][:16]}.json", manifest)
            path = out_dir / f"{loaded.cfg.name}_{regime}_fold{cfg.data.fold}_{setting}.json"
            write_json_atomic(path, res)
        results.append(res)
    return results

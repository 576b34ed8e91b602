"""Benchmark settings: configs, trainers and batches built through the package's public APIs."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fscs.config import RunConfig, load_config
from fscs.data.stream import TrainEpisodeStream, make_train_loader
from fscs.distributed import DistEnv
from fscs.train import Trainer

from timing import REPO

logger = logging.getLogger(__name__)

VIT_S8 = "vit_small_patch8_224.dino"


@dataclass(frozen=True)
class Setting:
    """One benchmarked configuration (training episodes are way-way shot-shot)."""

    label: str
    backbone: str
    image_size: int
    batch: int
    way: int = 1
    shot: int = 1


def offline_default(batch: int | None = None) -> Setting:
    """The config defaults (offline backbone at its default size); batch = data.batch_size unless given."""
    cfg = RunConfig()
    b = batch or cfg.data.batch_size
    return Setting(f"offline default ({cfg.model.backbone}, {cfg.model.image_size} px, batch {b})",
                   cfg.model.backbone, cfg.model.image_size, b)


def vit_s8_400(batch: int) -> Setting:
    return Setting(f"ViT-S/8 400 px random weights (batch {batch})", VIT_S8, 400, batch)


def ensure_shards(path: str | None, scratch: Path) -> str:
    """A shard directory with index.json: `path`, else the config default, else a small synthetic set."""
    candidates = [Path(path)] if path else [REPO / RunConfig().data.shards]
    for cand in candidates:
        if (cand / "index.json").is_file():
            return str(cand)
    if path:
        raise SystemExit(f"--shards {path}: no index.json there; "
                         f"build it with `fscs shards synth --out {path}`")
    from fscs.data.synthetic import build_synthetic_shards

    out = scratch / "synthetic-5i-small"
    logger.info("no shards at %s: generating a small synthetic set in %s", candidates[0], out)
    return str(build_synthetic_shards(out, seed=0, num_images=600, size=128, workers=1))


def model_overrides(backbone: str) -> list[str]:
    """The offline default's backbone keeps its shipped weights and rule; any other runs on random weights
    with the CST reference rule (timings do not depend on weight values)."""
    model = RunConfig().model
    if backbone == model.backbone:
        return [f"model.backbone={backbone}", f"model.weights={model.weights}", f"model.mask_rule={model.mask_rule}"]
    return [f"model.backbone={backbone}", "model.weights=null", "model.mask_rule=reference"]


def make_cfg(setting: Setting, shards: str, *, precision: str = "fp32", device: str = "cpu",
             out_dir: str | None = None, regime: str = "weak", extra: list[str] | None = None) -> RunConfig:
    """A validated RunConfig for `setting` (via load_config overrides, like the CLI)."""
    out_dir = out_dir or tempfile.mkdtemp(prefix="fscs-perf-")
    overrides = [f"data.shards={shards}", f"out_dir={out_dir}", "name=perf", *model_overrides(setting.backbone),
                 f"model.image_size={setting.image_size}",
                 f"data.batch_size={setting.batch}", f"data.way={setting.way}", f"data.shot={setting.shot}",
                 "data.num_workers=0",
                 f"train.precision={precision}", f"train.device={device}", f"train.regime={regime}"]
    return load_config(None, overrides + list(extra or []))


def make_trainer(cfg: RunConfig, env: DistEnv | None = None) -> Trainer:
    return Trainer(cfg, env or DistEnv())


def fetch_batches(cfg: RunConfig, count: int, rank: int = 0, world_size: int = 1, seed: int = 0
                  ) -> list[dict[str, torch.Tensor]]:
    """`count` real training batches of cfg (read in this process), kept in memory for re-use."""
    d = cfg.data
    stream = TrainEpisodeStream(d.shards, fold=d.fold, way=d.way, shot=d.shot,
                                image_size=cfg.model.image_size, seed=seed,
                                use_masks=cfg.train.regime == "full", rank=rank, world_size=world_size,
                                buffer_per_class=d.buffer_per_class)
    loader = make_train_loader(stream, d.batch_size, 0, count)
    return [dict(b) for b in loader]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def episode_images(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every image of a batch of episodes once: queries then supports, [B + B*N*K, 3, S, S]."""
    return torch.cat([batch["query_img"], batch["support_img"].flatten(0, 2)])

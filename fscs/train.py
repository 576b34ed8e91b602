"""Trainer: build the model, stream episodes, train the head, log, checkpoint atomically and resume."""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fscs.config import RunConfig, config_to_dict, save_config
from fscs.data.episodes import TrainEpisodeStream, make_train_loader
from fscs.data.shards import read_index
from fscs.distributed import DistEnv
from fscs.engine.ddp import DDPEngine
from fscs.errors import FSCSError
from fscs.losses import fscs_loss
from fscs.model.fscs_model import FSCSModel

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: RunConfig) -> FSCSModel:
    """The model a config describes (backbone weights from cfg.model.weights; fresh head)."""
    return FSCSModel.build(
        backbone=cfg.model.backbone,
        weights=cfg.model.weights,
        image_size=cfg.model.image_size,
        mask_rule=cfg.model.mask_rule,
        mask_threshold=cfg.model.mask_threshold,
    )


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a killed save leaves the previous file intact."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by save_checkpoint (tensors and plain data only: weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FSCSError(f"checkpoint '{path}' is unreadable ({type(exc).__name__}); delete it or pick another run") from None


def check_backbone_identity(stored: dict, model: FSCSModel, path: Path) -> None:
    """Refuse a head trained on other backbone features."""
    current = model.backbone.identity
    for key in ("name", "weights_sha256", "image_size"):
        if stored.get(key) != current.get(key):
            raise FSCSError(
                f"checkpoint '{path}' was trained with backbone {key}={stored.get(key)!r}, but this run uses "
                f"{current.get(key)!r}; set model.backbone/model.weights/model.image_size to match"
            )


class Trainer:
    """Trains the CST head of one run directory; resumes from its checkpoint when one exists."""

    def __init__(self, cfg: RunConfig, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.run_dir = cfg.run_dir
        self.device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
        seed_all(cfg.train.seed)
        self.index = read_index(cfg.data.shards)
        self.model = build_model(cfg).to(self.device)
        self.engine = DDPEngine(self.model.head, cfg.train, env, self.device)
        self.use_masks = cfg.train.regime == "full"
        self.epoch = 0
        self.step = 0
        self.writer = None

    def _loader(self):
        """Fixed steps per epoch on every rank; episode randomness from (seed, epoch, rank, worker)."""
        d = self.cfg.data
        stream = TrainEpisodeStream(
            d.shards, fold=d.fold, way=d.way, shot=d.shot, image_size=self.cfg.model.image_size,
            seed=self.cfg.train.seed, use_masks=self.use_masks,
            rank=self.env.rank, world_size=self.env.world_size, buffer_per_class=d.buffer_per_class,
        )
        return make_train_loader(stream, d.batch_size, d.num_workers, self.cfg.train.steps_per_epoch)

    def _resume(self) -> None:
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            return
        state = load_checkpoint(path)
        check_backbone_identity(state["backbone"], self.model, path)
        self.engine.load_state_dict(state["engine"])
        self.epoch, self.step = state["epoch"], state["step"]
        logger.info("resumed %s at epoch %d, step %d", path, self.epoch, self.step)

    def _save(self) -> None:
        if not self.env.is_main:
            return
        state = {
            "engine": self.engine.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "config": config_to_dict(self.cfg),
            "backbone": self.model.backbone.identity,
            "format": "fscs-checkpoint/1",
        }
        save_checkpoint(self.run_dir / CHECKPOINT, state)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step on a batch of episodes; returns the loss terms."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        presence = batch["presence"]
        with self.engine.autocast():
            out = self.model.forward_episode(
                batch["query_img"], batch["support_img"],
                support_masks=batch.get("support_mask") if self.use_masks else None,
                regime=self.cfg.train.regime, query_presence=presence, head=self.engine.module,
            )
            if self.use_masks:
                target = batch["query_target"]
                if not self.cfg.train.loss_ignore_boundary:
                    target = torch.where(target == 255, torch.zeros_like(target), target)
            else:
                target = out.pseudo_query.long()  # type: ignore[union-attr]
            loss, parts = fscs_loss(out.cls_logits.float(), out.mask_logits.float(), presence, target,
                                    cls_weight=self.cfg.train.cls_weight)
        self.engine.step(loss)
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}

    def fit(self) -> dict[str, Any]:
        """Train for cfg.train.epochs epochs of cfg.train.steps_per_epoch steps on every rank."""
        from tqdm import tqdm

        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        self._resume()
        t0, history = time.time(), []
        total = self.cfg.train.epochs * self.cfg.train.steps_per_epoch
        loader = self._loader()
        bar = tqdm(total=total, initial=self.step, disable=not self.env.is_main, desc=f"train {self.cfg.name}")
        while self.epoch < self.cfg.train.epochs:
            self.engine.train(True)
            sums: dict[str, float] = {}
            n = 0
            loader.set_epoch(self.epoch)
            for n, batch in enumerate(loader, start=1):
                parts = self.train_step(batch)
                self.step += 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.3f}", epoch=self.epoch)
                if self.writer and self.step % self.cfg.train.log_every == 0:
                    for k, v in parts.items():
                        self.writer.add_scalar(f"train/{k}", v, self.step)
            self.epoch += 1
            means = {k: v / max(n, 1) for k, v in sums.items()}
            history.append({"epoch": self.epoch, "step": self.step, **means})
            if self.env.is_main:
                logger.info("epoch %d done: %s", self.epoch, ", ".join(f"{k}={v:.4f}" for k, v in means.items()))
            self._save()
        bar.close()
        summary = {"run_dir": str(self.run_dir), "steps": self.step, "epochs": self.epoch,
                   "seconds": round(time.time() - t0, 1), "history": history,
                   "world_size": self.env.world_size}
        if self.env.is_main:
            (self.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
            if self.writer:
                self.writer.close()
        return summary

"""Parallel engines behind one interface (`Engine`); `build_engine` picks DDP or DeepSpeed (train.engine)."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from fscs.config import RunConfig
from fscs.distributed import DistEnv
from fscs.engine.base import Engine, build_optimizer, build_schedule
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

__all__ = ["Engine", "build_engine", "build_optimizer", "build_schedule"]


def build_engine(head: nn.Module, cfg: RunConfig, env: DistEnv, device: torch.device) -> Engine:
    """The engine of cfg.train.engine around `head` (the only trainable part), for the run's total steps."""
    total = cfg.train.epochs * cfg.train.steps_per_epoch
    if cfg.train.engine == "ddp":
        from fscs.engine.ddp import DDPEngine

        return DDPEngine(head, cfg.train, env, device, total_steps=total)
    if cfg.train.engine == "deepspeed":
        from fscs.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(head, cfg.train, env, device, total_steps=total,
                               micro_batch=cfg.data.batch_size)
    raise FSCSError(f"config key 'train.engine' is '{cfg.train.engine}'; use ddp or deepspeed")

"""DDP engine: wraps only the trainable head; owns optimizer, schedule, accumulation, backward and step."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from fscs.config import TrainConfig
from fscs.distributed import DistEnv
from fscs.engine.base import Engine, build_optimizer, build_schedule, follow_config
from fscs.engine.checkpoint import load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

ENGINE_FILE = "engine.pt"

__all__ = ["DDPEngine", "build_optimizer"]


class DDPEngine(Engine):
    """The head, wrapped in DDP when the job has several processes; the frozen backbone stays outside.

    Gradient accumulation: micro-batches before the boundary run backward under `no_sync` (no all-reduce)
    with the loss divided by grad_accum; the boundary micro-batch all-reduces the summed gradients.
    """

    name = "ddp"

    def __init__(self, head: nn.Module, cfg: TrainConfig, env: DistEnv, device: torch.device,
                 total_steps: int | None = None) -> None:
        self.head = head.to(device)
        self.device = device
        self.env = env
        self.precision = cfg.precision
        self.grad_accum = int(getattr(cfg, "grad_accum", 1) or 1)
        if env.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.module: nn.Module = DistributedDataParallel(self.head, device_ids=ids)
        else:
            self.module = self.head
        self.optimizer = build_optimizer([p for p in self.head.parameters() if p.requires_grad], cfg)
        total = total_steps if total_steps is not None else cfg.epochs * cfg.steps_per_epoch
        self.cfg, self.total_steps = cfg, total
        self.scheduler = build_schedule(self.optimizer, cfg, total)
        self.micro = 0
        self.stepped = False

    def step(self, loss: torch.Tensor) -> bool:
        """Backward of one micro-batch; optimizer + schedule step every grad_accum-th call (then True)."""
        self.micro += 1
        boundary = self.micro % self.grad_accum == 0
        scaled = loss / self.grad_accum if self.grad_accum > 1 else loss
        sync = self.module.no_sync() if (not boundary and isinstance(self.module, DistributedDataParallel)) \
            else contextlib.nullcontext()
        with sync:
            scaled.backward()
        if boundary:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        self.stepped = boundary
        return boundary

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "schedule" in state:
            self.scheduler.load_state_dict(state["schedule"])
            follow_config(self.scheduler, self.cfg, self.total_steps)

    def save(self, directory: Path) -> None:
        """Rank 0 writes directory/engine.pt (the state is replicated; other ranks write nothing)."""
        if self.env.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            save_checkpoint(directory / ENGINE_FILE, self.state_dict())

    def load(self, directory: Path) -> None:
        """Every rank reads directory/engine.pt (tensors and plain data only)."""
        self.load_state_dict(load_checkpoint(directory / ENGINE_FILE))
        self.micro = 0

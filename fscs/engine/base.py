"""The engine interface the Trainer drives (DDP and DeepSpeed implement it), shared optimizer and schedule."""
from __future__ import annotations

import abc
import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from fscs.config import TrainConfig

logger = logging.getLogger(__name__)


def build_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the reference: lr 1e-3, no weight decay) or AdamW."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class WarmupSchedule:
    """LR multiplier of optimizer step s: linear warm-up over `warmup` steps, then constant or cosine to 0.

    A plain object (not a lambda): LambdaLR.state_dict() stores its fields, checkpoints stay plain data.
    """

    def __init__(self, kind: str, warmup: int, total: int) -> None:
        self.kind, self.warmup, self.total = kind, int(warmup), max(int(total), 1)

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "cosine":
            span = max(self.total - self.warmup, 1)
            progress = min(max(step - self.warmup, 0) / span, 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule over `total_steps` optimizer steps (stepped once per optimizer step)."""
    schedule = WarmupSchedule(cfg.schedule, cfg.warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def follow_config(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig, total_steps: int) -> None:
    """After loading a schedule's and optimizer's state: keep the step count but take shape (kind, warm-up,
    length), base learning rate and weight decay from the current config, and set the optimizer's lr for the
    next step accordingly.

    LambdaLR.load_state_dict restores the old WarmupSchedule fields and base lr, so a run resumed with more
    epochs under the cosine schedule kept the old length and trained on at lr 0; Optimizer.load_state_dict
    restores the old weight_decay. Unchanged config: the same float the uninterrupted run has (base lr x
    multiplier, computed as LambdaLR does).
    """
    fresh = WarmupSchedule(cfg.schedule, cfg.warmup_steps, total_steps)
    for schedule in scheduler.lr_lambdas:
        if isinstance(schedule, WarmupSchedule):
            schedule.__dict__.update(fresh.__dict__)
    scheduler.base_lrs = [float(cfg.lr)] * len(scheduler.base_lrs)
    step = scheduler.last_epoch
    for group, base, schedule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * schedule(step)
        group["weight_decay"] = float(cfg.weight_decay)


class Engine(abc.ABC):
    """What the Trainer needs from a parallel engine; only the head is inside it (the frozen backbone is not).

    `module` is what the forward pass calls (possibly wrapped); `head` is the bare module. `step(loss)` owns
    gradient accumulation: it runs backward on every micro-batch and the optimizer + schedule step on every
    `grad_accum`-th call, when it returns True (also kept in `stepped`). `save`/`load` must be called on
    every rank (DeepSpeed's are collective) with the same directory; they hold head, optimizer and schedule.
    """

    name: str = "engine"
    head: nn.Module
    module: nn.Module
    grad_accum: int = 1
    precision: str = "fp32"
    device: torch.device
    stepped: bool = False

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast when configured (never fp16); a no-op for fp32."""
        if self.precision == "bf16":
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    @abc.abstractmethod
    def step(self, loss: torch.Tensor) -> bool:
        """Backward of one micro-batch's scalar loss; optimizer + schedule step at the accumulation end."""

    @abc.abstractmethod
    def lr(self) -> float:
        """Current learning rate (first parameter group)."""

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write head, optimizer and schedule state under `directory` (every rank calls it)."""

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (every rank calls it)."""

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The full head weights in fp32 on CPU, the same on every rank (call it on every rank)."""
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in self.head.state_dict().items()}

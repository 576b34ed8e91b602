"""DDP engine: wraps only the trainable head, owns the optimizer, precision, backward and step."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from fscs.config import TrainConfig
from fscs.distributed import DistEnv

logger = logging.getLogger(__name__)


def build_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the reference: lr 1e-3, no weight decay) or AdamW."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class DDPEngine:
    """The head, wrapped in DDP when the job has several processes; the frozen backbone stays outside.

    `module` is what the forward pass calls (DDP-wrapped or not); `head` is the bare module whose
    state is checkpointed.
    """

    name = "ddp"

    def __init__(self, head: nn.Module, cfg: TrainConfig, env: DistEnv, device: torch.device):
        self.head = head.to(device)
        self.device = device
        self.precision = cfg.precision
        if env.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.module: nn.Module = DistributedDataParallel(self.head, device_ids=ids)
        else:
            self.module = self.head
        self.optimizer = build_optimizer([p for p in self.head.parameters() if p.requires_grad], cfg)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast when configured (never fp16 on CPU); a no-op for fp32."""
        if self.precision == "bf16":
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step from a scalar loss (gradients all-reduced by DDP during backward)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])

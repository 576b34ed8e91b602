"""Where and how a process computes: its device, its precision and its random seeds."""
from __future__ import annotations

import random

import numpy as np
import torch

from fscs.distributed import DistEnv
from fscs.errors import FSCSError


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """train.device -> a torch device; asking for a GPU on a machine without one is a one-line error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise FSCSError("config key 'train.device' is 'cuda' but this machine has no usable CUDA GPU "
                        "(torch.cuda.is_available() is False); set train.device=cpu (or auto), or run on a "
                        "GPU node")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if env.local_rank >= torch.cuda.device_count():
        raise FSCSError(f"local rank {env.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                        "start at most one process per GPU (torchrun --nproc_per_node, --gpus-per-node)")
    return torch.device(f"cuda:{env.local_rank}")


def resolve_precision(name: str, device: torch.device) -> str:
    """train.precision -> fp32 | bf16: `auto` is bf16 on a CUDA device with bf16 support, else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"

"""DeepSpeed engine: deepspeed.initialize over the head only (ZeRO 0/1/2, bf16), safe loads."""
from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from fscs.config import TrainConfig
from fscs.distributed import DistEnv
from fscs.engine.base import Engine, build_optimizer, build_schedule, follow_config
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

TAG = "deepspeed"

# Classes DeepSpeed pickles into its ZeRO optimizer files; reconstructing them runs none of the file's code.
SAFE_GLOBAL_NAMES = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def safe_globals() -> list[Any]:
    """The allow-listed DeepSpeed classes (those importable in this DeepSpeed version)."""
    import importlib

    found = []
    for name in SAFE_GLOBAL_NAMES:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            logger.debug("DeepSpeed class %s not found; not allow-listed", name)
    return found


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """torch.load(weights_only=True) with the allow-listed DeepSpeed classes: no code from the file runs."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FSCSError(f"DeepSpeed checkpoint file '{path}' is missing; delete the run's state/ folder to "
                        "restart, or resume with the same engine and number of processes") from None
    except Exception as exc:  # noqa: BLE001 - corrupt file or a disallowed (code-running) global
        text = str(exc).strip()
        code = re.search(r"Unsupported global: GLOBAL (\S+)", text)  # torch's last line is only a docs link
        reason = (f"it refers to {code.group(1)}, which is not an allow-listed data class" if code
                  else text.splitlines()[-1][:200] if text else type(exc).__name__)
        raise FSCSError(f"DeepSpeed checkpoint '{path}' is unreadable or unsafe ({reason}); delete it or pick "
                        "another run") from None


def _safe_checkpoint_engine(current: Any) -> Any:
    """A DeepSpeed TorchCheckpointEngine whose load() never unpickles arbitrary classes."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_torch_load(path, map_location=map_location)

    safe = SafeTorchCheckpointEngine(None)
    safe.zipfile_serialization = getattr(current, "zipfile_serialization", False)
    return safe


def unfused_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """id(model parameter) -> its fp32 master copy in DeepSpeed's unfused low-precision optimizer (what bf16
    with ZeRO stage 0 gets: fp16_groups / fp32_groups, which safe_get_full_fp32_param does not know); empty
    for any other optimizer."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not isinstance(low, list) or not isinstance(high, list):
        return {}
    return {id(p): m for lp, hp in zip(low, high) if isinstance(hp, list) for p, m in zip(lp, hp)
            if isinstance(m, torch.Tensor) and m.shape == p.shape}


def deepspeed_config(cfg: TrainConfig, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run: ZeRO stage, accumulation, bf16, client (torch) optimizer."""
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(cfg.grad_accum),
        "zero_optimization": {"stage": int(cfg.zero_stage)},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def _broadcast_handles_scalars() -> Iterator[None]:
    """While deepspeed.initialize runs: its initial broadcast of the parameters views each one as bytes, which
    raises on a 0-dim parameter (the mixed head's enhancer.prior_scale); broadcast those as 1-element views
    of the same storage instead (nothing else about the parameters changes)."""
    from deepspeed.runtime.engine import DeepSpeedEngine as Wrapped

    original = getattr(Wrapped, "_broadcast_model", None)
    if original is None:  # another DeepSpeed layout: nothing to adapt
        yield
        return

    def broadcast(self: Any) -> None:
        scalars = [(p, p.data) for p in self.module.parameters() if p.dim() == 0]
        for p, data in scalars:
            p.data = data.view(1)
        try:
            original(self)
        finally:
            for p, data in scalars:
                p.data = data

    Wrapped._broadcast_model = broadcast
    try:
        yield
    finally:
        Wrapped._broadcast_model = original


def check_accelerator(accelerator: str | None, device: torch.device, setting: str) -> None:
    """DeepSpeed moves the head to its accelerator (DS_ACCELERATOR, else what it detects): refuse one that is
    not the run's device (the backbone's features would be elsewhere; DS_ACCELERATOR='' fails its import)."""
    if accelerator is None or accelerator == device.type:
        return
    raise FSCSError(f"DeepSpeed's accelerator is {accelerator!r} (environment variable DS_ACCELERATOR, or "
                    f"detected) but this run trains on {device.type} (train.device={setting}); set "
                    f"DS_ACCELERATOR={device.type}, or unset it and pick train.device to match")


def _ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group; a single process gets a private one-member group (nccl on CUDA)."""
    if dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedEngine(Engine):
    """The head inside a DeepSpeed engine; the frozen backbone stays outside (never partitioned or saved).

    DeepSpeed owns gradient accumulation (gradient_accumulation_steps = train.grad_accum: backward scales
    the loss, step() only updates at the boundary), ZeRO partitioning and bf16 master weights.
    """

    name = "deepspeed"

    def __init__(self, head: nn.Module, cfg: TrainConfig, env: DistEnv, device: torch.device,
                 total_steps: int | None = None, micro_batch: int = 1) -> None:
        check_accelerator(os.environ.get("DS_ACCELERATOR"), device, cfg.device)  # before import: "" breaks it
        try:
            import deepspeed
        except ImportError as exc:  # not installed, or a broken install (a missing dependency of its own)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FSCSError(f"config key 'train.engine' is 'deepspeed' but the deepspeed package does not "
                            f"import ({first}); install it (the version pyproject.toml pins) or set "
                            "train.engine=ddp") from None

        from deepspeed.accelerator import get_accelerator

        check_accelerator(get_accelerator().device_name(), device, cfg.device)
        if cfg.zero_stage not in (0, 1, 2):
            raise FSCSError(f"config key 'train.zero_stage' is {cfg.zero_stage}; use 0, 1 or 2 (the head is "
                            "small: ZeRO-3 parameter partitioning is not supported)")
        _ensure_process_group(device)
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # DeepSpeed asserts it (no torchrun)
        self.env, self.device, self.precision = env, device, cfg.precision
        self.grad_accum = int(cfg.grad_accum)
        self.head = head.to(device)
        optimizer = build_optimizer([p for p in self.head.parameters() if p.requires_grad], cfg)
        total = total_steps if total_steps is not None else cfg.epochs * cfg.steps_per_epoch
        self.cfg, self.total_steps = cfg, total

        def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return build_schedule(opt, cfg, total)

        with _broadcast_handles_scalars():
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.head, optimizer=optimizer, lr_scheduler=schedule,
                config=deepspeed_config(cfg, micro_batch), dist_init_required=False)
        self.ds.checkpoint_engine = _safe_checkpoint_engine(self.ds.checkpoint_engine)
        self.module: nn.Module = self.ds
        self.stepped = False
        logger.info("DeepSpeed engine: ZeRO stage %d, %s, grad_accum %d, %d process(es)", cfg.zero_stage,
                    cfg.precision, self.grad_accum, env.world_size)

    def step(self, loss: torch.Tensor) -> bool:
        """engine.backward + engine.step; DeepSpeed updates (and steps the schedule) at the boundary only."""
        boundary = bool(self.ds.is_gradient_accumulation_boundary())
        self.ds.backward(loss)
        self.ds.step()
        self.stepped = boundary
        return boundary

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def save(self, directory: Path) -> None:
        """Collective DeepSpeed save (every rank writes its ZeRO partition) under directory/deepspeed/."""
        ok = self.ds.save_checkpoint(str(directory), tag=TAG, client_state={}, save_latest=False,
                                     exclude_frozen_parameters=True)
        if ok is False:
            raise FSCSError(f"DeepSpeed could not save a checkpoint under '{directory}'; check the free "
                            "disk space")

    def load(self, directory: Path) -> None:
        """Collective DeepSpeed load of head, optimizer (ZeRO partitions) and schedule."""
        path, _ = self.ds.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise FSCSError(f"no DeepSpeed checkpoint under '{directory / TAG}'; delete the run's state/ "
                            "folder to restart, or resume with train.engine=ddp if it was trained with DDP")
        follow_config(self.scheduler, self.cfg, self.total_steps)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 head weights: DeepSpeed's ZeRO/bf16 master copies when it keeps them (collective), else
        the module's. bf16 with ZeRO-0 keeps its masters where safe_get_full_fp32_param does not look: without
        them the exported head would be the bf16-rounded module, not the weights training continues from."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = super().head_state_dict()
        masters = unfused_masters(self.ds.optimizer)
        for name, param in self.head.named_parameters():
            full = safe_get_full_fp32_param(param)
            if full is None:
                full = masters.get(id(param))
            if full is not None:
                state[name] = full.detach().float().cpu().clone()
        return state

"""Resumable checkpoints: one directory per save, written by every rank, published by an atomic pointer.

Layout under RUN/state/:  latest (text: the published directory name), step-00000040/ {trainer.pt (rank 0:
counters, data position, config, backbone identity), rng-r00000.pt (one per rank: python/numpy/torch RNGs),
engine/ (the engine's own files: DDP engine.pt, DeepSpeed's model/ZeRO files)}. A save goes into a fresh
step directory and `latest` is replaced (write + fsync + rename) only after every rank finished writing, so
a process killed during a save leaves the previous checkpoint published and loadable.
"""
from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fscs.atomic import fsync_dir, write_atomic_with, write_text_atomic
from fscs.distributed import DistEnv, barrier
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

STATE_DIR = "state"
LATEST = "latest"
TRAINER_FILE = "trainer.pt"
ENGINE_DIR = "engine"


def save_checkpoint(path: Path, obj: Any) -> None:
    """torch.save `obj` to `path` atomically and durably (temp file in the same folder, fsync, rename): a
    killed save leaves the previous file intact."""
    write_atomic_with(path, lambda fh: torch.save(obj, fh), durable=True)


def load_checkpoint(path: Path) -> Any:
    """A file written by save_checkpoint: tensors and plain data only (weights_only=True, no code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FSCSError(f"checkpoint file '{path}' is missing; delete its run's state/ folder to restart, "
                        "or pick another run") from None
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, or holding code objects
        save = Path(path).parent
        fix = (f"write the name of an older save in {save.parent / LATEST} to resume from it "
               f"(ls {save.parent}), or delete {save.parent} to restart the run from scratch"
               if save.name.startswith("step-") and save.parent.name == STATE_DIR else "delete it")
        raise FSCSError(f"checkpoint '{path}' is unreadable or unsafe ({type(exc).__name__}); {fix} or pick "
                        "another run") from None


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU + CUDA) generator states, as tensors and plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of capture_rng."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    return f"rng-r{rank:05d}.pt"


class CheckpointStore:
    """The resumable checkpoints of one run directory (see the module docstring for the layout)."""

    def __init__(self, run_dir: Path, env: DistEnv, keep: int = 2) -> None:
        self.root = Path(run_dir) / STATE_DIR
        self.env = env
        self.keep = max(1, int(keep))

    def latest(self) -> Path | None:
        """The published checkpoint directory, or None when the run has none."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not name or not (path / TRAINER_FILE).is_file():
            raise FSCSError(f"'{pointer}' names '{name}', which has no {TRAINER_FILE}; delete '{self.root}' "
                            "to restart the run from scratch")
        return path

    def begin(self, step: int) -> Path:
        """A fresh, empty directory for the save of `step` (a leftover of a killed save is removed first)."""
        path = self.root / f"step-{step:08d}"
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():
                shutil.rmtree(path)
            path.mkdir()
        barrier()
        return path

    def publish(self, path: Path) -> None:
        """After every rank wrote its part: point `latest` at `path` (atomically), then prune old saves."""
        barrier()
        if not self.env.is_main:
            return
        fsync_dir(path)
        write_text_atomic(self.root / LATEST, path.name + "\n", durable=True)
        saves = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in saves:
            if old.name < path.name and old not in saves[-self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
            elif old.name > path.name:  # a stale save from a later step of an abandoned attempt
                shutil.rmtree(old, ignore_errors=True)


RESUME_MUST_MATCH = ("model.backbone", "model.image_size", "data.fold", "train.regime", "train.engine",
                     "train.zero_stage", "train.optimizer", "model.enhancer_channels")
"""Keys whose change makes a checkpoint unusable (other features, classes, state layout): an error."""
DEEPSPEED_MUST_MATCH = ("train.precision",)
"""Also refused for DeepSpeed: bf16 and fp32 runs save other optimizer files (bf16 master copies, loss
scaler)."""
RESUME_FREE = ("name", "out_dir", "data.shards", "train.epochs", "train.log_every", "train.image_every",
               "train.save_every", "train.keep_checkpoints", "train.stop_after_steps", "train.val_episodes")
"""Keys a resumed run may change freely (bench.* too); any other change only breaks bitwise exactness."""


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(key: str, patterns: Sequence[str]) -> bool:
    """Whether `key` is one of `patterns` or lies under one ending in '.' (a whole section)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def compare_configs(old: dict[str, Any], new: dict[str, Any], *, what: str, must_match: Sequence[str],
                    free: Sequence[str], skip: Sequence[str] = ()) -> list[str]:
    """Compare the flattened config a checkpoint was made with (`old`) and the current one (`new`).

    A changed key matching `must_match` (keys, or sections ending in '.'; checked in that order, keys sorted
    within each) is a one-line FSCSError naming `what`, the key and the fix. Changed keys matching none of
    `must_match`, `free` and `skip` come back as warnings, sorted; `skip` keys are neither refused nor warned.
    """
    for pattern in must_match:
        for key in sorted(k for k in old if _matches(k, (pattern,)) and not _matches(k, skip)):
            if old[key] != new.get(key):
                raise FSCSError(f"{what} was made with {key}={old[key]!r}, but the config says {new.get(key)!r}; "
                                f"set {key}={old[key]} to resume it, or start a new run (another name= or "
                                "out_dir=)")
    return [f"{key} changed from {old[key]!r} to {new[key]!r}" for key in sorted(old)
            if key in new and old[key] != new[key] and not _matches(key, (*must_match, *free, *skip))]


def check_resume(state: dict[str, Any], config: dict[str, Any], *, dataset: str, world_size: int,
                 where: Path, index_sha256: str | None = None) -> list[str]:
    """Refuse a checkpoint another configuration made (one-line FSCSError naming key and fix); return warnings
    for changes that still load but make the resumed run differ from an uninterrupted one.

    `dataset` and `index_sha256` identify the shards data.shards points at now (ShardIndex.dataset, .sha256).
    """
    old, new = flat_config(state.get("config", {})), flat_config(config)
    step = state.get("step", "?")
    if state.get("dataset") not in (None, dataset):
        raise FSCSError(f"checkpoint '{where}' (step {step}) was trained on dataset '{state['dataset']}', "
                        f"but data.shards holds '{dataset}'; point data.shards at the original shards or "
                        "start a new run (another name= or out_dir=)")
    warnings = []
    if index_sha256 and state.get("index_sha256") not in (None, index_sha256):
        warnings.append(f"data.shards' index.json differs from the one the checkpoint was trained with "
                        f"(sha256 {state['index_sha256'][:12]} vs {index_sha256[:12]}): the shards were "
                        "rebuilt or replaced, so the resumed run reads other data")
    no_enhancer = () if old.get("train.regime") == "mixed" else ("model.enhancer_channels",)  # weak/full heads
    must_match = RESUME_MUST_MATCH + (DEEPSPEED_MUST_MATCH if old.get("train.engine") == "deepspeed" else ())
    warnings += compare_configs(old, new, what=f"checkpoint '{where}' (step {step})", must_match=must_match,
                                free=(*RESUME_FREE, "bench."), skip=no_enhancer)
    length = [c.get("train.epochs", 0) * c.get("train.steps_per_epoch", 0) for c in (old, new)]
    if new.get("train.schedule") == "cosine" and length[0] != length[1]:
        warnings.append(f"the cosine schedule's length changes from {length[0]} to {length[1]} steps: the "
                        "learning rate follows the new length from this step on")
    saved_ws = int(state.get("world_size", world_size))
    if saved_ws != world_size:
        if new.get("train.engine") == "deepspeed" and new.get("train.zero_stage", 0):
            raise FSCSError(f"checkpoint '{where}' holds ZeRO-{new['train.zero_stage']} optimizer partitions "
                            f"of {saved_ws} processes, but this job has {world_size}; resume with {saved_ws} "
                            "processes (or train.zero_stage=0 runs)")
        warnings.append(f"{saved_ws} processes wrote it, this job has {world_size} (the data stream differs)")
    return warnings

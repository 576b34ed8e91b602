"""Typed run configuration: dataclass defaults, YAML files and `key=value` overrides (unknown keys are errors)."""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

REGIMES = ("weak", "full")
PRECISIONS = ("fp32", "bf16")
ENGINES = ("ddp",)
OPTIMIZERS = ("adam", "adamw")


@dataclass
class DataConfig:
    """Where episodes come from and how they are shaped."""

    shards: str = "data/synthetic-5i"
    """Shard directory written by `fscs shards ...` (holds index.json)."""
    fold: int = 0
    """Test fold: its classes are never seen in training."""
    way: int = 1
    """N classes per training episode (the reference trains 1-way)."""
    shot: int = 1
    """K support images per class in training episodes."""
    batch_size: int = 12
    """Episodes per optimizer step, per rank."""
    num_workers: int = 1
    """Loader worker processes per rank (0 = read in the training process)."""
    buffer_per_class: int = 64
    """Recent images kept per training class to draw supports from."""


@dataclass
class ModelConfig:
    """The frozen backbone, the pseudo-mask rule and the input size."""

    backbone: str = "fscs_vit_tiny_patch8"
    """Registry name in fscs.model.backbone.BACKBONES."""
    weights: str | None = None
    """Local weights file (DINO .pth, timm .pth/.safetensors); null = random init."""
    image_size: int = 128
    """Square input size of the backbone (the reference uses 400 for ViT-S/8)."""
    mask_rule: str = "reference"
    """Pseudo-mask rule of fscs.model.distill (reference = the CST rule)."""
    mask_threshold: float = 0.4
    """Threshold of the reference rule on (cos + 1) / 2."""


@dataclass
class TrainConfig:
    """Optimisation and logging of the head."""

    regime: str = "weak"
    """weak (image-level labels, pseudo-masks) or full (ground-truth masks)."""
    epochs: int = 4
    steps_per_epoch: int = 50
    """Fixed on every rank, so no rank waits at an epoch end."""
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    cls_weight: float = 0.1
    """Weight of the classification loss (the segmentation loss has weight 1)."""
    loss_ignore_boundary: bool = False
    """False = boundary pixels (255) count as background in the loss, as in the reference."""
    precision: str = "fp32"
    """fp32 or bf16 (autocast)."""
    engine: str = "ddp"
    seed: int = 0
    log_every: int = 10
    """Steps between TensorBoard scalar writes."""


@dataclass
class BenchConfig:
    """Evaluation episodes and metric conventions."""

    settings: list[str] = field(default_factory=lambda: ["1w1s", "2w1s"])
    """Way/shot settings, written `<N>w<K>s`."""
    episodes: int = 1000
    seed: int = 0
    role: str = "test"
    """Which entry lists to draw episodes from: test (the fold's classes) or select (validation)."""
    ignore_boundary: bool = True
    """True = 255 pixels excluded from metrics; False = counted as background (reference code)."""
    batch_size: int = 8
    bootstrap: int = 1000
    """Bootstrap resamples for the 95 % confidence intervals (0 = none)."""


@dataclass
class RunConfig:
    """Everything a run needs; written resolved into every run directory as config.yaml."""

    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        if is_dataclass(f.type) or (isinstance(f.default_factory, type) and is_dataclass(f.default_factory)):
            keys += _valid_keys(f.default_factory, prefix + f.name + ".")  # type: ignore[arg-type]
        else:
            keys.append(prefix + f.name)
    return keys


def _one_line(exc: OmegaConfBaseException, source: str) -> FSCSError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    if isinstance(exc, ConfigKeyError) or "not in struct" in msg or "' not in '" in msg:
        valid = _valid_keys(RunConfig)
        near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5) or [
            k for k in valid if k.startswith(key.split(".")[0] + ".")
        ][:8] or sorted({k.split(".")[0] for k in valid})
        return FSCSError(f"unknown config key '{key}' in {source}; did you mean: {', '.join(near)}")
    return FSCSError(f"bad value for config key '{key}' in {source}: {msg}")


def _validate(cfg: RunConfig) -> None:
    checks = [
        ("train.regime", cfg.train.regime, REGIMES),
        ("train.precision", cfg.train.precision, PRECISIONS),
        ("train.engine", cfg.train.engine, ENGINES),
        ("train.optimizer", cfg.train.optimizer, OPTIMIZERS),
        ("bench.role", cfg.bench.role, ("test", "select")),
    ]
    for key, value, allowed in checks:
        if value not in allowed:
            raise FSCSError(f"config key '{key}' is '{value}'; use one of: {', '.join(allowed)}")
    for s in cfg.bench.settings:
        parse_setting(s)
    if cfg.data.way < 1 or cfg.data.shot < 1:
        raise FSCSError("config keys 'data.way' and 'data.shot' must be >= 1")


def parse_setting(setting: str) -> tuple[int, int]:
    """'2w1s' -> (2, 1)."""
    s = setting.strip().lower()
    try:
        way, shot = s.rstrip("s").split("w")
        return int(way), int(shot)
    except ValueError:
        raise FSCSError(f"bad setting '{setting}' in bench.settings; write it like 1w1s or 2w5s") from None


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, base_cfg: RunConfig | None = None
) -> RunConfig:
    """Defaults (or base_cfg) <- YAML file <- `key=value` overrides; returns a validated RunConfig."""
    base = OmegaConf.structured(base_cfg if base_cfg is not None else RunConfig)
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise FSCSError(f"config file '{p}' not found; pass an existing YAML (see configs/)")
            base = OmegaConf.merge(base, OmegaConf.load(p))
    except OmegaConfBaseException as exc:
        raise _one_line(exc, str(path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise FSCSError(f"override '{item}' is not key=value (example: train.lr=5e-4)")
        try:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _one_line(exc, f"override '{item}'") from None
    cfg: RunConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return asdict(cfg)


def config_from_dict(data: dict) -> RunConfig:
    """Rebuild a RunConfig from the dict stored in a checkpoint or config.yaml."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))
    except OmegaConfBaseException as exc:
        raise _one_line(exc, "stored config") from None
    return cfg  # type: ignore[return-value]


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)
    return path

"""Typed run configuration: dataclass defaults, YAML files and `key=value` overrides (unknown keys are errors)."""
from __future__ import annotations

import difflib
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fscs.atomic import write_text_atomic
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

REGIMES = ("weak", "full", "mixed")
PRECISIONS = ("auto", "fp32", "bf16")
ENGINES = ("ddp", "deepspeed")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("constant", "cosine")
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
    """Recent images kept per training class to draw supports from (as their encoded shard bytes)."""
    balance_presence: bool = False
    """Reorder training episodes so each batch holds as many present as absent (episode, class) pairs
    (fscs.data.balance): the same episodes, fewer label-count swings in the classifier's gradient."""


@dataclass
class ModelConfig:
    """The frozen backbone, the pseudo-mask rule and the input size."""

    backbone: str = "fscs_vit_mini_patch8"
    """Registry name in fscs.model.backbone_specs.BACKBONES."""
    weights: str | None = "asset:fscs_vit_mini_patch8.safetensors"
    """Local weights file (DINO .pth, timm .pth/.safetensors), `asset:NAME` for a file shipped in fscs/assets
    (the default: the self-supervised offline backbone, pretrained without fold 0's classes); null = random init."""
    image_size: int = 128
    """Square input size of the backbone (the reference uses 400 for ViT-S/8)."""
    mask_rule: str = "otsu_border"
    """Pseudo-mask rule of fscs.model.distill: reference = the CST rule (use it with DINO weights);
    otsu_border = per-image Otsu cut with border polarity (the shipped backbone's rule)."""
    mask_threshold: float = 0.4
    """Threshold of the reference rule on (cos + 1) / 2."""
    enhancer_channels: int = 128
    """Width of the mixed regime's pseudo-mask enhancer (conv h->C->C->1, 3x3; see docs/mixed.md)."""


@dataclass
class TrainConfig:
    """Optimisation and logging of the head."""

    regime: str = "weak"
    """weak (image-level labels, pseudo-masks), full (ground-truth masks) or mixed (weak + GT masks for
    train.gt_fraction of the training images, learned enhancer for the rest)."""
    gt_fraction: float = 0.0
    """mixed only: share of training images whose GT mask is used, chosen by hash of (train.seed, key)."""
    enhancer_weight: float = 1.0
    """mixed only: weight of the enhancer loss (BCE + Dice on GT images) added to the head loss."""
    epochs: int = 4
    steps_per_epoch: int = 150
    """Fixed on every rank, so no rank waits at an epoch end. The default 4 x 150 steps is the least that
    reliably gets the offline default's weak classifier off chance (benchmarks/quality/CLS_PLATEAU.md)."""
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    cls_weight: float = 0.1
    """Weight of the classification loss (the segmentation loss has weight 1)."""
    seg_fg_weight: float = 1.0
    """Weight of the foreground class in the segmentation CE (1 = the reference's unweighted CE)."""
    loss_ignore_boundary: bool = False
    """False = boundary pixels (255) count as background in the loss, as in the reference."""
    precision: str = "auto"
    """auto, fp32 or bf16 (autocast with ddp; DeepSpeed's bf16 mode with deepspeed). Never fp16. auto = bf16
    on a CUDA GPU that supports it, else fp32 (on CPU bf16 is opt-in: faster on AMX CPUs, see docs/perf.md);
    the run directory's config.yaml records the resolved value."""
    engine: str = "ddp"
    """ddp (torch DistributedDataParallel) or deepspeed; either wraps the head only (backbone frozen outside)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1 or 2 (engine=deepspeed only)."""
    grad_accum: int = 1
    """Micro-batches of data.batch_size per optimizer step (the engine owns the accumulation); one optimizer
    step = one train step, so an epoch reads steps_per_epoch * grad_accum batches per rank."""
    schedule: str = "constant"
    """Learning-rate schedule over all optimizer steps: constant or cosine (to 0), after warmup_steps."""
    warmup_steps: int = 0
    """Linear warm-up optimizer steps (0 = none)."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when CUDA is visible, else cpu), cpu, or cuda (error when no GPU is visible)."""
    seed: int = 0
    image_every: int = 200
    """Steps between TensorBoard episode panels (query, GT, pseudo-mask, prediction); 0 = none."""
    log_every: int = 10
    """Steps between TensorBoard scalar writes and train_log.jsonl lines."""
    save_every: int = 0
    """Also checkpoint every N optimizer steps (0 = only at epoch ends and on SIGUSR1/SIGTERM/SIGUSR2)."""
    keep_checkpoints: int = 2
    """Resumable checkpoints kept under RUN/state (the newest ones; at least 1)."""
    stop_after_steps: int = 0
    """Checkpoint and stop once this many optimizer steps are done in total (0 = run all epochs); a later
    run resumes from there (time-boxed jobs, resume tests)."""
    val_episodes: int = 0
    """Model selection: select-role episodes (training classes' held-out images, never the test fold)
    evaluated after every epoch; the best epoch is kept as best.pt (0 = off)."""


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


def dataclass_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a nested config dataclass, dotted ('train.lr', ...), for 'did you mean' hints."""
    keys = []
    for f in fields(cls):
        if is_dataclass(f.type) or (isinstance(f.default_factory, type) and is_dataclass(f.default_factory)):
            keys += dataclass_keys(f.default_factory, prefix + f.name + ".")  # type: ignore[arg-type]
        else:
            keys.append(prefix + f.name)
    return keys


def _one_line(exc: OmegaConfBaseException, source: str, schema: type, what: str = "config") -> FSCSError:
    """An OmegaConf error -> one line naming the key, where it came from, and the fix."""
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    if "issing mandatory value" in msg:
        return FSCSError(f"{what} key '{key}' is required in {source}; add `{key}: ...`")
    if isinstance(exc, ConfigKeyError) or "not in struct" in msg or "' not in '" in msg:
        valid = dataclass_keys(schema)
        near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5) or [
            k for k in valid if k.startswith(key.split(".")[0] + ".")
        ][:8] or sorted({k.split(".")[0] for k in valid})
        return FSCSError(f"unknown {what} key '{key}' in {source}; did you mean: {', '.join(near)}")
    return FSCSError(f"bad value for {what} key '{key}' in {source}: {msg}")


def load_structured(schema: Any, path: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
                    what: str = "config", example: str = "train.lr=5e-4",
                    not_found: str = "pass an existing YAML (see configs/)") -> Any:
    """Structured defaults (a config dataclass or an instance of one) <- YAML file <- `key=value` overrides.

    Returns the dataclass object. An unknown, missing or mistyped key, a missing file or an override without
    '=' is a one-line FSCSError naming `what`, the key, its source (file or override) and the fix. Used by
    every YAML-configured entry point (train/bench config, pretrain config, benchmark suites).
    """
    schema_type = schema if isinstance(schema, type) else type(schema)
    cfg = OmegaConf.structured(schema)
    source = "the defaults"
    try:
        if path is not None:
            source = str(path)
            if not Path(path).is_file():
                raise FSCSError(f"{what} file '{path}' {'is a directory' if Path(path).is_dir() else 'not found'}; "
                                f"{not_found}")
            try:
                loaded = OmegaConf.load(path)
            except (UnicodeDecodeError, PermissionError) as exc:  # a UTF-16/Latin-1 file, a binary, no access
                raise FSCSError(f"{what} file '{path}' cannot be read as UTF-8 YAML "
                                f"({getattr(exc, 'reason', None) or exc.strerror or exc}); save it as UTF-8 "
                                f"text or {not_found}") from None
            cfg = OmegaConf.merge(cfg, loaded)
        for item in overrides or []:
            source = f"override '{item}'"
            if "=" not in item:
                raise FSCSError(f"override '{item}' is not key=value (example: {example})")
            if not item.partition("=")[2].strip():  # `model.weights=$W` with W unset: not a silent null
                raise FSCSError(f"override '{item}' has no value; write {item.partition('=')[0]}=null for none "
                                "(an unset shell variable?)")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _one_line(exc, source, schema_type, what) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise FSCSError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}); fix the file "
                        "(see configs/ for examples)") from None


def check_finite(cfg: Any, what: str = "config", prefix: str = "") -> None:
    """Every float key of a config dataclass is a finite number: `nan` and `inf` pass OmegaConf's type check and
    every `< 0` test, then turn the loss (lr, weights) or a threshold into NaN silently."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            check_finite(value, what, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise FSCSError(f"{what} key '{prefix}{f.name}' is {value}; it must be a finite number")


def _validate(cfg: RunConfig) -> None:
    check_finite(cfg)
    checks = [
        ("train.regime", cfg.train.regime, REGIMES),
        ("train.precision", cfg.train.precision, PRECISIONS),
        ("train.engine", cfg.train.engine, ENGINES),
        ("train.optimizer", cfg.train.optimizer, OPTIMIZERS),
        ("train.device", cfg.train.device, DEVICES),
        ("train.schedule", cfg.train.schedule, SCHEDULES),
        ("train.zero_stage", str(cfg.train.zero_stage), ("0", "1", "2")),
        ("bench.role", cfg.bench.role, ("test", "select")),
    ]
    for key, value, allowed in checks:
        if value not in allowed:
            raise FSCSError(f"config key '{key}' is '{value}'; use one of: {', '.join(allowed)}")
    b = cfg.bench
    if not b.settings:
        raise FSCSError("config key 'bench.settings' is empty; list at least one setting, e.g. "
                        "bench.settings=[1w1s,2w1s]")
    parsed = [parse_setting(s) for s in b.settings]
    twice = next((s for i, s in enumerate(b.settings) if parsed[i] in parsed[:i]), None)
    if twice is not None:
        raise FSCSError(f"config key 'bench.settings' lists {twice} twice; list each setting once")
    if not cfg.name or cfg.name in (".", "..") or any(c in cfg.name for c in "/\\"):
        raise FSCSError(f"config key 'name' is {cfg.name!r}; a run name is one folder under out_dir "
                        "(no '/'), e.g. name=weak_f0 (put the folder path in out_dir)")
    if not 0.0 <= cfg.model.mask_threshold <= 1.0:
        raise FSCSError(f"config key 'model.mask_threshold' is {cfg.model.mask_threshold}; the reference "
                        "rule thresholds the map scaled to [0, 1], so it must lie in [0, 1] (default 0.4)")
    if cfg.data.way < 1 or cfg.data.shot < 1:
        raise FSCSError("config keys 'data.way' and 'data.shot' must be >= 1")
    d = cfg.data
    for key, value, least in (("bench.episodes", b.episodes, 1), ("bench.batch_size", b.batch_size, 1),
                              ("bench.bootstrap", b.bootstrap, 0), ("bench.seed", b.seed, 0),
                              ("data.batch_size", d.batch_size, 1), ("data.num_workers", d.num_workers, 0),
                              ("model.image_size", cfg.model.image_size, 16),
                              ("train.epochs", cfg.train.epochs, 1), ("train.seed", cfg.train.seed, 0),
                              ("train.grad_accum", cfg.train.grad_accum, 1),
                              ("train.steps_per_epoch", cfg.train.steps_per_epoch, 1),
                              ("train.keep_checkpoints", cfg.train.keep_checkpoints, 1),
                              ("train.log_every", cfg.train.log_every, 1)):
        if value < least:
            raise FSCSError(f"config key '{key}' is {value}; it must be >= {least}")
    if d.buffer_per_class <= d.shot:
        raise FSCSError(f"config key 'data.buffer_per_class' is {d.buffer_per_class}; it must exceed data.shot "
                        f"({d.shot}): the supports of a class come from its buffer, the query excluded")
    if not cfg.train.lr > 0 or cfg.train.weight_decay < 0 or cfg.train.cls_weight < 0:
        raise FSCSError(f"config keys 'train.lr' ({cfg.train.lr}) must be > 0, 'train.weight_decay' "
                        f"({cfg.train.weight_decay}) and 'train.cls_weight' ({cfg.train.cls_weight}) >= 0")
    t = cfg.train
    for key, value in (("save_every", t.save_every), ("stop_after_steps", t.stop_after_steps),
                       ("val_episodes", t.val_episodes), ("warmup_steps", t.warmup_steps),
                       ("image_every", t.image_every)):
        if value < 0:
            raise FSCSError(f"config key 'train.{key}' is {value}; it must be >= 0 (0 = off)")
    if t.zero_stage and t.engine != "deepspeed":
        raise FSCSError(f"config key 'train.zero_stage' is {t.zero_stage} but train.engine is '{t.engine}'; "
                        "set train.engine=deepspeed or train.zero_stage=0")
    if cfg.train.regime == "mixed" and not 0.0 < cfg.train.gt_fraction <= 1.0:
        raise FSCSError(f"config key 'train.gt_fraction' is {cfg.train.gt_fraction}; train.regime=mixed "
                        "needs 0 < gt_fraction <= 1 (e.g. train.gt_fraction=0.05)")
    if cfg.train.regime != "mixed" and cfg.train.gt_fraction != 0.0:
        raise FSCSError(f"config key 'train.gt_fraction' is {cfg.train.gt_fraction} but train.regime is "
                        f"'{cfg.train.regime}'; set train.regime=mixed or drop train.gt_fraction")
    if cfg.train.seg_fg_weight <= 0:
        raise FSCSError(f"config key 'train.seg_fg_weight' is {cfg.train.seg_fg_weight}; it must be > 0 "
                        "(1 = the reference's unweighted CE)")
    if cfg.model.enhancer_channels < 1 or cfg.train.enhancer_weight < 0:
        raise FSCSError("config keys 'model.enhancer_channels' (>= 1) and 'train.enhancer_weight' (>= 0) "
                        "are invalid")


SETTING = re.compile(r"([1-9][0-9]*)w([1-9][0-9]*)s")


def parse_setting(setting: str) -> tuple[int, int]:
    """'2w1s' -> (2, 1): way >= 1 and shot >= 1."""
    m = SETTING.fullmatch(str(setting).strip().lower())
    if m is None:
        raise FSCSError(f"bad setting '{setting}' in bench.settings; write it <way>w<shot>s with way, "
                        "shot >= 1, like 1w1s or 2w5s")
    return int(m.group(1)), int(m.group(2))


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, base_cfg: RunConfig | None = None
) -> RunConfig:
    """Defaults (or base_cfg) <- YAML file <- `key=value` overrides; returns a validated RunConfig."""
    cfg: RunConfig = load_structured(base_cfg if base_cfg is not None else RunConfig, path, overrides)
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return asdict(cfg)


def config_from_dict(data: dict) -> RunConfig:
    """Rebuild a RunConfig from the dict stored in a checkpoint or config.yaml."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))
    except OmegaConfBaseException as exc:
        raise _one_line(exc, "stored config", RunConfig) from None
    return cfg  # type: ignore[return-value]


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return path

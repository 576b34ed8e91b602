"""Typed configuration of `fscs pretrain` (configs/pretrain.yaml + `key=value` overrides)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fscs.config import check_finite, load_structured
from fscs.errors import FSCSError


@dataclass
class PretrainData:
    shards: str = "data/synthetic-5i"
    """Shard directory (any `fscs shards` output); its images are read into memory."""
    split: str = "trn"
    exclude_folds: list[int] = field(default_factory=list)
    """Drop every image holding a class of these folds (their classes stay novel to the backbone)."""
    max_images: int = 0
    """Use at most this many images (0 = all)."""
    load_size: int = 0
    """Resize every image to load_size x load_size when it is read (bilinear, antialiased: the evaluation resize);
    needed for shards whose images differ in size (PASCAL, COCO, your own folder). 0 = keep the stored size
    (all images must then share one, as synthetic-5i's do)."""


@dataclass
class PretrainModel:
    backbone: str = "fscs_vit_tiny_patch8"
    """Registry name in fscs.model.backbone_specs.BACKBONES (no register tokens)."""
    image_size: int = 96
    """Global-crop (and label-view) size; FrozenBackbone resamples pos_embed for other sizes."""
    drop_path: float = 0.0


@dataclass
class PretrainDino:
    weight: float = 1.0
    """Weight of the DINO loss (0 = no self-distillation: no crops, no projection head)."""
    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    global_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    """Area range of the second global crop (the first global view is the whole image)."""
    local_crops: int = 4
    local_size: int = 48
    local_scale: list[float] = field(default_factory=lambda: [0.08, 0.35])
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 300
    center_momentum: float = 0.9
    momentum: float = 0.996
    """Teacher EMA momentum at step 0; cosine schedule to 1.0."""
    freeze_prototypes_steps: int = 0


@dataclass
class PretrainLabels:
    fold: int | None = None
    """Add the label objective on the training classes of this fold (null = labels unused)."""
    weight: float = 1.0
    """Weight of the per-token mask term (CLS-key cosine vs the local class evidence)."""
    mil_weight: float = 1.0
    mask_offset: float = -0.2
    """Cosine where the soft mask is 0.5 (-0.2 = the reference rule's threshold 0.4 on (cos + 1) / 2)."""
    mask_temperature: float = 0.1
    topk: float = 0.1
    """Fraction of tokens the multiple-instance pooling of the evidence net averages."""
    normalize_target: str = "none"
    """none | max | minmax: per-image normalisation of each present class's evidence map (evidence_target)."""
    evidence_width: int = 64


@dataclass
class PretrainAugment:
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.5
    """Max hue rotation as a fraction of the colour circle."""
    hue_prob: float = 0.8
    grayscale_prob: float = 0.1


@dataclass
class PretrainOptim:
    steps: int = 2000
    batch_size: int = 32
    """Images per step per rank."""
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    clip_grad: float = 3.0
    precision: str = "fp32"
    """fp32 or bf16 (autocast)."""
    seed: int = 0


@dataclass
class PretrainConfig:
    name: str = "pretrain"
    out_dir: str = "runs"
    export: str | None = None
    """Where the teacher backbone goes (a .safetensors file; default RUN_DIR/backbone.safetensors)."""
    log_every: int = 10
    image_every: int = 200
    """Steps between attention-map images in TensorBoard (0 = never)."""
    ckpt_every: int = 200
    stop_at: int = 0
    """Stop (with a checkpoint, no export) once this global step is done, as if interrupted (0 = never)."""
    data: PretrainData = field(default_factory=PretrainData)
    model: PretrainModel = field(default_factory=PretrainModel)
    dino: PretrainDino = field(default_factory=PretrainDino)
    labels: PretrainLabels = field(default_factory=PretrainLabels)
    augment: PretrainAugment = field(default_factory=PretrainAugment)
    optim: PretrainOptim = field(default_factory=PretrainOptim)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def export_path(self) -> Path:
        return Path(self.export) if self.export else self.run_dir / "backbone.safetensors"


def load_pretrain_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None
                         ) -> PretrainConfig:
    """Defaults <- YAML <- `key=value` overrides; unknown keys and bad values raise a one-line FSCSError."""
    out: PretrainConfig = load_structured(PretrainConfig, path, overrides, what="pretrain config",
                                          example="optim.steps=500", not_found="pass configs/pretrain.yaml")
    if out.optim.precision not in ("fp32", "bf16"):
        raise FSCSError(f"pretrain config key 'optim.precision' is '{out.optim.precision}'; use fp32 or bf16")
    check_finite(out, "pretrain config")
    _check_values(out)
    if out.dino.weight <= 0 and out.labels.fold is None:
        raise FSCSError("pretrain config: dino.weight is 0 and labels.fold is null, so nothing is learned; "
                        "set dino.weight > 0 or labels.fold")
    if out.export is not None and (not out.export.endswith(".safetensors") or Path(out.export).is_dir()):
        raise FSCSError(f"pretrain config key 'export' is '{out.export}'; name a .safetensors file (the loaders "
                        "read .safetensors by its suffix), e.g. export=backbones/mine.safetensors")
    return out


def _check_values(cfg: PretrainConfig) -> None:
    """Ranges the run relies on; a bad value is a one-line FSCSError naming the key (not a traceback mid-run,
    a NaN backbone or a random-init export)."""
    from fscs.model.backbone_specs import get_spec

    o, d, lab, a = cfg.optim, cfg.dino, cfg.labels, cfg.augment

    def need(key: str, value: Any, ok: bool, rule: str) -> None:
        if not ok:
            raise FSCSError(f"pretrain config key '{key}' is {value}; {rule}")

    for key, value, least in (("log_every", cfg.log_every, 1), ("ckpt_every", cfg.ckpt_every, 1),
                              ("optim.steps", o.steps, 1), ("optim.batch_size", o.batch_size, 1),
                              ("optim.seed", o.seed, 0), ("model.image_size", cfg.model.image_size, 16)):
        need(key, value, value >= least, f"it must be >= {least}")  # else a numpy/torch traceback mid-set-up
    patch = get_spec(cfg.model.backbone).patch_size
    need("model.image_size", cfg.model.image_size, cfg.model.image_size > 0 and cfg.model.image_size % patch == 0,
         f"it must be a positive multiple of the patch size {patch} of {cfg.model.backbone}")
    need("data.load_size", cfg.data.load_size, cfg.data.load_size >= 0, "it must be >= 0 (0 = keep the stored size)")
    need("model.drop_path", cfg.model.drop_path, 0 <= cfg.model.drop_path < 1, "it must be in [0, 1)")
    for key, value in (("optim.warmup_steps", o.warmup_steps), ("optim.min_lr", o.min_lr),
                       ("optim.weight_decay", o.weight_decay), ("optim.weight_decay_end", o.weight_decay_end),
                       ("optim.clip_grad", o.clip_grad), ("data.max_images", cfg.data.max_images),
                       ("image_every", cfg.image_every), ("stop_at", cfg.stop_at), ("dino.weight", d.weight),
                       ("dino.warmup_teacher_temp_steps", d.warmup_teacher_temp_steps),
                       ("dino.freeze_prototypes_steps", d.freeze_prototypes_steps),
                       ("labels.weight", lab.weight), ("labels.mil_weight", lab.mil_weight),
                       ("augment.brightness", a.brightness), ("augment.contrast", a.contrast),
                       ("augment.saturation", a.saturation), ("augment.hue", a.hue)):
        need(key, value, value >= 0, "it must be >= 0")
    need("optim.lr", o.lr, o.lr > 0, "it must be > 0")
    for key, value in (("augment.hue_prob", a.hue_prob), ("augment.grayscale_prob", a.grayscale_prob)):
        need(key, value, 0 <= value <= 1, "it is a probability: use a value in [0, 1]")
    need("labels.normalize_target", repr(lab.normalize_target), lab.normalize_target in ("none", "max", "minmax"),
         "use one of: none, max, minmax")
    if lab.fold is not None:
        need("labels.topk", lab.topk, 0 < lab.topk <= 1, "it is a fraction of the tokens: use a value in (0, 1]")
        need("labels.mask_temperature", lab.mask_temperature, lab.mask_temperature > 0, "it must be > 0")
        need("labels.evidence_width", lab.evidence_width, lab.evidence_width >= 1, "it must be >= 1")
    if d.weight <= 0:
        return
    for key, value in (("dino.out_dim", d.out_dim), ("dino.hidden_dim", d.hidden_dim),
                       ("dino.bottleneck_dim", d.bottleneck_dim)):
        need(key, value, value >= 1, "it must be >= 1")
    for key, value in (("dino.student_temp", d.student_temp), ("dino.teacher_temp", d.teacher_temp),
                       ("dino.warmup_teacher_temp", d.warmup_teacher_temp)):
        need(key, value, value > 0, "a temperature must be > 0")
    for key, value in (("dino.momentum", d.momentum), ("dino.center_momentum", d.center_momentum)):
        need(key, value, 0 <= value <= 1, "an EMA momentum must be in [0, 1]")
    need("dino.local_crops", d.local_crops, d.local_crops >= 0, "it must be >= 0 (0 = no local crops)")
    if d.local_crops:
        need("dino.local_size", d.local_size, d.local_size > 0 and d.local_size % patch == 0,
             f"it must be a positive multiple of the patch size {patch} of {cfg.model.backbone}")
    for key, scale in (("dino.global_scale", d.global_scale), ("dino.local_scale", d.local_scale)):
        need(key, list(scale), len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
             "write [low, high] area fractions with 0 < low <= high <= 1")

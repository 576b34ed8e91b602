"""A trained run as the benchmark sees it: config, model with its head loaded, checkpoint identity."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fscs.config import RunConfig, config_from_dict, config_to_dict, load_config
from fscs.digest import file_sha256
from fscs.engine.checkpoint import load_checkpoint
from fscs.errors import FSCSError
from fscs.model.fscs_model import FSCSModel
from fscs.run_dir import HEAD_FORMAT, build_model, check_backbone_identity, resolve_checkpoint


@dataclass
class LoadedRun:
    """A trained run: its config, model (head loaded) and checkpoint path/hash."""

    cfg: RunConfig
    model: FSCSModel
    checkpoint: Path
    checkpoint_sha256: str


def load_run(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> LoadedRun:
    """Rebuild the model of a run directory from its checkpoint (config stored inside it).

    checkpoint: a head file (path, or name inside run_dir); default best.pt (the model-selection winner)
    when training wrote one, else checkpoint.pt (the newest save).
    """
    path = resolve_checkpoint(run_dir, checkpoint)
    if not path.is_file():
        raise FSCSError(f"no checkpoint at '{path}'; train first (fscs train name=... ) or pass the right "
                        "--run")
    state = load_checkpoint(path)
    fmt = state.get("format") if isinstance(state, dict) else None
    missing = [k for k in ("config", "backbone", "engine") if fmt == HEAD_FORMAT and k not in state]
    if fmt != HEAD_FORMAT or missing:
        what = ("a `fscs pretrain` checkpoint (its backbone.safetensors goes into a train run as model.weights)"
                if str(fmt).startswith("fscs-pretrain") else f"incomplete (no {missing[0]!r})" if missing else
                f"not a `fscs train` checkpoint (format {fmt!r})")
        raise FSCSError(f"checkpoint '{path}' is {what}; pass the run directory of `fscs train`")
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    check_backbone_identity(state["backbone"], model, path)
    head_state = state["engine"]["head"]
    if any(k.startswith("enhancer.") for k in head_state) and getattr(model, "enhancer", True) is None:
        model.attach_enhancer(getattr(cfg.model, "enhancer_channels", 128))  # mixed-regime checkpoint
    model.head.load_state_dict(head_state)
    return LoadedRun(cfg, model.eval(), path, file_sha256(path))


def load_reference_run(checkpoint: str | os.PathLike, backbone_weights: str | os.PathLike | None,
                       overrides: Sequence[str] = ()) -> LoadedRun:
    """The authors' released CST checkpoint (Lightning .ckpt, head keys 'learner.*') as a run of this harness.

    The backbone defaults to the paper's setting (DINO ViT-S/8, 400 px, the reference pseudo-mask rule,
    weak regime); `overrides` (key=value) set the data, the fold and the bench keys, or change the backbone.
    """
    if backbone_weights is None and not any(str(o).startswith("model.weights=") for o in overrides):
        raise FSCSError(f"--reference-checkpoint {checkpoint}: pass --backbone-weights with the DINO weights its "
                        "head was trained on (dino_deitsmall8_300ep_pretrain.pth for ViT-S/8); add "
                        "model.weights=null to evaluate it on random backbone weights on purpose")
    base = ["name=reference", "model.backbone=vit_small_patch8_224.dino", "model.image_size=400",
            "model.mask_rule=reference", "model.mask_threshold=0.4", "train.regime=weak",
            f"model.weights={backbone_weights}" if backbone_weights else "model.weights=null"]
    cfg = load_config(None, [*base, *overrides])
    model = build_model(cfg)
    model.load_reference_checkpoint(checkpoint)
    path = Path(checkpoint)
    return LoadedRun(cfg, model.eval(), path, file_sha256(path))


def regime_label(cfg: RunConfig) -> str:
    """A run's training regime as a leaderboard label: 'weak', 'full' or 'mixed@<gt_fraction>'."""
    regime = str(cfg.train.regime)
    frac = getattr(cfg.train, "gt_fraction", None)
    return f"{regime}@{float(frac):g}" if regime == "mixed" and frac is not None else regime


def label_gt_fraction(label: str) -> float | None:
    """Share of GT-masked training images a regime label stands for: weak 0, full 1, mixed@f f (else None)."""
    base, _, frac = label.partition("@")
    if base == "weak":
        return 0.0
    if base == "full":
        return 1.0
    try:
        return float(frac) if base == "mixed" and frac else None
    except ValueError:
        return None


def run_metadata(loaded: LoadedRun) -> dict[str, Any]:
    """What a result records about the checkpoint it evaluated."""
    return {"checkpoint": str(loaded.checkpoint), "checkpoint_sha256": loaded.checkpoint_sha256,
            "backbone": loaded.model.backbone.identity, "run": loaded.cfg.name,
            "train_regime": regime_label(loaded.cfg),
            "gt_fraction": label_gt_fraction(regime_label(loaded.cfg)),
            "train_fold": loaded.cfg.data.fold, "train_config": config_to_dict(loaded.cfg)}

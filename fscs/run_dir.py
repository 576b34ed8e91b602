"""A run directory's files and what rebuilds a run from them: the model a config describes, the head file
to load, and the check that a head was trained on this backbone's features."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fscs.atomic import write_text_atomic
from fscs.config import RunConfig
from fscs.errors import FSCSError
from fscs.model.fscs_model import FSCSModel

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
"""The head of the newest save (what `fscs bench` loads when the run has no best.pt)."""
BEST = "best.pt"
"""The head of the epoch with the best model-selection score (train.val_episodes > 0)."""
SUMMARY = "train_summary.json"
TRAIN_LOG = "train_log.jsonl"
HEAD_FORMAT = "fscs-checkpoint/1"
"""`format` of checkpoint.pt / best.pt (what bench and predict load)."""


def build_model(cfg: RunConfig) -> FSCSModel:
    """The model a config describes (backbone weights from cfg.model.weights; fresh head)."""
    extra: dict[str, Any] = {}
    if cfg.train.regime == "mixed":  # the mixed regime's enhancer lives in the head (trained + saved with it)
        extra = {"enhancer": True, "enhancer_channels": cfg.model.enhancer_channels}
    return FSCSModel.build(
        backbone=cfg.model.backbone,
        weights=cfg.model.weights,
        image_size=cfg.model.image_size,
        mask_rule=cfg.model.mask_rule,
        mask_threshold=cfg.model.mask_threshold,
        **extra,
    )


def resolve_checkpoint(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Path:
    """The head file `fscs bench` uses: `checkpoint` (a path, or a name inside run_dir) when given, else the
    model-selection winner best.pt when training wrote one, else the newest checkpoint.pt."""
    run = Path(run_dir)
    if checkpoint is not None:
        path = Path(checkpoint)
        return path if path.is_file() or path.is_absolute() else run / path
    return run / BEST if (run / BEST).is_file() else run / CHECKPOINT


def check_backbone_identity(stored: dict, model: FSCSModel, path: Path) -> None:
    """Refuse a head trained on other backbone features (a checkpoint from before pos_resample was recorded
    is compared on the rest, with a warning where that rule has changed since)."""
    current = model.backbone.identity
    for key in ("name", "weights_sha256", "image_size"):
        if stored.get(key) != current.get(key):
            raise FSCSError(
                f"checkpoint '{path}' was trained with backbone {key}={stored.get(key)!r}, but this run uses "
                f"{current.get(key)!r}; set model.backbone/model.weights/model.image_size to match"
            )
    rule = current.get("pos_resample", "none")
    if "pos_resample" in stored and stored["pos_resample"] != rule:
        raise FSCSError(f"checkpoint '{path}' was trained on backbone features whose pos_embed was resampled by "
                        f"rule {stored['pos_resample']!r}, this fscs resamples these weights by {rule!r}: the "
                        "features differ; retrain the head with this version (or use the fscs that trained it)")
    bb = model.backbone
    if ("pos_resample" not in stored and rule != "none"
            and (bb.spec.num_reg_tokens or (bb.pretraining is not None and bb.spec.pos_resample == "dino"))):
        logger.warning("checkpoint %s predates the record of the pos_embed resampling rule; before 2026-11-27 "
                       "fscs resampled %s weights with DINO's +0.1 rule, now with timm's: a head trained "
                       "then at image_size %s sees slightly different features (retrain it to be sure)",
                       path, "DINOv2-register" if bb.spec.num_reg_tokens else "fscs pretrain", current["image_size"])


def truncate_train_log(log: Path, step: int) -> None:
    """Keep the lines of train_log.jsonl up to `step` (a resumed run trains the later steps again).

    A line cut short by the crash or kill being resumed from is dropped with a warning; the file is
    rewritten atomically, so a second interruption here loses nothing.
    """
    if not log.is_file():
        return
    keep = []
    for ln in log.read_text().splitlines():
        try:
            record = json.loads(ln)
        except json.JSONDecodeError:
            if ln.strip():
                logger.warning("%s: dropping an unreadable line (%r)", log, ln[:80])
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(ln)
    write_text_atomic(log, "".join(ln + "\n" for ln in keep))


def check_backbone_novel_fold(model: FSCSModel, dataset: str, fold: int, weights: str | None) -> None:
    """Refuse training for a test fold whose classes the backbone saw in `fscs pretrain` (same shard set):
    its few-shot numbers would not be on novel classes."""
    scope = getattr(model.backbone, "pretraining", None)
    if not scope or scope["dataset"] != dataset or fold in scope["novel_folds"]:  # unknown set: no claim
        return
    kept = scope["novel_folds"]
    other = f", or set data.fold to one of {kept}" if kept else ""
    raise FSCSError(
        f"backbone weights {weights} were pretrained (fscs pretrain) on {dataset} images holding fold {fold}'s "
        f"test classes (folds kept out: {kept or 'none'}), so fold {fold} is not novel to it; pretrain one for "
        f"this fold (fscs pretrain data.exclude_folds=[{fold}] labels.fold={fold}) and pass it as model.weights{other}")

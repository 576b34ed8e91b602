"""`fscs shards folder`: your own images (labels CSV or one folder per class, optional masks) -> shards."""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fscs.data.shard_write import write_shards
from fscs.data.shards import ROLES, read_index
from fscs.data.sources.folder_pixels import iter_folder_samples
from fscs.data.sources.folder_plan import _KEY_BAD, FolderPlan, _png_files, plan_folder
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

NOVEL_FOLD, BASE_FOLD = 0, 1
"""Layout: fold 0 = held-out (novel) classes, fold 1 = base classes; train with data.fold=0."""
LAYOUT = "fscs-folder/1"


def _warn_masks(plan: FolderPlan, masked_keys: set[str]) -> None:
    """Warnings on missing masks (what `fscs bench` can score) from the images stored with a mask
    (`masked_keys`: a blank mask file counts as none)."""
    with_mask = sum(it.key in masked_keys for it in plan.items)
    test = [it for it in plan.items if plan.split[it.key] == "test"]
    if 0 < with_mask < len(plan.items):
        logger.warning("%d of %d images have masks: train.regime=full needs a mask on every training image "
                       "(train weak, or mixed)", with_mask, len(plan.items))
    masked = [it for it in test if it.key in masked_keys]
    if test and not masked:
        logger.warning("the %d novel test images have no masks: `fscs bench` reports ER (classification) "
                       "only, no mIoU; mask a few per novel class (masks/<image>.png) for mIoU", len(test))
    elif len(masked) < len(test):
        logger.warning("%d of %d novel test images have masks: `fscs bench` reports ER over all of them and "
                       "mIoU / FB-IoU over the episodes whose query is one of the %d masked ones",
                       len(masked), len(test), len(masked))
        unmasked = [c for c in plan.novel if not any(c in it.labels for it in masked)]
        if unmasked:
            logger.warning("novel class %r has no masked test image: its IoU (part of the mIoU mean) can "
                           "only be 0; mask a few of its images", unmasked[0])


def folder_lists(plan: FolderPlan) -> dict[str, dict[int, list[tuple[str, int]]]]:
    """index["lists"]: base entries under fold 1 (trn -> train, val -> select), novel test entries, fold 0.

    Training for data.fold=0 uses lists.train[j != 0] = the base classes; bench tests lists.test[0].
    """
    ids, novel = plan.class_id, set(plan.novel)
    lists: dict[str, dict[int, list[tuple[str, int]]]] = {r: {NOVEL_FOLD: [], BASE_FOLD: []} for r in ROLES}
    for it in plan.items:
        split = plan.split[it.key]
        for c in it.labels:
            if split == "test" and c in novel:
                lists["test"][NOVEL_FOLD].append((it.key, ids[c]))
            elif split != "test":
                lists["train" if split == "trn" else "select"][BASE_FOLD].append((it.key, ids[c]))
    return lists


def _fingerprint(plan: FolderPlan) -> str:
    """sha256 over every input file's path, size and mtime plus the labels (detects edited inputs)."""
    def stat(p: Path) -> list[Any]:
        files = _png_files(p) if p.is_dir() else [p]
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    rows = [[it.key, it.labels, stat(it.path), stat(it.mask) if it.mask else None] for it in plan.items]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def build_folder_shards(images: str | Path, out: str | Path, *, labels: str | Path | None = None,
                        masks: str | Path | None = None, mask_format: str = "index",
                        classes: Sequence[str] | None = None, novel: Sequence[str] | None = None,
                        novel_count: int | None = None, seed: int = 0, select_fraction: float = 0.15,
                        max_side: int = 1024, shots: Sequence[int] = (1, 5), name: str | None = None,
                        samples_per_shard: int = 1000) -> Path:
    """Convert a folder of images into an fscs shard directory (novel classes = fold 0); returns `out`."""
    if max_side < 0:  # every image is larger than a negative side: all were shrunk to 1 x 1 pixel
        raise FSCSError(f"--max-side {max_side}: must be >= 0 (0 = keep the original size)")
    plan = plan_folder(images, labels, masks, classes=classes, novel=novel, novel_count=novel_count,
                       seed=seed, select_fraction=select_fraction, mask_format=mask_format, shots=shots)
    ids = plan.class_id
    novel_ids = sorted(ids[c] for c in plan.novel)
    folds = {NOVEL_FOLD: novel_ids, BASE_FOLD: [i for i in ids.values() if i not in novel_ids]}
    dataset = name or "folder-" + (_KEY_BAD.sub("_", Path(images).resolve().name) or "images")
    params = {"layout": LAYOUT, "novel": plan.novel, "seed": seed, "select_fraction": select_fraction,
              "max_side": max_side, "mask_format": mask_format, "inputs_sha256": _fingerprint(plan)}
    lists = folder_lists(plan)
    splits = Counter(plan.split.values())
    logger.info("%d images, %d classes (novel: %s): %d trn, %d val, %d test", len(plan.items),
                len(plan.class_names), ", ".join(plan.novel) or "none", splits["trn"], splits["val"],
                splits["test"])
    out = write_shards(iter_folder_samples(plan, max_side), out, dataset=dataset,
                       class_names=plan.class_names, folds=folds, lists_fn=lambda records, fold_map: lists,
                       samples_per_shard=samples_per_shard, params=params)
    # counted from what was stored (also when reused): blank mask files were dropped while reading
    _warn_masks(plan, {k for k, s in read_index(out).samples.items() if s["mask"]})
    return out

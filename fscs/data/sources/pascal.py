"""PASCAL-5i from VOC2012 + SBD (SegmentationClassAug) and the standard split lists, into fscs shards."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from fscs.data.shards import ShardIndex
from fscs.data.sources.common import (
    CONVERTER_VERSION,
    DOCS,
    ConversionPlan,
    ConversionReport,
    Entries,
    Job,
    LabelSet,
    PngMask,
    assign_splits,
    dedupe,
    default_splits_dir,
    files_sha256,
    lists_only_index,
    run_conversion,
)
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

DATASET = "pascal-5i"
NUM_FOLDS = 4
PASCAL_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                  "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                  "train", "tvmonitor")
PASCAL_FOLDS = {f: list(range(5 * f + 1, 5 * f + 6)) for f in range(NUM_FOLDS)}
LABELS = LabelSet("PASCAL VOC", num_classes=20, ignore=True)
_LINE = re.compile(r"^([A-Za-z0-9_-]+)__(\d{2})$")
_MISSING_HINT = ("--root must be VOCdevkit/VOC2012 with JPEGImages/<id>.jpg and SBD's SegmentationClassAug/"
                 f"<id>.png for every listed id; see {DOCS}")


def list_files(splits_dir: Path) -> list[Path]:
    """The 8 list files (trn_fold0..3, val_fold0..3) in `splits_dir`; FSCSError naming a missing one."""
    files = [splits_dir / f"{kind}_fold{f}.txt" for kind in ("trn", "val") for f in range(NUM_FOLDS)]
    for p in files:
        if not p.is_file():
            raise FSCSError(f"{p}: split list missing; pass --splits pointing at a copy of shards/splits/pascal")
    return files


def parse_list(path: Path, fold: int) -> Entries:
    """(VOC id, class 1..20) entries of one list file; every class must belong to `fold`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exn:
        raise FSCSError(f"{path}: unreadable list ({exn}); restore it from shards/splits/pascal") from None
    entries = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise FSCSError(f"{path}:{n}: {line!r} is not '<VOC id>__<2-digit class>'; use the standard lists")
        c = int(m.group(2))
        if c not in PASCAL_FOLDS[fold]:
            raise FSCSError(f"{path}:{n}: class {c} is not one of fold {fold}'s {PASCAL_FOLDS[fold]}; "
                            "use the standard lists")
        entries.append((m.group(1), c))
    if not entries:
        logger.warning("%s: the list has no entries (fold %d gets none of these images); the standard list is "
                       "in shards/splits/pascal", path, fold)
    return entries


def plan_pascal(root: str | Path, splits: str | Path | None = None, select_fraction: float = 0.1,
                seed: int = 0) -> ConversionPlan:
    """What `fscs shards pascal` writes: splits per image, lists per role and fold, jobs, params."""
    root = Path(root)
    splits_dir = Path(splits) if splits is not None else default_splits_dir("pascal")
    files = list_files(splits_dir)
    raw = {p.name: parse_list(p, int(p.stem[-1])) for p in files}
    list_lines = {name: len(es) for name, es in raw.items()}
    for name, es in raw.items():
        if len(set(es)) != len(es):
            logger.warning("%s: %d repeated entries counted once", splits_dir / name, len(es) - len(set(es)))
    train = {f: dedupe(raw[f"trn_fold{f}.txt"]) for f in range(NUM_FOLDS)}
    test = {f: dedupe(raw[f"val_fold{f}.txt"]) for f in range(NUM_FOLDS)}
    split_of, lists, in_both = assign_splits(train, test, select_fraction, seed)
    params = {"converter": CONVERTER_VERSION, "source": "VOC2012 JPEGImages + SBD SegmentationClassAug",
              "root": str(root.resolve()), "splits_sha256": files_sha256(files),
              "select_fraction": select_fraction, "seed": seed, "query_mode": "entry"}

    def jobs() -> list[Job]:
        return [Job(key, split, str(root / "JPEGImages" / f"{key}.jpg"),
                    PngMask(str(root / "SegmentationClassAug" / f"{key}.png")), LABELS)
                for key, split in split_of.items()]

    return ConversionPlan(DATASET, dict(enumerate(PASCAL_CLASSES, start=1)), PASCAL_FOLDS, lists, split_of,
                          params, jobs, _MISSING_HINT, list_lines, in_both)


def convert_pascal(root: str | Path, out: str | Path, *, splits: str | Path | None = None, workers: int = 2,
                   select_fraction: float = 0.1, seed: int = 0, samples_per_shard: int = 1000
                   ) -> ConversionReport:
    """Convert VOCdevkit/VOC2012 (`root`) into PASCAL-5i shards at `out` (atomic, reused when complete)."""
    if not Path(root).is_dir():
        raise FSCSError(f"{root}: not a directory; pass --root VOCdevkit/VOC2012 (layout in {DOCS})")
    plan = plan_pascal(root, splits, select_fraction, seed)
    return run_conversion(plan, out, workers, samples_per_shard)


def index_from_lists(splits: str | Path | None = None) -> ShardIndex:
    """An in-memory PASCAL-5i index from the lists alone (no images): labels = classes of the entries.

    Enough for EpisodeSampler (protocol checks such as the share of episodes without a target class).
    """
    plan = plan_pascal(Path("."), splits)
    return lists_only_index(plan, Path(splits) if splits is not None else default_splits_dir("pascal"))

"""COCO-20i from COCO 2014 (semantic PNGs or the instance JSON via pycocotools) and the standard lists."""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fscs.atomic import remove_stale_tmp
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

DATASET = "coco-20i"
NUM_FOLDS = 4
SUBSETS = ("train2014", "val2014")
MASK_SOURCES = ("auto", "png", "json")
# Official COCO 2014 category names by id 1..90 (None = unused id).
_NAMES_BY_ID = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None, None, "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", None, "dining table", None, None, "toilet", None, "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None,
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
# The 80 categories (id, name) in the official order; absolute class k (1..80) is the k-th of them.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = tuple((i, n) for i, n in enumerate(_NAMES_BY_ID, start=1) if n)
CLASS_OF_CATEGORY = {cid: k for k, (cid, _) in enumerate(COCO_CATEGORIES, start=1)}
COCO_FOLDS = {f: [4 * k + f + 1 for k in range(20)] for f in range(NUM_FOLDS)}
LABELS = LabelSet("COCO", num_classes=80, ignore=True)
_ROW = re.compile(r"^(\d+)\t((?:train2014|val2014)/([A-Za-z0-9_-]+)\.jpg)$", re.MULTILINE)
_MISSING_HINT = ("--root must hold train2014/, val2014/ and annotations/{train2014,val2014}/<name>.png or "
                 f"annotations/instances_{{train,val}}2014.json; see {DOCS}")


def fold_of(c: int) -> int:
    """Fold whose test classes contain absolute class `c` (1..80): classes 4k+f+1 belong to fold f."""
    return (c - 1) % NUM_FOLDS


def list_files(splits_dir: Path) -> list[Path]:
    files = [splits_dir / f"{kind}_fold{f}.tsv.gz" for kind in ("trn", "val") for f in range(NUM_FOLDS)]
    for p in files:
        if not p.is_file():
            raise FSCSError(f"{p}: split list missing; pass --splits pointing at a copy of shards/splits/coco")
    return files


def parse_list(path: Path, fold: int, test: bool, paths: dict[str, str]) -> Entries:
    """(key, class 1..80) entries of one gzip TSV list; records key -> 'subset/name.jpg' into `paths`."""
    try:
        with gzip.open(path, "rt") as fh:
            text = fh.read()
    except (OSError, EOFError, UnicodeDecodeError) as exn:
        raise FSCSError(f"{path}: unreadable list ({exn}); restore shards/splits/coco") from None
    rows = _ROW.findall(text)
    if not rows:
        logger.warning("%s: the list has no entries (fold %d gets none of these images); the standard list is "
                       "in shards/splits/coco", path, fold)
    lines = text.splitlines()
    if len(rows) != len(lines) - lines.count(""):
        n, bad = next((n, ln) for n, ln in enumerate(lines, start=1) if ln and not _ROW.fullmatch(ln))
        raise FSCSError(f"{path}:{n}: {bad!r} is not '<class 0..79>\\t<train2014|val2014>/<name>.jpg'")
    wrong = next((int(c) for c, _, _ in rows if not 0 <= int(c) < 80 or (int(c) % NUM_FOLDS == fold) != test),
                 None) if rows else None
    if wrong is not None:
        raise FSCSError(f"{path}: class {wrong} does not belong in this list (COCO fold {fold} tests 0-based "
                        "classes 4k+fold; classes are 0..79); use the standard lists")
    entries = []
    for cls, rel, key in rows:
        if paths.setdefault(key, rel) != rel:
            raise FSCSError(f"{path}: image {key} listed under two paths ({paths[key]}, {rel})")
        entries.append((key, int(cls) + 1))
    return entries


def _decode_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """uint8 [H, W] {0,1} of one annotation's polygons / RLE (pycocotools)."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, (list, tuple)):
        polys = [list(p) for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(seg.get("counts"), (list, tuple)):
        rle = mask_utils.frPyObjects(dict(seg), height, width)
    else:
        counts = seg["counts"]
        rle = {"size": list(seg["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    with warnings.catch_warnings():  # pycocotools' numpy-2 `copy=` deprecation notice, not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.asarray(mask_utils.decode(rle), dtype=np.uint8).reshape(height, width)


def render_semantic(anns: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """uint8 [H, W] semantic mask (0 background, 1..80) from one image's instance annotations.

    Rule: every annotation (crowd ones included) is painted with its class, in order of decreasing `area`
    (ties: increasing annotation id), so a smaller object stays visible on top of a larger one.
    """
    mask = np.zeros((height, width), np.uint8)
    for ann in sorted(anns, key=lambda a: (-float(a.get("area", 0.0)), int(a.get("id", 0)))):
        mask[_decode_segmentation(ann["segmentation"], height, width) > 0] = CLASS_OF_CATEGORY[ann["category_id"]]
    return mask


@dataclass(frozen=True)
class CocoAnnMask:
    """A mask rendered from instance annotations (JSON route); `anns` hold only what rendering needs."""

    json_path: str
    file_name: str
    height: int
    width: int
    anns: tuple[dict[str, Any], ...]

    def describe(self) -> str:
        return f"{self.json_path} [{self.file_name}]"

    def load(self, image_shape: tuple[int, int]) -> np.ndarray:
        try:
            return render_semantic(self.anns, self.height, self.width)
        except ImportError:
            raise FSCSError(f"{self.json_path}: rendering masks needs pycocotools; pip install "
                            "'fscs[coco]' (or use the semantic PNGs)") from None


def load_instances(json_path: Path, keys: set[str] | None = None) -> dict[str, CocoAnnMask]:
    """Per-image mask specs (by file stem) from a COCO instances JSON; checks its category list."""
    try:
        data = json.loads(json_path.read_text())
        cats = {int(c["id"]): c["name"] for c in data["categories"]}
        images = data["images"]
        anns = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as exn:
        raise FSCSError(f"{json_path}: unreadable instances JSON ({exn}); re-download COCO 2014 annotations"
                        ) from None
    if cats != dict(COCO_CATEGORIES):
        raise FSCSError(f"{json_path}: categories differ from the official 80 COCO categories; use the COCO "
                        "2014 instances file")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in anns:
        by_image.setdefault(int(a["image_id"]), []).append(
            {"id": a.get("id", 0), "category_id": int(a["category_id"]), "area": a.get("area", 0.0),
             "segmentation": a["segmentation"]})
    out = {}
    for im in images:
        key = Path(im["file_name"]).stem
        if keys is None or key in keys:
            out[key] = CocoAnnMask(str(json_path), im["file_name"], int(im["height"]), int(im["width"]),
                                   tuple(by_image.get(int(im["id"]), ())))
    return out


def render_coco_pngs(root: str | Path, subset: str, keys: set[str] | None = None) -> Path:
    """Write `root/annotations/<subset>/<name>.png` (index PNGs) from `instances_<subset>.json`; returns the dir.

    The PNG route then reads exactly the masks the JSON route renders.
    """
    root = Path(root)
    specs = load_instances(root / "annotations" / f"instances_{subset}.json", keys)
    out = root / "annotations" / subset
    # rendered into a temporary folder, renamed at the end: an interrupted run leaves no partial folder that
    # --mask-source auto would take for the PNG route
    remove_stale_tmp(out.parent, out.name)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if out.is_dir():
        shutil.copytree(out, tmp, dirs_exist_ok=True)  # extend an existing folder (keys= renders a subset)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        for key, spec in specs.items():
            Image.fromarray(spec.load((spec.height, spec.width)), "L").save(tmp / f"{key}.png")
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _mask_sources(root: Path, needed: set[str], mode: str) -> dict[str, str]:
    """Per subset: "png" (annotations/<subset>/ exists) or "json" (instances_<subset>.json)."""
    if mode not in MASK_SOURCES:
        raise FSCSError(f"--mask-source {mode!r}: use one of {MASK_SOURCES}")
    out = {}
    for sub in sorted(needed):
        png_dir, js = root / "annotations" / sub, root / "annotations" / f"instances_{sub}.json"
        if mode == "png" or (mode == "auto" and png_dir.is_dir()):
            out[sub] = "png"
        elif mode == "json" or js.is_file():
            out[sub] = "json"
        else:
            raise FSCSError(f"{png_dir}: no semantic PNGs and no {js.name}; add either (see {DOCS})")
    return out


def plan_coco(root: str | Path, splits: str | Path | None = None, select_fraction: float = 0.1,
              seed: int = 0, mask_source: str = "auto") -> ConversionPlan:
    """What `fscs shards coco` writes. lists.train[g] pools the trn entries of fold g's classes."""
    root = Path(root)
    splits_dir = Path(splits) if splits is not None else default_splits_dir("coco")
    files = list_files(splits_dir)
    paths: dict[str, str] = {}
    raw = {p.name: parse_list(p, int(p.name.split("_fold")[1][0]), p.name.startswith("val"), paths)
           for p in files}
    pooled = dedupe(e for f in range(NUM_FOLDS) for e in raw[f"trn_fold{f}.tsv.gz"])
    train = {g: [e for e in pooled if fold_of(e[1]) == g] for g in range(NUM_FOLDS)}
    for f in range(NUM_FOLDS):
        if set(raw[f"trn_fold{f}.tsv.gz"]) != {e for g in train if g != f for e in train[g]}:
            logger.warning("%s: differs from the other trn lists' entries of its classes; training for fold %d "
                           "uses the pooled entries", splits_dir / f"trn_fold{f}.tsv.gz", f)
    test = {f: dedupe(raw[f"val_fold{f}.tsv.gz"]) for f in range(NUM_FOLDS)}
    split_of, lists, in_both = assign_splits(train, test, select_fraction, seed)
    sources = _mask_sources(root, {paths[k].split("/")[0] for k in split_of}, mask_source)
    params = {"converter": CONVERTER_VERSION, "source": "COCO 2014", "root": str(root.resolve()),
              "splits_sha256": files_sha256(files), "select_fraction": select_fraction, "seed": seed,
              "query_mode": "class", "mask_source": sources}

    def jobs() -> list[Job]:
        if "json" in sources.values():
            try:
                import pycocotools.mask  # noqa: F401
            except ImportError:
                raise FSCSError(f"{root}/annotations: rendering masks from instances JSON needs pycocotools; "
                                "pip install 'fscs[coco]', or provide the semantic PNGs") from None
        specs: dict[str, Any] = {}
        for sub, how in sources.items():
            keys = {k for k in split_of if paths[k].startswith(sub + "/")}
            if how == "png":
                specs.update({k: PngMask(str(root / "annotations" / sub / f"{k}.png")) for k in keys})
                continue
            js = root / "annotations" / f"instances_{sub}.json"
            found = load_instances(js, keys)
            if len(found) != len(keys):
                miss = min(keys - set(found))
                raise FSCSError(f"{js}: no image entry for {miss} ({len(keys) - len(found)} listed images "
                                "missing); use the COCO 2014 instances file matching the lists")
            specs.update(found)
        return [Job(k, s, str(root / paths[k]), specs[k], LABELS) for k, s in split_of.items()]

    list_lines = {name: len(es) for name, es in raw.items()}
    return ConversionPlan(DATASET, {k: n for k, (_, n) in enumerate(COCO_CATEGORIES, start=1)}, COCO_FOLDS,
                          lists, split_of, params, jobs, _MISSING_HINT, list_lines, in_both)


def convert_coco(root: str | Path, out: str | Path, *, splits: str | Path | None = None, workers: int = 2,
                 select_fraction: float = 0.1, seed: int = 0, mask_source: str = "auto",
                 samples_per_shard: int = 1000) -> ConversionReport:
    """Convert a COCO 2014 tree (`root`) into COCO-20i shards at `out` (atomic, reused when complete)."""
    if not Path(root).is_dir():
        raise FSCSError(f"{root}: not a directory; pass --root the COCO 2014 root (layout in {DOCS})")
    plan = plan_coco(root, splits, select_fraction, seed, mask_source)
    return run_conversion(plan, out, workers, samples_per_shard)


def index_from_lists(splits: str | Path | None = None) -> ShardIndex:
    """An in-memory COCO-20i index from the lists alone (no images); labels = classes of the entries."""
    plan = plan_coco(Path("."), splits, mask_source="png")
    return lists_only_index(plan, Path(splits) if splits is not None else default_splits_dir("coco"))

"""`fscs shards folder` planning: labels, masks found, class ids, novel classes and splits; no pixel read."""
from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MASK_FORMATS = ("index", "binary")
_LABEL_SEP = re.compile(r"[;|,]")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class FolderItem:
    """One source image: shard key, file, sorted class names, mask file/folder (or None), its origin."""

    key: str
    path: Path
    labels: tuple[str, ...]
    mask: Path | None = None
    where: str = ""


@dataclass
class FolderPlan:
    """What is decided before any pixel is read: class ids (i + 1 = class_names[i]), novel classes, splits."""

    class_names: list[str]
    novel: list[str]
    items: list[FolderItem]
    split: dict[str, str]
    mask_format: str = "index"

    @property
    def class_id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.class_names, start=1)}


def image_files(root: Path) -> list[Path]:
    """Image files under `root` (recursive, sorted), skipping hidden files and the masks of `fscs predict`'s
    support layout: `*.mask.png`, and `masks/<stem>.png` beside an image `<stem>.*`."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not p.name.startswith(".") and not p.name.lower().endswith(".mask.png"))
    stems = {(p.parent, p.stem) for p in files}
    masks = {p for p in files if p.parent.name.lower() == "masks" and p.suffix.lower() == ".png"
             and (p.parent.parent, p.stem) in stems}
    if masks:
        logger.warning("%s: %d support-style masks (e.g. %s) are not images; masks for shards are read from "
                       "--masks", root, len(masks), min(masks))
    return [p for p in files if p not in masks]


def make_keys(rel_paths: Sequence[str]) -> list[str]:
    """Shard keys from relative paths: extension dropped, other characters -> `_`; clashes get a hash."""
    base = [_KEY_BAD.sub("_", str(Path(r).with_suffix(""))).strip("_") or "img" for r in rel_paths]
    counts = Counter(base)
    return [b if counts[b] == 1 else f"{b}-{hashlib.sha1(r.encode()).hexdigest()[:8]}"
            for b, r in zip(base, rel_paths)]


def read_labels_csv(csv_path: Path, images_dir: Path) -> list[tuple[Path, tuple[str, ...], str]]:
    """Rows `image,labels` (header required; labels separated by `;` or `|`) -> (file, names, where)."""
    if not csv_path.is_file():
        raise FSCSError(f"{csv_path}: labels file {'is a directory' if csv_path.is_dir() else 'not found'}; pass "
                        "--labels FILE (CSV, header image,labels)")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:  # Excel's "CSV" in the system code page, UTF-16, or not a CSV at all
        raise FSCSError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the labels as "
                        "CSV UTF-8") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "image" not in header or "labels" not in header:
        raise FSCSError(f"{csv_path}: first line must be the header `image,labels` (got "
                        f"{','.join(header)!r}); add it")
    col_img, col_lab = header.index("image"), header.index("labels")
    out, seen = [], {}
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{csv_path.name} line {n}"
        if len(row) != len(header):
            raise FSCSError(f"{where}: {len(row)} fields, header has {len(header)}; separate several labels "
                            "with ';' (e.g. img.jpg,cat;dog) or quote the field")
        name = row[col_img].strip()
        path = Path(name) if Path(name).is_absolute() else images_dir / name
        if not path.is_file():
            raise FSCSError(f"{where}: image {name!r} not found under {images_dir}; fix the path or remove "
                            "the row")
        if path.resolve() in seen:
            raise FSCSError(f"{where}: image {name!r} is listed again (first at {seen[path.resolve()]}); "
                            "merge its labels into one row")
        seen[path.resolve()] = where
        labels = tuple(sorted({s.strip() for s in _LABEL_SEP.split(row[col_lab]) if s.strip()}))
        if not labels:
            logger.warning("%s: image %r has no labels; skipped (images without any class are not used)",
                           where, name)
            continue
        out.append((path, labels, where))
    if not out:
        raise FSCSError(f"{csv_path}: no labelled images; add rows `image,labels`")
    return out


def scan_image_folder(images_dir: Path, masks_dir: Path | None = None
                      ) -> list[tuple[Path, tuple[str, ...], str]]:
    """ImageFolder layout: one sub-folder per class (single-label) -> (file, (class,), where); a `masks_dir`
    inside `images_dir` (photos/masks/, photos/annotations/masks/) is not a class, nor images of one."""
    skip = masks_dir.resolve() if masks_dir is not None else None
    class_dirs = sorted(d for d in images_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
                        and d.resolve() != skip)
    out = []
    for d in class_dirs:
        files = [p for p in image_files(d) if skip is None or not p.resolve().is_relative_to(skip)]
        if not files and skip is not None and skip.is_relative_to(d.resolve()):
            continue  # photos/annotations/ holding only the --masks folder
        if not files:
            raise FSCSError(f"{d}: class folder {d.name!r} has no images; add images or remove the folder")
        out += [(p, (d.name,), f"folder {d.name}") for p in files]
    if not out:
        raise FSCSError(f"{images_dir}: no class sub-folders; pass --labels labels.csv or put the images in "
                        "one folder per class")
    return out


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return Path(path.name)


def _png_files(folder: Path) -> list[Path]:
    """The `*.png` files of a per-class mask folder, extension in any case (sorted)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def _find_mask(masks_dir: Path, rel: Path) -> Path | None:
    """`masks/<rel stem>.png` (one PNG for the image) or `masks/<rel stem>/` (one binary PNG per class)."""
    stem = masks_dir / rel.with_suffix("")
    single, folder = stem.with_name(stem.name + ".png"), stem
    if not single.is_file() and stem.with_name(stem.name + ".PNG").is_file():  # cameras, Windows tools
        single = stem.with_name(stem.name + ".PNG")
    if single.is_file() and folder.is_dir():
        raise FSCSError(f"{single} and {folder}/ both exist; keep one mask format per image")
    return single if single.is_file() else folder if folder.is_dir() else None


def split_names(text: str | None) -> list[str] | None:
    """`--novel` / `--classes` text -> class names: comma-separated, `\\,` is a comma inside a name (an
    ImageFolder class folder `nuts, bolts` is `--novel 'nuts\\, bolts'`)."""
    if not text:
        return None
    return [t.strip().replace("\\,", ",") for t in re.split(r"(?<!\\),", text) if t.strip()]


def _comma_hint(names: Sequence[str]) -> str:
    """The escape to suggest when a class name holds a comma (it cannot be written plainly in a list)."""
    comma = next((n for n in names if "," in n), None)
    if comma is None:
        return ""
    escaped = comma.replace(",", "\\,")
    return f"; a comma inside a class name is written \\, (e.g. '{escaped}')"


def choose_novel(class_names: Sequence[str], novel: Sequence[str] | None, novel_count: int | None,
                 seed: int) -> list[str]:
    """Held-out classes: `novel` by name, else `novel_count` (default about C / 4, >= 1) drawn with `seed`."""
    names = list(class_names)
    if novel:
        unknown = [n for n in novel if n not in names]
        if unknown:
            raise FSCSError(f"--novel {unknown[0]!r} is not a class (classes: {', '.join(names)}); fix the "
                            f"name{_comma_hint(names)}")
        chosen = sorted(set(novel))
    else:
        count = max(1, min(len(names) - 1, (len(names) + 2) // 4)) if novel_count is None else novel_count
        if not 0 <= count < len(names):
            raise FSCSError(f"--novel-count {count}: must be 0..{len(names) - 1} for {len(names)} classes "
                            "(at least one class must stay for training)")
        rng = np.random.default_rng(seed)
        chosen = sorted(names[i] for i in rng.choice(len(names), size=count, replace=False))
    if len(chosen) >= len(names):
        raise FSCSError(f"--novel holds all {len(names)} classes; leave at least one class for training")
    return chosen


def _assign_splits(items: Sequence[FolderItem], novel: set[str], select_fraction: float, seed: int
                   ) -> dict[str, str]:
    """Images with a novel class -> test; the rest: a seeded `select_fraction` -> val (each base class keeps
    >= 2 trn images where possible), others -> trn."""
    split = {it.key: "test" for it in items if novel & set(it.labels)}
    base = [it for it in items if it.key not in split]
    left = Counter(c for it in base for c in it.labels)
    n_val, val = round(select_fraction * len(base)), set()
    for i in np.random.default_rng([seed, 1]).permutation(len(base)):
        if len(val) >= n_val:
            break
        if all(left[c] > 2 for c in base[i].labels):
            val.add(base[i].key)
            left.subtract(base[i].labels)
    split.update({it.key: "val" if it.key in val else "trn" for it in base})
    return split


def plan_folder(images: str | Path, labels: str | Path | None = None, masks: str | Path | None = None, *,
                classes: Sequence[str] | None = None, novel: Sequence[str] | None = None,
                novel_count: int | None = None, seed: int = 0, select_fraction: float = 0.15,
                mask_format: str = "index", shots: Sequence[int] = (1, 5)) -> FolderPlan:
    """Read the labels (CSV or ImageFolder), find masks, number the classes and split; no pixels read."""
    images = Path(images)
    if not images.is_dir():
        raise FSCSError(f"{images}: --images must be a directory of images")
    if mask_format not in MASK_FORMATS:
        raise FSCSError(f"--mask-format {mask_format!r}: use one of {', '.join(MASK_FORMATS)}")
    if not 0.0 <= select_fraction < 1.0:
        raise FSCSError(f"--select-fraction {select_fraction}: must be in [0, 1)")
    masks_dir = Path(masks) if masks is not None else None
    rows = (read_labels_csv(Path(labels), images) if labels is not None else
            scan_image_folder(images, masks_dir))
    counts = Counter(c for _, names, _ in rows for c in names)
    if classes:
        order = list(dict.fromkeys(c.strip() for c in classes if c.strip()))
        extra = sorted(set(counts) - set(order))
        if extra:
            raise FSCSError(f"class {extra[0]!r} (used by the labels) is missing from --classes; add it"
                            f"{_comma_hint(extra)}")
    else:
        order = sorted(counts)
    empty = [c for c in order if counts[c] == 0]
    if empty:
        raise FSCSError(f"class {empty[0]!r} has no images; add images labelled {empty[0]!r} or drop it from "
                        "--classes")
    if len(order) > 254:
        raise FSCSError(f"{len(order)} classes: masks hold at most 254 class ids; merge classes")
    if masks_dir is not None and not masks_dir.is_dir():
        raise FSCSError(f"{masks_dir}: --masks must be a directory")
    rels = [_relative(p, images) for p, _, _ in rows]
    keys = make_keys([r.as_posix() for r in rels])
    items = sorted((FolderItem(k, p, names, _find_mask(masks_dir, r) if masks_dir else None, where)
                    for k, (p, names, where), r in zip(keys, rows, rels)), key=lambda it: it.key)
    chosen = choose_novel(order, novel, novel_count, seed)
    plan = FolderPlan(order, chosen, items, _assign_splits(items, set(chosen), select_fraction, seed),
                      mask_format)
    _warn_small(plan, shots)
    return plan


def _warn_small(plan: FolderPlan, shots: Sequence[int]) -> None:
    """Warnings: classes with too few images for `shots` (masks: `_warn_masks`, after the pixels are read)."""
    need = max(shots or (1,)) + 1
    novel = set(plan.novel)
    per = {s: Counter(c for it in plan.items if plan.split[it.key] == s for c in it.labels)
           for s in ("trn", "test")}
    for c in plan.class_names:
        n = per["test"][c] if c in novel else per["trn"][c]
        if c not in novel and n == 0:
            logger.warning("base class %r: all its images also show a novel class; it is never trained on", c)
        elif n < need:
            logger.warning("class %r has %d %s images; %d-shot episodes need %d (a query + %d supports): add "
                           "images or use fewer shots", c, n, "novel test" if c in novel else "training",
                           need - 1, need, need - 1)
    if not plan.novel:
        logger.warning("no novel classes: every class is trained on and `fscs bench` has nothing to test")

"""`fscs shards folder`: your own images (labels CSV or one folder per class, optional masks) -> shards."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fscs.data import transforms
from fscs.data.shards import ROLES, read_index, write_shards
from fscs.data.transforms import mask_foreground, open_image, upright_rgb
from fscs.data.types import Sample
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MASK_FORMATS = ("index", "binary")
NOVEL_FOLD, BASE_FOLD = 0, 1
"""Layout: fold 0 = held-out (novel) classes, fold 1 = base classes; train with data.fold=0."""
IGNORE = 255
LAYOUT = "fscs-folder/1"
_LABEL_SEP = re.compile(r"[;|,]")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")
_READ_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError)


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


def _one_line(exn: BaseException) -> str:
    text = str(exn).strip().splitlines()
    return f"{type(exn).__name__}: {text[0] if text else ''}"


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


_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png"}
"""Source formats stored byte for byte when the pixels are used unchanged (shards decode them the same way)."""


def _read_image(path: Path, where: str, max_side: int = 0
                ) -> tuple[np.ndarray, tuple[str, bytes] | None, tuple[int, int]]:
    """RGB uint8 [h, w, 3] (EXIF orientation applied); for a JPEG/PNG that needed no rotation nor
    downscaling, its file bytes (`Sample.encoded`: the shard then holds the original file, not a re-encoded
    JPEG); its full upright (H, W). An image over Pillow's ~179 MP limit is read downscaled to max_side."""
    try:
        raw = path.read_bytes()
        with open_image(io.BytesIO(raw)) as im:
            upright = im.getexif().get(0x0112, 1) in (0, 1)  # EXIF orientation: 1 (or none) = as stored
            ext = _KEEP_FORMATS.get(im.format or "") if upright else None
            w, h = im.size
            scale = min(1.0, max_side / max(w, h)) if max_side else 1.0  # as _shrink stores it
            if round(w * scale) * round(h * scale) > transforms.PIL_LIMIT_PIXELS:
                kept = "" if scale == 1.0 else f" (stored at {round(w * scale)}x{round(h * scale)})"
                raise FSCSError(f"{path}: {w}x{h} pixels{kept} is over the "
                                f"{transforms.PIL_LIMIT_PIXELS / 1e6:.0f} MP that training and bench decode "
                                f"from shards ({where}); convert with a --max-side that shrinks it (e.g. 1024, "
                                "the default)")
            image, full = upright_rgb(im, max_side)
            return image, ((ext, raw) if ext and image.shape[:2] == full else None), full
    except Image.DecompressionBombError as exn:  # over MAX_READ_PIXELS: the message has the size and the fix
        raise FSCSError(f"{path}: {exn} ({where})") from None
    except _READ_ERRORS as exn:
        raise FSCSError(f"{path}: unreadable image ({_one_line(exn)}; {where}); re-save it as JPEG/PNG or "
                        "remove it") from None


def _read_png(path: Path, binary: bool) -> np.ndarray:
    """A mask file -> uint8 [H, W]: raw index values, or {0, 1} (nonzero) when `binary`."""
    try:
        with open_image(path) as im:
            if binary:  # the same rule as predict's support masks (alpha-drawn masks included)
                return mask_foreground(im)
            if im.mode in ("L", "P"):
                return np.array(im, dtype=np.uint8)
            if im.mode.startswith("I"):
                arr = np.asarray(im)
                if arr.size and (arr.max() > 255 or arr.min() < 0):
                    raise FSCSError(f"{path}: mask values up to {arr.max()}; save an 8-bit index PNG")
                return arr.astype(np.uint8)
            raise FSCSError(f"{path}: mask mode {im.mode} is not an index PNG; save it as 8-bit grayscale/"
                            "palette with class ids, or binary PNGs per class (masks/<image>/<class>.png)")
    except _READ_ERRORS as exn:
        raise FSCSError(f"{path}: unreadable mask ({_one_line(exn)}); re-save it as PNG or remove it"
                        ) from None


def turned_hint(mask_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> str:
    """A hint when a mask has its image's size turned 90 degrees: drawn on the image as stored, not upright."""
    if mask_shape[:2] != image_shape[:2] and mask_shape[:2] == image_shape[1::-1]:
        return ("; it has the image's size turned 90 degrees: masks match the upright image (EXIF orientation "
                "applied), rotate the mask the same way")
    return ""


def _check_size(mask: np.ndarray, mpath: Path, size: tuple[int, int], ipath: Path) -> None:
    """`size`: the image's full upright (H, W)."""
    if mask.shape != size:
        raise FSCSError(f"{mpath}: mask is {mask.shape[1]}x{mask.shape[0]} but image {ipath} is "
                        f"{size[1]}x{size[0]} (WxH); masks must match their image pixel for "
                        f"pixel{turned_hint(mask.shape, size)}")


def _read_mask(item: FolderItem, size: tuple[int, int], plan: FolderPlan) -> np.ndarray:
    """The item's mask as absolute ids (0 bg, 1..C, 255 ignore) at the image's full size (H, W), validated
    against its labels."""
    ids, path = plan.class_id, item.mask
    assert path is not None
    if path.is_dir():
        mask = np.zeros(size, dtype=np.uint8)
        files = {p.stem: p for p in _png_files(path)}
        for name, f in files.items():
            if name not in ids:
                raise FSCSError(f"{f}: {name!r} is not a class ({', '.join(plan.class_names)}); rename or "
                                "remove it")
            if name not in item.labels:
                raise FSCSError(f"{f}: class {name!r} is not labelled for {item.path.name} ({item.where}); "
                                "add the label or remove the mask")
            fg = _read_png(f, binary=True).astype(bool)
            _check_size(fg, f, size, item.path)
            taken = mask != 0
            mask[fg & taken] = IGNORE  # overlapping classes: ignore
            mask[fg & ~taken] = ids[name]
        missing = [c for c in item.labels if c not in files]
        if missing:
            raise FSCSError(f"{path}/: no {missing[0]}.png although {item.path.name} is labelled "
                            f"{missing[0]!r}; add it (otherwise that object would count as background)")
        return mask
    if plan.mask_format == "binary":
        if len(item.labels) != 1:
            raise FSCSError(f"{path}: --mask-format binary needs single-label images, {item.path.name} has "
                            f"{len(item.labels)} labels; use masks/<image>/<class>.png")
        fg = _read_png(path, binary=True)
        _check_size(fg, path, size, item.path)
        return fg * np.uint8(ids[item.labels[0]])
    mask = _read_png(path, binary=False)
    _check_size(mask, path, size, item.path)
    values = {int(v) for v in np.unique(mask)}
    for v in sorted(values):
        if v in (0, IGNORE):
            continue
        if not 1 <= v <= len(plan.class_names):
            raise FSCSError(f"{path}: value {v} is not a class id (1..{len(plan.class_names)} in the class "
                            "order of index.json / --classes) nor 0/255; fix the mask")
        if plan.class_names[v - 1] not in item.labels:
            raise FSCSError(f"{path}: contains class {plan.class_names[v - 1]!r} (id {v}), not labelled for "
                            f"{item.path.name} ({item.where}); add the label or fix the mask")
    if values == {0, IGNORE}:
        # a 0/255 black-and-white mask read as index PNG: every object would be 'ignore', never scored
        raise FSCSError(f"{path}: only 0 and 255 (ignore), no pixel of {'/'.join(item.labels)}; a binary "
                        "mask (255 = the object) needs --mask-format binary (or masks/<image>/<class>.png)")
    return mask


def _shrink(image: np.ndarray, mask: np.ndarray | None, max_side: int
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """Downscale so the longer side is <= max_side (image bilinear, mask nearest); 0 = keep size. A mask
    larger than its image (read downscaled: `_read_image`) is brought to the image's size."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        if mask is not None and mask.shape != (h, w):
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        return image, mask
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, reducing_gap=2.0))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return image, mask


def iter_folder_samples(plan: FolderPlan, max_side: int = 1024) -> Iterator[tuple[Sample, str]]:
    """(Sample, split) per planned image; FSCSError naming the file on any unreadable/inconsistent input."""
    ids = plan.class_id
    for item in plan.items:
        image, encoded, full = _read_image(item.path, item.where, max_side)
        mask = _read_mask(item, full, plan) if item.mask is not None else None
        if mask is not None:
            empty = [c for c in item.labels if not (mask == ids[c]).any()]
            if len(empty) == len(item.labels):  # all 0 / all 255: e.g. an unannotated image's blank export
                logger.warning("%s: no pixel of %s (labelled for %s); stored without a mask, not as an image "
                               "whose objects are background", item.mask, "/".join(empty), item.path.name)
                mask = None
            elif empty:
                logger.warning("%s: labelled %s but its mask has no pixels of it", item.mask, empty)
        shrunk, mask = _shrink(image, mask, max_side)
        if shrunk is not image:
            encoded = None  # resized pixels: written as JPEG quality 95
        yield (Sample(item.key, shrunk, mask, tuple(sorted(ids[c] for c in item.labels)), encoded=encoded),
               plan.split[item.key])


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

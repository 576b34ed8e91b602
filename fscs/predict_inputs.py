"""`fscs predict`'s inputs: the support folder (classes, images, optional masks) and the query images, read upright."""
from __future__ import annotations

import glob
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fscs.data.sources.folder_pixels import turned_hint
from fscs.data.transforms import mask_foreground, open_image, upright_rgb
from fscs.errors import FSCSError

# the logger name of these lines before they moved out of fscs/predict.py: the log reads as before
logger = logging.getLogger("fscs.predict")

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
_READ_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError)
SUPPORT_SIDE = 2048
"""Support images over Pillow's ~179 MP limit are read with this longer side (the model sees far fewer)."""


def read_image(path: Path, max_side: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 [h, w, 3] upright, its full (H, W)): an image over Pillow's ~179 MP limit is read downscaled to
    max_side (`upright_rgb`); raises the PIL/OS error for unreadable files (and for one over ~537 MP)."""
    with open_image(path) as im:
        return upright_rgb(im, max_side)


def read_rgb(path: Path, max_side: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] (EXIF orientation applied; see `read_image`)."""
    return read_image(path, max_side)[0]


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


@dataclass
class SupportClass:
    """One support class: images [K] of uint8 [H, W, 3], binary masks uint8 {0,1} [H, W] or None, files."""

    name: str
    files: list[Path] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)


def _support_mask(img_path: Path, shape: tuple[int, ...], read_shape: tuple[int, ...] | None = None
                  ) -> np.ndarray | None:
    """`<stem>.mask.png` beside the image or `masks/<stem>.png` in its class folder (nonzero = object); the
    file must have the image's full size `shape`, it is returned at `read_shape` (default `shape`)."""
    stem = img_path.stem
    for folder, name in ((img_path.parent, f"{stem}.mask.png"), (img_path.parent / "masks", f"{stem}.png")):
        cand = folder / name
        if not cand.is_file() and folder.is_dir():  # b.MASK.PNG is skipped as an image: it is b's mask
            cand = next((f for f in folder.iterdir() if f.name.lower() == name.lower() and f.is_file()), cand)
        if cand.is_file():
            try:
                with open_image(cand) as im:
                    mask = mask_foreground(im)  # alpha where it varies, else grey > 0
            except _READ_ERRORS as exn:
                logger.warning("%s: unreadable support mask (%s); ignored", cand, exn)
                return None
            if mask.shape != shape[:2]:
                logger.warning("%s: mask %s differs from its image %s; ignored%s", cand, mask.shape, shape[:2],
                               turned_hint(mask.shape, shape))
                return None
            if not mask.any():  # a support image shows its class: an empty mask is a broken file, not a label
                logger.warning("%s: the mask marks no pixel; ignored (pseudo-mask used instead)", cand)
                return None
            if read_shape is not None and tuple(read_shape[:2]) != mask.shape:  # a downscaled large image
                mask = np.asarray(Image.fromarray(mask).resize(read_shape[1::-1], Image.NEAREST))
            return mask
    return None


def scan_support(support_dir: str | Path, max_side: int = SUPPORT_SIDE) -> list[SupportClass]:
    """Support folder: one sub-folder per class with a few images (+ optional masks); bad images skipped;
    images over Pillow's ~179 MP limit are read with their longer side max_side."""
    root = Path(support_dir)
    dirs = sorted(d for d in (root.iterdir() if root.is_dir() else ()) if d.is_dir() and d.name[0] != ".")
    if not dirs:
        raise FSCSError(f"{root}: --support must be a folder with one sub-folder of images per class")
    classes = []
    for d in dirs:
        sc = SupportClass(d.name)
        for p in sorted(p for p in d.iterdir() if _is_image(p) and not p.name.lower().endswith(".mask.png")):
            try:
                img, full = read_image(p, max_side)
            except _READ_ERRORS as exn:
                logger.warning("%s: unreadable support image (%s); skipped", p, exn)
                continue
            sc.files.append(p)
            sc.images.append(img)
            sc.masks.append(_support_mask(p, full, img.shape))
        if not sc.files:
            raise FSCSError(f"{d}: support class {d.name!r} has no readable images; add a few or remove the "
                            "folder")
        classes.append(sc)
    if len(classes) > 254:
        raise FSCSError(f"{root}: {len(classes)} support classes; masks hold at most 254, split the support "
                        "folder")
    return classes


def expand_queries(patterns: Iterable[str]) -> list[Path]:
    """Query arguments (files, folders searched recursively but without `*.mask.png`, globs) -> unique image
    files in order; a file reached twice (absolute and relative path, overlapping globs, a symlink) is
    predicted once, under the first spelling."""
    out: dict[Path, Path] = {}  # resolved -> as given
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():  # without the `*.mask.png` masks of a folder laid out like --support
            found = sorted(f for f in p.rglob("*")
                           if _is_image(f) and not f.name.lower().endswith(".mask.png"))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(pat, recursive=True) if _is_image(Path(f)))
            if not found:
                logger.warning("query %r: no such file, folder or matching image; skipped", pat)
        for f in found:
            out.setdefault(f.resolve(), f)
    return list(out.values())

"""`fscs shards folder` pixels: planned images read upright and size-capped, masks checked -> Samples."""
from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fscs.data import transforms
from fscs.data.sources.folder_plan import FolderItem, FolderPlan, _png_files
from fscs.data.transforms import mask_foreground, open_image, upright_rgb
from fscs.data.types import Sample
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

IGNORE = 255
_READ_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError)


def _one_line(exn: BaseException) -> str:
    text = str(exn).strip().splitlines()
    return f"{type(exn).__name__}: {text[0] if text else ''}"


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

"""Image/mask to tensor transforms shared by evaluation and training (ImageNet normalisation)."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

PIL_LIMIT_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
"""Pillow refuses larger images (~179 MP) as possible decompression bombs, a guard for untrusted uploads."""
MAX_READ_PIXELS = 1 << 29
"""The largest image fscs reads (~537 MP, e.g. 30000 x 17000): a PNG/TIFF of that size decodes to ~2 GB
before it is downscaled (a JPEG is decoded at 1/2 to 1/8 scale: far less)."""


@contextlib.contextmanager
def _no_bomb_check() -> Iterator[None]:
    """Pillow's decompression-bomb check off for the block: it runs when a file is opened and again when
    some formats decode their pixels (TIFF checks its tile size at load), so both need it lifted."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def open_image(source: str | Path | BinaryIO) -> Image.Image:
    """Image.open for the user's own files: no decompression-bomb refusal up to MAX_READ_PIXELS (drone,
    satellite and scanner images are often over Pillow's ~179 MP); a larger image raises
    DecompressionBombError naming its size and the fix. Only the header is read here: decode it with
    `upright_rgb` (which keeps the check off while the pixels are read)."""
    with _no_bomb_check():
        im = Image.open(source)
    w, h = im.size
    if w * h > MAX_READ_PIXELS:
        im.close()
        side = int(max(w, h) * (MAX_READ_PIXELS / (w * h)) ** 0.5)
        raise Image.DecompressionBombError(
            f"{w}x{h} pixels ({w * h / 1e6:.0f} MP) is over the {MAX_READ_PIXELS / 1e6:.0f} MP fscs reads; "
            f"downscale it (longer side <= {side} px, e.g. to 8000 px) and save it as JPEG/PNG")
    return im


def upright_rgb(im: Image.Image, max_side: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """An opened image -> (uint8 [h, w, 3] RGB with its EXIF orientation applied, its full upright (H, W)).

    An image over Pillow's limit (PIL_LIMIT_PIXELS) is read downscaled so its longer side is max_side
    (0 = full size): a JPEG is decoded at a reduced scale, other formats are reduced right after decoding,
    so memory stays near the working size. Other images are returned at full size, (h, w) == (H, W).
    The size was checked by `open_image`: Pillow's own check stays off while the pixels are decoded.
    """
    with _no_bomb_check():
        return _upright_rgb(im, max_side)


def _upright_rgb(im: Image.Image, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    w, h = im.size
    orientation = im.getexif().get(0x0112, 1)
    full = (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # EXIF: turned 90 degrees
    if not (max_side and w * h > PIL_LIMIT_PIXELS and max(w, h) > max_side):
        return pil_rgb(ImageOps.exif_transpose(im)), full
    scale = max_side / max(w, h)
    im.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))  # JPEG: decoded at 1/2..1/8 scale
    if orientation not in (0, 1):  # (exif_transpose would copy even an upright image)
        im = ImageOps.exif_transpose(im)
    sixteen = im.mode.startswith("I;16")  # resized as 32-bit, then scaled like 16-bit data (pil_rgb)
    if sixteen:
        im = im.convert("I")
    elif im.mode not in ("I", "F", "RGB"):
        im = im.convert("RGB")
    size = (max(1, round(full[1] * scale)), max(1, round(full[0] * scale)))  # (w, h) as _shrink rounds it
    if im.size != size:
        im = im.resize(size, Image.BILINEAR, reducing_gap=2.0)
    if sixteen:
        im = Image.fromarray(np.asarray(im).clip(0, 65535).astype(np.uint16))
    return pil_rgb(im), full


def pil_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image -> uint8 [H, W, 3] RGB, also for high-bit-depth grayscale (modes I;16*, I, F).

    PIL's convert("RGB") clips those modes at 255, so a 16-bit PNG became a white image: 16-bit data is
    scaled by 1/257 (exact for 8-bit data stored in 16 bits), float data in [0, 1] by 255, other integer or
    float data by its maximum.
    """
    mode = im.mode
    if not (mode.startswith("I") or mode == "F"):
        return np.array(im.convert("RGB"), dtype=np.uint8)  # writable (torch.from_numpy needs that)
    arr = np.asarray(im).astype(np.float64)
    if mode.startswith("I;16"):
        scale = 65535.0
    elif mode == "F" and arr.size and arr.max() <= 1.0:
        scale = 1.0
    else:
        top = float(arr.max()) if arr.size else 0.0
        scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    grey = np.clip(np.rint(arr * (255.0 / scale)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def mask_foreground(im: Image.Image) -> np.ndarray:
    """A binary mask file -> uint8 {0,1} [H, W], 1 = object; the one rule of `fscs predict` support masks and
    `fscs shards folder` binary masks.

    A mask with transparency (RGBA, LA, PA, or a palette with a transparent entry) whose alpha is not the
    same everywhere was drawn on a transparent layer: the object is where alpha > 0, whatever its colour
    (black on transparent white is not inverted). Otherwise the object is where the grey level is > 0.
    """
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        if alpha.size and alpha.min() != alpha.max():
            return (alpha > 0).astype(np.uint8)
    return (np.asarray(im.convert("L")) > 0).astype(np.uint8)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor_image(img: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float32 [3, size, size]: bilinear resize (antialiased), ImageNet mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [H, W] label mask -> int64 [size, size] by nearest-neighbour resize (labels kept exactly)."""
    m = torch.from_numpy(np.ascontiguousarray(mask)).long()
    if m.shape != (size, size):
        m = F.interpolate(m[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    return m

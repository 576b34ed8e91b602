"""Image/mask to tensor transforms shared by evaluation and training (ImageNet normalisation)."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)


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

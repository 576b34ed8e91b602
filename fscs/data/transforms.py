"""Image/mask to tensor transforms shared by evaluation and training (ImageNet normalisation)."""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

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

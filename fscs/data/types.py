"""Plain data records shared by the data stages."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One image with its (optional) index mask and image-level labels.

    image: uint8 [H, W, 3] RGB; mask: uint8 [H, W] with absolute class ids (0 background,
    1..C classes, 255 ignore) or None when masks are not decoded; labels: sorted class ids present;
    encoded: optional (ext, bytes) of the source file ("jpg" or "png") that decodes to exactly `image`;
    shard writers store it as is instead of re-encoding the pixels.
    """

    key: str
    image: np.ndarray
    mask: np.ndarray | None
    labels: tuple[int, ...]
    encoded: tuple[str, bytes] | None = None

"""Tiny generated "own data" for integration tests: coloured shapes on textured backgrounds, labels, masks."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64
CLASSES = {"disk": (220, 40, 40), "square": (40, 180, 60), "triangle": (40, 80, 220), "cross": (230, 200, 30),
           "ring": (200, 60, 200), "bar": (30, 200, 200)}


def shape_mask(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """bool [size, size] mask of one object of class `name` at a random place and scale."""
    yy, xx = np.mgrid[:size, :size]
    r = rng.uniform(0.15, 0.3) * size
    cy, cx = rng.uniform(r, size - r, 2)
    dy, dx = yy - cy, xx - cx
    if name == "disk":
        return dy**2 + dx**2 < r**2
    if name == "ring":
        return (dy**2 + dx**2 < r**2) & (dy**2 + dx**2 > (0.55 * r) ** 2)
    if name == "square":
        return (abs(dy) < r * 0.8) & (abs(dx) < r * 0.8)
    if name == "triangle":
        return (dy < r * 0.7) & (dy > -r) & (abs(dx) < (dy + r) * 0.6)
    if name == "cross":
        return ((abs(dy) < r * 0.3) & (abs(dx) < r)) | ((abs(dx) < r * 0.3) & (abs(dy) < r))
    return (abs(dy) < r * 0.25) & (abs(dx) < r)  # bar


def make_image(labels: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Textured background + one object per label: image uint8 [S, S, 3], index mask (ids in sorted order)."""
    rng = np.random.default_rng(seed)
    ids = {n: i for i, n in enumerate(sorted(CLASSES), start=1)}
    yy, xx = np.mgrid[:SIZE, :SIZE]
    stripes = (np.sin(xx * rng.uniform(0.2, 0.8) + yy * rng.uniform(0.1, 0.5)) > 0)[..., None]
    img = np.where(stripes, rng.integers(60, 140, 3), rng.integers(60, 140, 3)).astype(np.float32)
    img += rng.normal(0, 10, img.shape)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for name in labels:
        m = shape_mask(name, SIZE, rng) & (mask == 0)
        img[m] = np.array(CLASSES[name]) + rng.normal(0, 8, (int(m.sum()), 3))
        mask[m] = ids[name]
    return img.clip(0, 255).astype(np.uint8), mask


def write_dataset(root: Path, masked: Callable[[str, int], bool], per_class: int = 12
                  ) -> tuple[Path, Path, Path]:
    """6 classes x `per_class` images (every 4th also shows the next class), labels.csv, and masks/<image>.png
    for the images where masked(class, i) holds. Returns (images dir, labels.csv, masks dir)."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True), masks.mkdir(parents=True)
    names, rows, seed = sorted(CLASSES), ["image,labels"], 0
    for ci, c in enumerate(names):
        for i in range(per_class):
            labels = [c] + ([names[(ci + 1) % 6]] if i % 4 == 3 else [])
            img, mask = make_image(labels, seed)
            seed += 1
            Image.fromarray(img).save(images / f"{c}_{i:02d}.jpg", quality=95)
            if masked(c, i):
                Image.fromarray(mask, "L").save(masks / f"{c}_{i:02d}.png")
            rows.append(f"{c}_{i:02d}.jpg,{';'.join(labels)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return images, root / "labels.csv", masks

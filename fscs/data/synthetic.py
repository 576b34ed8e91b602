"""Procedural FS-CS dataset `synthetic-5i`: 20 shape/texture classes in 4 folds, VOC-style masks."""
from __future__ import annotations

import logging
from types import MappingProxyType
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fscs.data.types import Sample
from fscs.errors import FSCSError
from fscs.parallel import ordered_map

logger = logging.getLogger(__name__)

DATASET_NAME = "synthetic-5i"
GENERATOR_VERSION = 1
MIN_SIZE = 96
MAX_SIZE = 2048
"""Larger synthetic images only cost memory (a 100,000 px side was a MemoryError deep in numpy)."""
NUM_FOLDS = 4
IGNORE = 255
# Split of the 5-image blocks of one group, by block index mod 15: 10 trn, 2 val, 3 test, interleaved so
# that even tiny datasets hold every split.
_SPLIT_CYCLE = ("trn", "trn", "test", "trn", "val", "trn", "trn", "test", "trn", "trn",
                "val", "trn", "test", "trn", "trn")
_TAU = 2.0 * np.pi

ShapeFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _polygon(u: np.ndarray, v: np.ndarray, n: int, radius: float) -> np.ndarray:
    """Inside test of a regular n-gon with circumradius `radius` (a vertex on +v)."""
    inside = np.ones(u.shape, dtype=bool)
    for k in range(n):
        a = np.pi / 2 + np.pi / n + _TAU * k / n
        inside &= u * np.cos(a) + v * np.sin(a) < radius * np.cos(np.pi / n)
    return inside


def _star(r: np.ndarray, t: np.ndarray, points: int, inner: float, outer: float) -> np.ndarray:
    tri = np.abs(2.0 * ((t * points / _TAU) % 1.0) - 1.0)  # 1 at the tips, 0 between them
    return r < inner + (outer - inner) * tri ** 2


# Shape inside-tests on object coordinates u, v in about [-1, 1] (r = radius, t = angle).
_SHAPES: MappingProxyType[str, ShapeFn] = MappingProxyType({
    "disk": lambda u, v, r, t: r < 0.95,
    "square": lambda u, v, r, t: np.maximum(np.abs(u), np.abs(v)) < 0.68,
    "triangle": lambda u, v, r, t: _polygon(u, v, 3, 0.98),
    "ring": lambda u, v, r, t: (r < 0.95) & (r > 0.55),
    "cross": lambda u, v, r, t: ((np.abs(u) < 0.28) & (np.abs(v) < 0.92))
    | ((np.abs(v) < 0.28) & (np.abs(u) < 0.92)),
    "star": lambda u, v, r, t: _star(r, t, 5, 0.38, 0.98),
    "crescent": lambda u, v, r, t: (r < 0.92) & ((u - 0.42) ** 2 + v**2 > 0.7**2),
    "heart": lambda u, v, r, t: ((1.15 * u) ** 2 + (1.15 * v) ** 2 - 1) ** 3
    - (1.15 * u) ** 2 * (-1.15 * v) ** 3 < 0,
    "hexagon": lambda u, v, r, t: _polygon(u, v, 6, 0.92),
    "arrow": lambda u, v, r, t: ((np.abs(v) < 0.2) & (u > -0.92) & (u < 0.1))
    | ((u >= 0.0) & (u < 0.92) & (np.abs(v) < (0.92 - u) * 0.75)),
    "ell": lambda u, v, r, t: ((u > -0.7) & (u < -0.2) & (np.abs(v) < 0.8))
    | ((u > -0.7) & (u < 0.7) & (v > 0.3) & (v < 0.8)),
    "tee": lambda u, v, r, t: ((np.abs(u) < 0.8) & (v > -0.8) & (v < -0.35))
    | ((np.abs(u) < 0.24) & (np.abs(v) < 0.8)),
    "bowtie": lambda u, v, r, t: ((np.abs(v) < np.abs(u) * 0.9 + 0.08) & (np.abs(u) < 0.85)),
    "clover": lambda u, v, r, t: (r < 0.25)
    | ((u - 0.45 * np.cos(1.571)) ** 2 + (v - 0.45 * np.sin(1.571)) ** 2 < 0.18)
    | ((u - 0.45 * np.cos(3.665)) ** 2 + (v - 0.45 * np.sin(3.665)) ** 2 < 0.18)
    | ((u - 0.45 * np.cos(5.76)) ** 2 + (v - 0.45 * np.sin(5.76)) ** 2 < 0.18),
    "gear": lambda u, v, r, t: (r > 0.22) & (r < 0.66 + 0.28 * (np.cos(8 * t) > 0)),
    "halfdisk": lambda u, v, r, t: (r < 0.95) & (v < 0.15),
    "eich": lambda u, v, r, t: ((np.abs(u) > 0.45) & (np.abs(u) < 0.8) & (np.abs(v) < 0.8))
    | ((np.abs(u) < 0.8) & (np.abs(v) < 0.18)),
    "frame": lambda u, v, r, t: (np.maximum(np.abs(u), np.abs(v)) < 0.7)
    & (np.maximum(np.abs(u), np.abs(v)) > 0.42),
    "pill": lambda u, v, r, t: ((np.abs(v) < 0.36) & (np.abs(u) < 0.56))
    | ((np.abs(u) - 0.56) ** 2 + v**2 < 0.36**2),
    "sparkle": lambda u, v, r, t: np.sqrt(np.abs(u)) + np.sqrt(np.abs(v)) < 0.98,
})


@dataclass(frozen=True)
class SynthClass:
    """One class: a shape, two colours (RGB 0-255) and a texture pattern on object coordinates."""

    name: str
    color_a: tuple[int, int, int]
    color_b: tuple[int, int, int]
    texture: str  # stripes | checker | dots | rings | gradient
    freq: float


SYNTH_CLASSES: tuple[SynthClass, ...] = (
    SynthClass("disk", (220, 40, 40), (250, 215, 60), "stripes", 3.0),
    SynthClass("square", (40, 80, 220), (245, 245, 245), "checker", 2.5),
    SynthClass("triangle", (40, 170, 60), (20, 20, 20), "dots", 3.0),
    SynthClass("ring", (245, 140, 30), (110, 30, 150), "rings", 4.0),
    SynthClass("cross", (210, 50, 180), (60, 220, 230), "gradient", 1.0),
    SynthClass("star", (240, 220, 40), (200, 30, 30), "rings", 3.0),
    SynthClass("crescent", (40, 200, 210), (20, 30, 110), "stripes", 3.5),
    SynthClass("heart", (250, 130, 170), (120, 10, 40), "dots", 3.0),
    SynthClass("hexagon", (140, 85, 40), (230, 200, 150), "checker", 3.0),
    SynthClass("arrow", (150, 230, 50), (10, 90, 30), "gradient", 1.0),
    SynthClass("ell", (30, 40, 120), (250, 150, 40), "dots", 3.5),
    SynthClass("tee", (20, 130, 120), (240, 240, 240), "checker", 3.0),
    SynthClass("bowtie", (130, 60, 200), (250, 240, 80), "stripes", 4.0),
    SynthClass("clover", (120, 130, 30), (250, 250, 250), "rings", 3.5),
    SynthClass("gear", (60, 60, 70), (240, 60, 40), "gradient", 1.0),
    SynthClass("halfdisk", (130, 20, 40), (60, 230, 240), "checker", 2.5),
    SynthClass("eich", (220, 170, 30), (30, 60, 200), "stripes", 3.0),
    SynthClass("frame", (30, 30, 30), (160, 240, 40), "rings", 5.0),
    SynthClass("pill", (235, 235, 235), (30, 150, 60), "dots", 3.0),
    SynthClass("sparkle", (100, 30, 130), (250, 150, 40), "gradient", 1.0),
)
SYNTH_CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in SYNTH_CLASSES)
SYNTH_FOLDS: tuple[tuple[int, ...], ...] = tuple(tuple(range(5 * f + 1, 5 * f + 6)) for f in range(NUM_FOLDS))


def image_assignment(index: int) -> tuple[int, str]:
    """(group, split) of image `index`: group = index mod 4; splits by 5-image blocks (2/3, 2/15, 1/5)."""
    return index % NUM_FOLDS, _SPLIT_CYCLE[(index // (5 * NUM_FOLDS)) % len(_SPLIT_CYCLE)]


def _texture(spec: SynthClass, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, r: np.ndarray
             ) -> np.ndarray:
    """RGB float [h, w, 3] in [0, 1] of one instance, with per-instance colour and frequency jitter."""
    freq = spec.freq * rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 2)
    if spec.texture == "stripes":
        w = (np.sin(np.pi * (freq * u + phase)) > 0).astype(np.float32)
    elif spec.texture == "checker":
        w = (np.sin(np.pi * freq * u + phase) * np.sin(np.pi * freq * v + phase) > 0).astype(np.float32)
    elif spec.texture == "dots":
        fu, fv = (freq * u / 2 + phase) % 1.0 - 0.5, (freq * v / 2 + phase) % 1.0 - 0.5
        w = (fu**2 + fv**2 < 0.09).astype(np.float32)
    elif spec.texture == "rings":
        w = (np.sin(np.pi * freq * r) > 0).astype(np.float32)
    else:
        w = np.clip((u + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
    jitter = rng.normal(0.0, 0.06, size=(2, 3))
    a = np.clip(np.asarray(spec.color_a) / 255.0 + jitter[0], 0, 1).astype(np.float32)
    b = np.clip(np.asarray(spec.color_b) / 255.0 + jitter[1], 0, 1).astype(np.float32)
    return a + (b - a) * w[..., None]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Cluttered RGB float [size, size, 3]: gradient, coarse colour noise, stripes, translucent blobs."""
    lin = np.linspace(0.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    c0, c1 = rng.uniform(0.1, 0.9, size=(2, 3)).astype(np.float32)
    ang = rng.uniform(0, _TAU)
    g = xx * np.cos(ang) + yy * np.sin(ang)
    g = (g - g.min()) / max(float(np.ptp(g)), 1e-6)
    img = c0 + (c1 - c0) * g[..., None]
    n = 5  # coarse grid, bilinearly upsampled with interpolation matrices
    interp = np.clip(1.0 - np.abs(lin[:, None] * (n - 1) - np.arange(n)[None, :]), 0, 1).astype(np.float32)
    coarse = rng.uniform(-0.18, 0.18, size=(n, n, 3)).astype(np.float32)
    img += ((interp @ coarse.transpose(2, 0, 1)) @ interp.T).transpose(1, 2, 0)
    if rng.random() < 0.6:
        period = rng.uniform(5, 22) / size
        sa = rng.uniform(0, _TAU)
        stripe = (np.sin(_TAU * (xx * np.cos(sa) + yy * np.sin(sa)) / period) > 0)[..., None]
        alpha = rng.uniform(0.12, 0.35)
        img = np.where(stripe, img * (1 - alpha) + rng.uniform(0, 1, 3).astype(np.float32) * alpha, img)
    for _ in range(int(rng.integers(2, 6))):  # distractor blobs: soft, translucent, irregular
        cy, cx = rng.uniform(0, size, 2)
        rad = rng.uniform(0.05, 0.14) * size
        y0, y1 = int(max(cy - 3 * rad, 0)), int(min(cy + 3 * rad, size))
        x0, x1 = int(max(cx - 3 * rad, 0)), int(min(cx + 3 * rad, size))
        if y1 <= y0 or x1 <= x0:
            continue
        py, px = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        field = np.zeros(py.shape, dtype=np.float32)
        for dy, dx in rng.normal(0, rad * 0.7, size=(3, 2)):
            field += np.exp(-((py - cy - dy) ** 2 + (px - cx - dx) ** 2) / (2 * rad**2))
        alpha = (np.clip((field - 0.5) / 0.4, 0, 1) * rng.uniform(0.3, 0.6))[..., None]
        col = rng.uniform(0, 1, 3).astype(np.float32)
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + col * alpha
    img += rng.normal(0.0, rng.uniform(0.01, 0.05), size=img.shape).astype(np.float32)
    return img


def _object_classes(rng: np.random.Generator, index: int, group: int) -> list[int]:
    """Absolute class ids of the objects (drawing order), mostly one class per image like PASCAL."""
    group_classes = SYNTH_FOLDS[group]
    primary = group_classes[(index // NUM_FOLDS) % 5]
    distinct = int(rng.choice([1, 2, 3], p=[0.85, 0.12, 0.03]))
    others = [c for c in group_classes if c != primary]
    chosen = [primary] + [int(c) for c in rng.choice(others, size=distinct - 1, replace=False)]
    n_obj = max(distinct, int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])))
    classes = chosen + [int(c) for c in rng.choice(chosen, size=n_obj - distinct)]
    return [classes[i] for i in rng.permutation(len(classes))]


def _check_size(size: int) -> None:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise FSCSError(f"synthetic image size {size} is outside {MIN_SIZE}..{MAX_SIZE}; pass --size in that "
                        "range (128 = the offline default)")


def generate_sample(index: int, seed: int, size: int, group: int, split: str) -> Sample:
    """Render image `index`: image uint8 [size, size, 3], mask uint8 [size, size] (ids, 255 boundary band).

    Objects are drawn in order with hard edges; the mask is the final (occlusion-resolved) instance map,
    so every non-boundary pixel's label matches its drawn colour. Each object keeps >= 50 % visible.
    """
    _check_size(size)
    if not 0 <= group < NUM_FOLDS:
        raise FSCSError(f"synthetic group {group} is not one of 0..{NUM_FOLDS - 1}")
    rng = np.random.default_rng([seed, index])
    img = _background(rng, size)
    inst = np.zeros((size, size), dtype=np.int32)
    cls_of = [0]
    area, visible = [0], [0]
    classes = _object_classes(rng, index, group)
    for c in classes:
        lo, hi = (0.35, 0.6) if len(classes) == 1 else (0.26, 0.46)
        for _attempt in range(8):
            d = rng.uniform(lo, hi) * size
            cy, cx = rng.uniform(0.3 * d, size - 0.3 * d, 2)
            rot = rng.uniform(0, _TAU)
            y0, y1 = int(max(np.floor(cy - d / 2), 0)), int(min(np.ceil(cy + d / 2) + 1, size))
            x0, x1 = int(max(np.floor(cx - d / 2), 0)), int(min(np.ceil(cx + d / 2) + 1, size))
            py, px = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            dy, dx = (py + 0.5 - cy) / (d / 2), (px + 0.5 - cx) / (d / 2)
            u = dx * np.cos(rot) + dy * np.sin(rot)
            v = -dx * np.sin(rot) + dy * np.cos(rot)
            r, t = np.hypot(u, v), np.arctan2(v, u)
            inside = _SHAPES[SYNTH_CLASSES[c - 1].name](u, v, r, t)
            n_in = int(inside.sum())
            if n_in < 0.01 * size * size:  # mostly outside the image
                continue
            covered = np.bincount(inst[y0:y1, x0:x1][inside], minlength=len(cls_of))
            if all(visible[j] - covered[j] >= 0.5 * area[j] for j in range(1, len(cls_of))):
                break
        else:
            continue  # no placement keeps earlier objects visible: drop this object
        for j in range(1, len(cls_of)):
            visible[j] -= int(covered[j])
        cls_of.append(c)
        area.append(n_in)
        visible.append(n_in)
        tex = _texture(SYNTH_CLASSES[c - 1], rng, u, v, r)
        img[y0:y1, x0:x1][inside] = tex[inside]
        inst[y0:y1, x0:x1][inside] = len(cls_of) - 1
    mask = np.asarray(cls_of, dtype=np.uint8)[inst]
    labels = tuple(sorted(int(c) for c in np.unique(mask) if c != 0))
    band = np.zeros((size, size), dtype=bool)  # 2-px band: both pixels of every instance edge
    dh, dv = inst[:, 1:] != inst[:, :-1], inst[1:, :] != inst[:-1, :]
    band[:, 1:] |= dh
    band[:, :-1] |= dh
    band[1:, :] |= dv
    band[:-1, :] |= dv
    mask[band] = IGNORE
    image = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Sample(key=f"synth_{index:06d}", image=image, mask=mask, labels=labels)


def _render(job: tuple[int, int, int]) -> tuple[Sample, str]:
    index, seed, size = job
    group, split = image_assignment(index)
    return generate_sample(index, seed, size, group, split), split


def generate_synthetic(seed: int = 0, num_images: int = 6000, size: int = 128, workers: int = 2
                       ) -> Iterator[tuple[Sample, str]]:
    """Yield (sample, split) for images 0..num_images-1 in index order; identical for any `workers`."""
    if num_images < 1:
        raise FSCSError(f"synthetic num_images={num_images}; pass a positive --num-images")
    _check_size(size)
    jobs = ((i, seed, size) for i in range(num_images))
    yield from ordered_map(_render, jobs, workers, chunksize=32, what="image generator")


def build_synthetic_shards(out_dir: str | Path, seed: int = 0, num_images: int = 6000, size: int = 128,
                           workers: int = 2) -> Path:
    """Generate `synthetic-5i` and write it as shards into `out_dir` (reused when already complete)."""
    from fscs.data.shard_write import write_shards

    params = {"seed": seed, "num_images": num_images, "size": size, "generator": GENERATOR_VERSION}
    return write_shards(generate_synthetic(seed, num_images, size, workers), out_dir, dataset=DATASET_NAME,
                        class_names=SYNTH_CLASS_NAMES, folds=dict(enumerate(SYNTH_FOLDS)), params=params)

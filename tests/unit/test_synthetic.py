"""Tests of the procedural synthetic-5i generator."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from fscs.data.synthetic import (
    SYNTH_CLASS_NAMES,
    SYNTH_CLASSES,
    SYNTH_FOLDS,
    generate_sample,
    generate_synthetic,
    image_assignment,
)
from fscs.errors import FSCSError

SIZE = 96


@pytest.fixture(scope="module")
def samples():
    return list(generate_synthetic(seed=3, num_images=80, size=SIZE, workers=1))


def test_classes_and_folds():
    assert len(SYNTH_CLASS_NAMES) == 20 and len(set(SYNTH_CLASS_NAMES)) == 20
    signatures = {(c.color_a, c.color_b, c.texture) for c in SYNTH_CLASSES}
    assert len(signatures) == 20
    assert [list(f) for f in SYNTH_FOLDS] == [list(range(5 * f + 1, 5 * f + 6)) for f in range(4)]


def test_split_and_group_proportions():
    counts = collections.Counter(image_assignment(i) for i in range(600))
    per_split = collections.Counter()
    for (group, split), n in counts.items():
        per_split[split] += n
        assert 0 <= group < 4
    assert per_split == {"trn": 400, "val": 80, "test": 120}
    # every group gets every split in proportion
    assert all(counts[(g, "test")] == 30 and counts[(g, "val")] == 20 for g in range(4))
    # even the first 200 images hold all splits for every group
    first = collections.Counter(image_assignment(i) for i in range(200))
    assert all(first[(g, s)] > 0 for g in range(4) for s in ("trn", "val", "test"))


def test_deterministic_by_seed_and_index():
    a = generate_sample(7, seed=1, size=SIZE, group=3, split="trn")
    b = generate_sample(7, seed=1, size=SIZE, group=3, split="trn")
    c = generate_sample(7, seed=2, size=SIZE, group=3, split="trn")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.labels == b.labels
    assert not np.array_equal(a.image, c.image)
    assert a.key == "synth_000007"


def test_worker_count_does_not_change_output():
    one = list(generate_synthetic(seed=5, num_images=24, size=SIZE, workers=1))
    two = list(generate_synthetic(seed=5, num_images=24, size=SIZE, workers=2))
    assert [s.key for s, _ in one] == [s.key for s, _ in two] == [f"synth_{i:06d}" for i in range(24)]
    for (x, sx), (y, sy) in zip(one, two):
        assert sx == sy
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)


def test_shapes_labels_and_groups(samples):
    for i, (s, split) in enumerate(samples):
        group, expected_split = image_assignment(i)
        assert split == expected_split
        assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (SIZE, SIZE) and s.mask.dtype == np.uint8
        assert 1 <= len(s.labels) <= 3
        assert set(s.labels) <= set(SYNTH_FOLDS[group])  # only the image's group classes
        values = set(np.unique(s.mask).tolist())
        assert values <= {0, 255, *SYNTH_FOLDS[group]}
        assert tuple(sorted(values - {0, 255})) == s.labels  # labels == classes in the mask
        assert 0.02 < (s.mask > 0).mean() < 0.8


def test_ignore_band_separates_every_label_change(samples):
    for s, _ in samples:
        m = s.mask
        assert (m == 255).sum() > 0
        for a, b in ((m[:, 1:], m[:, :-1]), (m[1:, :], m[:-1, :])):
            touching = (a != 255) & (b != 255)
            assert np.all(a[touching] == b[touching])  # no two labels meet without a band between them
        # the band is thin: every band pixel has a labelled pixel within 2 px
        band = m == 255
        near = np.zeros_like(band)
        padded = np.pad(~band, 2, constant_values=False)
        for dy in range(5):
            for dx in range(5):
                near |= padded[dy:dy + SIZE, dx:dx + SIZE]
        assert np.all(near[band])


def test_mask_matches_drawn_pixels(samples):
    """Interior pixels of a class with a two-colour texture are drawn in (jittered) class colours."""
    checked = 0
    for s, _ in samples:
        m = s.mask
        interior = np.ones_like(m, dtype=bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                interior &= np.roll(np.roll(m, dy, 0), dx, 1) == m
        for c in s.labels:
            spec = SYNTH_CLASSES[c - 1]
            if spec.texture == "gradient":
                continue
            px = s.image[(m == c) & interior].astype(np.float32)
            if len(px) < 20:
                continue
            da = np.abs(px - np.asarray(spec.color_a)).max(axis=1)
            db = np.abs(px - np.asarray(spec.color_b)).max(axis=1)
            assert (np.minimum(da, db) < 70).mean() > 0.95, (s.key, c)
            checked += 1
    assert checked > 20


def test_bad_arguments():
    with pytest.raises(FSCSError, match="size"):
        generate_sample(0, seed=0, size=32, group=0, split="trn")
    with pytest.raises(FSCSError, match="size 100000 is outside 96..2048"):  # not a MemoryError in numpy
        next(generate_synthetic(num_images=1, size=100_000, workers=0))
    with pytest.raises(FSCSError, match="group"):
        generate_sample(0, seed=0, size=SIZE, group=4, split="trn")
    with pytest.raises(FSCSError):
        next(generate_synthetic(num_images=0))

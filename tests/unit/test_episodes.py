"""Tests of evaluation episodes: the protocol sampler, manifests and episode tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fscs.data.episodes import EpisodeSampler, build_manifest, make_episode_tensors, manifest_hash
from fscs.data.shards import load_samples
from fscs.data.synthetic import DATASET_NAME
from fscs.errors import FSCSError

S = 32  # network input size in these tests (images are 96 px)


def _empty_share(index, way, fold=0, n=400):
    sampler = EpisodeSampler(index, "test", fold, way, 1, seed=0)
    empty = 0
    for i in range(n):
        ep = sampler.episode(i)
        empty += not set(ep.classes) & set(index.samples[ep.query]["labels"])
    return empty / n


def test_empty_episode_share(index):
    assert 0.40 <= _empty_share(index, 1) <= 0.60
    assert 0.10 <= _empty_share(index, 2) <= 0.30


def test_episode_protocol(index):
    for role, fold, shot in (("test", 1, 2), ("select", 2, 1)):
        sampler = EpisodeSampler(index, role, fold, way=2, shot=shot, seed=4)
        entries = index.fold_entries(role, fold)
        allowed = set(index.fold_classes(role, fold))
        for i in range(60):
            ep = sampler.episode(i)
            assert (ep.query, ep.query_class) == entries[i % len(entries)]
            assert len(set(ep.classes)) == 2 and set(ep.classes) <= allowed
            assert len(ep.support) == 2 and all(len(keys) == shot == len(set(keys)) for keys in ep.support)
            for c, keys in zip(ep.classes, ep.support):
                for k in keys:
                    assert k != ep.query
                    assert c in index.samples[k]["labels"]
                    assert index.samples[k]["split"] == ("test" if role == "test" else "val")
    # the query's own class is picked about half the time in 1-way
    sampler = EpisodeSampler(index, "test", 0, 1, 1, seed=0)
    own = np.mean([sampler.episode(i).classes[0] == sampler.episode(i).query_class for i in range(400)])
    assert 0.4 < own < 0.6


def test_manifest_hash(index):
    a = build_manifest(EpisodeSampler(index, "test", 0, 2, 1, seed=7), 50)
    b = build_manifest(EpisodeSampler(index, "test", 0, 2, 1, seed=7), 50)
    c = build_manifest(EpisodeSampler(index, "test", 0, 2, 1, seed=8), 50)
    assert a == b and manifest_hash(a) == manifest_hash(b) and len(manifest_hash(a)) == 64
    assert manifest_hash(a) != manifest_hash(c)
    assert {k: a[k] for k in ("dataset", "fold", "way", "shot", "seed", "count", "role")} == {
        "dataset": DATASET_NAME, "fold": 0, "way": 2, "shot": 1, "seed": 7, "count": 50, "role": "test"}
    # episode i does not depend on which other episodes were drawn (ranks take disjoint indices)
    alone = EpisodeSampler(index, "test", 0, 2, 1, seed=7).episode(37).to_dict()
    assert alone == a["episodes"][37]


def test_sampler_errors(index):
    with pytest.raises(FSCSError):
        EpisodeSampler(index, "train", 0, 1, 1, 0)
    with pytest.raises(FSCSError):
        EpisodeSampler(index, "test", 0, 6, 1, 0)
    with pytest.raises(FSCSError, match="images"):
        EpisodeSampler(index, "test", 0, 1, 50, 0)


def test_episode_tensors(index):
    ep = EpisodeSampler(index, "test", 3, 2, 2, seed=1).episode(5)
    samples = load_samples(index, {ep.query, *[k for keys in ep.support for k in keys]})
    t = make_episode_tensors(ep, samples, S)
    assert t["query_img"].shape == (3, S, S) and t["support_img"].shape == (2, 2, 3, S, S)
    assert t["support_mask"].shape == (2, 2, S, S)
    assert set(t["support_mask"].unique().tolist()) <= {0.0, 1.0}
    assert (t["support_mask"].flatten(2).amax(-1) == 1).all()  # every support shows its class
    assert t["query_mask_abs"].dtype == torch.uint8 and t["query_mask_abs"].shape == (96, 96)
    assert t["classes"].tolist() == list(ep.classes)
    labels = set(index.samples[ep.query]["labels"])
    assert t["presence"].tolist() == [float(c in labels) for c in ep.classes]
    assert abs(float(t["query_img"].mean())) < 3


def test_episode_tensors_without_masks_take_presence_from_labels(index):
    """Image-level labels only: no query/support mask tensors; presence from the labels (= from the mask)."""
    for i in range(6):
        ep = EpisodeSampler(index, "test", 1, 2, 1, seed=2).episode(i)
        keys = {ep.query, *[k for keys in ep.support for k in keys]}
        masked = make_episode_tensors(ep, load_samples(index, keys), S)
        plain = make_episode_tensors(ep, load_samples(index, keys, decode_masks=False), S)
        assert "query_mask_abs" not in plain and "support_mask" not in plain
        assert torch.equal(plain["presence"], masked["presence"])
        assert torch.equal(plain["query_img"], masked["query_img"])

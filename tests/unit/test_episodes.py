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


def test_episodes_depend_on_the_seed(index):
    """The sampler reseeds with (seed, i): another seed draws other episodes, not just another label."""
    a = EpisodeSampler(index, "test", 0, 2, 1, seed=7)
    b = EpisodeSampler(index, "test", 0, 2, 1, seed=8)
    differ = sum(a.episode(i).to_dict() != b.episode(i).to_dict() for i in range(20))
    assert differ >= 10


def test_manifest_hash_covers_every_setting_and_each_episode(index):
    """Changing any hashed setting, or one support key of one episode, changes the hash."""
    base = build_manifest(EpisodeSampler(index, "test", 0, 2, 1, seed=7), 5)
    h = manifest_hash(base)
    for key, value in (("dataset", "other"), ("role", "select"), ("fold", 1), ("way", 1), ("shot", 5),
                       ("seed", 8), ("count", 4)):
        assert manifest_hash({**base, key: value}) != h, key
    episodes = [dict(e) for e in base["episodes"]]
    episodes[3] = {**episodes[3], "support": [["not-a-key"], *episodes[3]["support"][1:]]}
    assert manifest_hash({**base, "episodes": episodes}) != h
    assert manifest_hash({**base, "episodes": base["episodes"][::-1]}) != h


def test_sampler_needs_one_more_image_than_shots(index):
    """A class with exactly `shot` images cannot give `shot` supports that exclude a query of that class."""
    counts = {}
    for key, c in index.fold_entries("test", 0):
        counts.setdefault(c, set()).add(key)
    fewest = min(len(keys) for keys in counts.values())
    EpisodeSampler(index, "test", 0, 1, fewest - 1, seed=0)
    with pytest.raises(FSCSError, match="images"):
        EpisodeSampler(index, "test", 0, 1, fewest, seed=0)


def test_presence_comes_from_the_query_mask_not_its_labels():
    """With a query mask, presence is read from the mask (labels may be stale or list tiny objects)."""
    from fscs.data.episodes import EpisodeSpec
    from fscs.data.types import Sample

    img = np.zeros((8, 8, 3), dtype=np.uint8)
    qmask = np.zeros((8, 8), dtype=np.uint8)
    qmask[2:4, 2:4] = 3
    qmask[0, :] = 255
    smask = np.ones((8, 8), dtype=np.uint8)
    samples = {"q": Sample("q", img, qmask, labels=(5,)),
               "s3": Sample("s3", img, smask * 3, labels=(3,)),
               "s5": Sample("s5", img, smask * 5, labels=(5,))}
    spec = EpisodeSpec(0, "q", 3, (3, 5), (("s3",), ("s5",)))
    t = make_episode_tensors(spec, samples, 8)
    assert t["presence"].tolist() == [1.0, 0.0]
    assert torch.equal(t["query_mask_abs"], torch.from_numpy(qmask))


def test_support_masks_mark_only_their_way_class():
    """support_mask [N, K, S, S] is 1 where the support pixel is its own way's class: other classes,
    background and the 255 ignore band are 0."""
    from fscs.data.episodes import EpisodeSpec
    from fscs.data.types import Sample

    img = np.zeros((2, 2, 3), dtype=np.uint8)
    m3 = np.array([[3, 255], [5, 3]], dtype=np.uint8)
    m5 = np.array([[5, 5], [255, 0]], dtype=np.uint8)
    samples = {"q": Sample("q", img, np.zeros((2, 2), dtype=np.uint8), labels=()),
               "a": Sample("a", img, m3, labels=(3, 5)), "b": Sample("b", img, m5, labels=(5,))}
    t = make_episode_tensors(EpisodeSpec(0, "q", 3, (3, 5), (("a",), ("b",))), samples, 2)
    assert t["support_mask"].tolist() == [[[[1.0, 0.0], [0.0, 1.0]]], [[[1.0, 1.0], [0.0, 0.0]]]]
    assert t["presence"].tolist() == [0.0, 0.0]


def test_support_class_probabilities_are_one_half_and_the_rest_shared(index):
    """protocol.md: probability 0.5 for the query entry's class and 0.5 / (C - 1) for each other class, and
    the sampler draws with them (the query's own class in about half of 3000 1-way episodes)."""
    from fscs.data.episodes import support_class_probs

    assert support_class_probs([1, 2, 3, 4, 5], 3).tolist() == [0.125, 0.125, 0.5, 0.125, 0.125]
    p = support_class_probs(list(range(21, 41)), 40)
    assert p[-1] == pytest.approx(0.5) and np.allclose(p[:-1], 0.5 / 19) and p.sum() == pytest.approx(1.0)
    assert support_class_probs([7], 7).tolist() == [1.0]
    sampler = EpisodeSampler(index, "test", 0, 1, 1, seed=0)
    own = np.mean([(lambda e: e.classes[0] == e.query_class)(sampler.episode(i)) for i in range(3000)])
    assert 0.47 < own < 0.53

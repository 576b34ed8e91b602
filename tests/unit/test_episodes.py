"""Tests of evaluation episodes (protocol sampler, manifests, tensors) and the training episode stream."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

import fscs.data.episodes as episodes_mod
from fscs.data.episodes import (
    EpisodeSampler,
    TrainEpisodeStream,
    build_manifest,
    make_episode_tensors,
    make_train_loader,
    manifest_hash,
)
from fscs.data.shards import load_samples, read_index, write_shards
from fscs.data.synthetic import DATASET_NAME, SYNTH_CLASS_NAMES, SYNTH_FOLDS, generate_synthetic
from fscs.errors import FSCSError

S = 32  # network input size in these tests (images are 96 px)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep") / "synth"
    return write_shards(generate_synthetic(seed=0, num_images=300, size=96, workers=1), out,
                        dataset=DATASET_NAME, class_names=SYNTH_CLASS_NAMES,
                        folds=dict(enumerate(SYNTH_FOLDS)),
                        samples_per_shard=40, params={"seed": 0, "n": 300})


@pytest.fixture(scope="module")
def index(shard_dir):
    return read_index(shard_dir)


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


def _stream(shard_dir, **kw):
    args = dict(fold=0, way=2, shot=1, image_size=S, seed=0, use_masks=True, rank=0, world_size=1,
                buffer_per_class=8)
    args.update(kw)
    return TrainEpisodeStream(shard_dir, **args)


def test_stream_with_masks(shard_dir, index):
    eps = [e for _, e in zip(range(6), _stream(shard_dir))]
    train_classes = set(range(6, 21))
    for e in eps:
        assert set(e) == {"query_img", "support_img", "presence", "classes", "support_mask", "query_target"}
        assert e["query_img"].shape == (3, S, S) and e["support_img"].shape == (2, 1, 3, S, S)
        assert e["support_mask"].shape == (2, 1, S, S) and e["query_target"].shape == (2, S, S)
        assert e["query_target"].dtype == torch.long
        assert set(e["query_target"].unique().tolist()) <= {0, 1, 255}
        assert set(e["classes"].tolist()) <= train_classes  # never a fold-0 test class
        for n in range(2):  # presence agrees with the query target
            assert bool(e["presence"][n]) == bool((e["query_target"][n] == 1).any())


def test_stream_without_masks_never_decodes_masks(shard_dir, monkeypatch):
    real = episodes_mod.decode_sample

    def checked(key, files, decode_masks=True):
        assert "mask.png" not in files and not decode_masks
        return real(key, files, decode_masks)

    monkeypatch.setattr(episodes_mod, "decode_sample", checked)
    e = next(iter(_stream(shard_dir, use_masks=False, shot=2)))
    assert set(e) == {"query_img", "support_img", "presence", "classes"}
    assert e["support_img"].shape == (2, 2, 3, S, S)


def test_stream_determinism_and_ranks(shard_dir):
    def summary(stream):
        return [e["classes"].tolist() + [float(e["query_img"].sum())] for _, e in zip(range(5), stream)]

    def first(**kw):
        return summary(_stream(shard_dir, **kw))

    assert first() == first()
    assert first() != first(seed=1)
    assert first(rank=0, world_size=2) != first(rank=1, world_size=2)
    stream = _stream(shard_dir)
    stream.set_epoch(1)
    assert first() != summary(stream)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_fixed_steps(shard_dir, workers):
    loader = make_train_loader(_stream(shard_dir), batch_size=3, num_workers=workers, steps_per_epoch=4)
    for _epoch in range(2):
        batches = list(loader)
        assert len(batches) == 4
        assert batches[0]["support_img"].shape == (3, 2, 1, 3, S, S)
        assert batches[0]["query_target"].shape == (3, 2, S, S)
    assert loader.epoch == 2


def test_stream_skips_corrupt_shard(shard_dir, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    trn = read_index(bad).shard_paths("trn")
    open(trn[0], "wb").write(b"garbage" * 1000)
    data = open(trn[1], "rb").read()
    open(trn[1], "wb").write(data[: len(data) // 3])  # truncated
    with caplog.at_level(logging.WARNING):
        eps = [e for _, e in zip(range(200), _stream(bad))]
    assert len(eps) == 200
    for path in trn[:2]:  # each bad shard is reported once, then left out of the resampling
        assert sum(path in r.getMessage() for r in caplog.records) == 1


def test_stream_all_corrupt_raises(shard_dir, tmp_path):
    bad = tmp_path / "allbad"
    shutil.copytree(shard_dir, bad)
    for p in read_index(bad).shard_paths("trn"):
        open(p, "wb").write(b"garbage" * 100)
    with pytest.raises(FSCSError, match="unreadable"):
        next(iter(_stream(bad)))


def test_full_stream_skips_images_without_masks_not_the_shard(tmp_path, caplog):
    """Own data with masks for some images only: the full regime trains on the masked ones, shard intact."""
    from dataclasses import replace

    samples = [(replace(smp, mask=None) if i % 3 == 0 else smp, split)
               for i, (smp, split) in enumerate(generate_synthetic(seed=0, num_images=300, size=96, workers=1))]
    out = write_shards(samples, tmp_path / "partial", dataset=DATASET_NAME, class_names=SYNTH_CLASS_NAMES,
                       folds=dict(enumerate(SYNTH_FOLDS)), samples_per_shard=400, params={"partial": 1})
    with caplog.at_level(logging.WARNING):
        eps = [e for _, e in zip(range(8), _stream(out))]
    assert len(eps) == 8 and all("query_target" in e for e in eps)
    assert "without mask.png skipped" in caplog.text
    assert "unreadable" not in caplog.text and "bad" not in caplog.text.lower()

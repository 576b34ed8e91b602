"""Tests of the webdataset training stream: episodes, determinism across ranks, fixed steps per epoch, damaged
shards."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

import fscs.data.stream as stream_mod
from fscs.data.shard_write import write_shards
from fscs.data.shards import read_index
from fscs.data.stream import TrainEpisodeStream, make_train_loader
from fscs.data.synthetic import DATASET_NAME, SYNTH_CLASS_NAMES, SYNTH_FOLDS, generate_synthetic
from fscs.errors import FSCSError

S = 32  # network input size in these tests (images are 96 px)


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
    real = stream_mod.decode_sample

    def checked(key, files, decode_masks=True):
        assert "mask.png" not in files and not decode_masks
        return real(key, files, decode_masks)

    monkeypatch.setattr(stream_mod, "decode_sample", checked)
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


def test_ranks_read_disjoint_positions_of_one_shard_sequence(shard_dir, monkeypatch):
    """Every rank resamples the same shard sequence and takes positions rank, rank + P, ... of it (the
    per-rank episode RNG alone would also make ranks differ, so this looks at the shards themselves)."""
    real = stream_mod._split_by_rank
    seen: dict[tuple[int, int], list[str]] = {}

    def spy(src, rank, world_size):
        for item in real(src, rank, world_size):
            seen.setdefault((rank, world_size), []).append(item["url"])
            yield item

    monkeypatch.setattr(stream_mod, "_split_by_rank", spy)
    for rank, world in ((0, 2), (1, 2)):
        for _ in zip(range(12), _stream(shard_dir, rank=rank, world_size=world)):
            pass
    even, odd = seen[(0, 2)], seen[(1, 2)]
    for _ in _stream(shard_dir, rank=0, world_size=1):  # one process: read on until it passed both ranks
        if len(seen[(0, 1)]) > 2 * max(len(even), len(odd)):
            break
    whole = seen[(0, 1)]
    assert len(even) >= 3 and len(odd) >= 3 and len(set(whole)) > 1
    assert even == whole[0::2][:len(even)] and odd == whole[1::2][:len(odd)]


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


def _one_shard_set(tmp_path, *, masks: bool = True):
    from dataclasses import replace

    samples = [(smp if masks else replace(smp, mask=None), split)
               for smp, split in generate_synthetic(seed=0, num_images=300, size=96, workers=1)]
    return write_shards(samples, tmp_path / ("one" if masks else "nomask"), dataset=DATASET_NAME,
                        class_names=SYNTH_CLASS_NAMES, folds=dict(enumerate(SYNTH_FOLDS)),
                        samples_per_shard=400, params={"one": int(masks)})


def test_one_undecodable_image_is_skipped_alone(tmp_path, caplog):
    """A shard with one broken image keeps streaming its other images (it used to be dropped whole: with a
    single shard the stream then stopped with 'all shards are unreadable')."""
    import io
    import tarfile

    out = _one_shard_set(tmp_path)
    index = read_index(out)
    train_keys = {k for k, _ in index.fold_entries("train", 0)}
    (tar_path,) = index.shard_paths("trn")
    broken = None
    with tarfile.open(tar_path) as tin, tarfile.open(f"{tar_path}.new", "w", format=tarfile.USTAR_FORMAT) as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            key, _, ext = member.name.partition(".")
            if broken is None and key in train_keys and ext in ("jpg", "png"):
                broken, data = key, b"not an image" * 10
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    shutil.move(f"{tar_path}.new", tar_path)
    with caplog.at_level(logging.WARNING):
        eps = [e for _, e in zip(range(60), _stream(out))]
    assert len(eps) == 60
    warned = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert warned and all(repr(broken) in w for w in warned)


def test_full_regime_without_any_mask_is_refused(tmp_path, monkeypatch):
    out = _one_shard_set(tmp_path, masks=False)
    with pytest.raises(FSCSError, match="none of the .* training images has a mask.png"):
        _stream(out)
    assert next(iter(_stream(out, use_masks=False)))["support_img"].shape == (2, 1, 3, S, S)  # weak is fine
    raw = read_index(out)
    for meta in raw.samples.values():  # an index written before samples[*].mask existed: caught while streaming
        meta.pop("mask")
    monkeypatch.setattr(stream_mod, "read_index", lambda _dir: raw)
    with pytest.raises(FSCSError, match="training images in a row have no mask.png"):
        next(iter(_stream(out)))


def test_negative_seed_is_a_one_line_error(shard_dir):
    """numpy's generators reject negative seeds: refused at construction, not a ValueError in a loader worker."""
    with pytest.raises(FSCSError, match="seed -1"):
        _stream(shard_dir, seed=-1)


def _skewed_class_shards(tmp_path, query_mode):
    """8 classes in 4 folds; fold 0's training classes 3..8: class 3 has 60 images, the others 6 each. Image
    pixels are constant at 20 * class (8 px, no resize): a query's class can be read back."""
    import numpy as np

    from fscs.data.types import Sample

    counts = {3: 60, 4: 6, 5: 6, 6: 6, 7: 6, 8: 6, 1: 3, 2: 3}
    samples = [(Sample(f"c{c}_{i}", np.full((8, 8, 3), 20 * c, np.uint8), np.full((8, 8), c, np.uint8), (c,)),
                "trn") for c, n in counts.items() for i in range(n)]
    folds, names = {0: [1, 2], 1: [3, 4], 2: [5, 6], 3: [7, 8]}, [f"k{c}" for c in range(1, 9)]
    return write_shards(samples, tmp_path / query_mode, dataset="skewed", class_names=names, folds=folds,
                        samples_per_shard=20, params={"query_mode": query_mode})


def test_class_query_mode_draws_the_query_class_uniformly(tmp_path):
    """COCO-20i shards (query_mode "class"): the reference trains on a uniformly drawn class, then an image of
    it; image-uniform queries gave the frequent class 60 / 90 of the queries instead of 1 / 6."""
    from fscs.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    def query_classes(mode):
        stream = TrainEpisodeStream(_skewed_class_shards(tmp_path, mode), fold=0, way=1, shot=1, image_size=8,
                                    seed=0, use_masks=False, buffer_per_class=8)
        out = []
        for _, e in zip(range(600), stream):
            grey = float(e["query_img"][0, 0, 0]) * IMAGENET_STD[0] + IMAGENET_MEAN[0]
            out.append(round(grey * 255 / 20))
        return out

    classes = query_classes("class")
    assert set(classes) == set(range(3, 9))
    assert 0.11 < classes.count(3) / len(classes) < 0.23  # 1 / 6 (binomial sd 0.015)
    entry = query_classes("entry")  # PASCAL-5i: every image once, so class 3 dominates as it does the list
    assert entry.count(3) / len(entry) > 0.5


def _png_shards(tmp_path, query_mode):
    """8 classes in 4 folds, 48 lossless 16 px images with 1-2 labels and index masks (PNG decodes to the same
    pixels with any libpng; at image_size 16 nothing is resized, so the episode tensors are exact)."""
    import io

    import numpy as np
    from PIL import Image

    from fscs.data.types import Sample

    rng = np.random.default_rng(7)
    samples = []
    for n in range(48):
        labels = tuple(sorted(int(c) for c in rng.choice(8, size=1 + n % 2, replace=False) + 1))
        image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        for i, c in enumerate(labels):
            mask[2 + 6 * i:8 + 6 * i, 3:13] = c
        mask[0, :] = 255
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        samples.append((Sample(f"p{n:02d}", image, mask, labels, encoded=("png", buf.getvalue())), "trn"))
    folds, names = {0: [1, 2], 1: [3, 4], 2: [5, 6], 3: [7, 8]}, [f"k{c}" for c in range(1, 9)]
    return write_shards(samples, tmp_path / f"png-{query_mode}", dataset="png", class_names=names,
                        folds=folds, samples_per_shard=12, params={"query_mode": query_mode})


def _episodes_digest(h, stream, count):
    for _, e in zip(range(count), stream):
        for name in sorted(e):
            t = e[name].contiguous()
            h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(t.numpy().tobytes())


@pytest.mark.parametrize(("mode", "regime"), [("entry", "weak"), ("entry", "full"), ("entry", "mixed"),
                                              ("class", "weak"), ("class", "full"), ("class", "mixed")])
def test_episodes_unchanged_by_buffering_encoded_bytes(tmp_path, mode, regime):
    """The buffers hold the tar members' bytes and decode at episode assembly (they held decoded arrays: ~1 GB
    per worker on COCO). Same seed -> the same episodes, bit for bit: digests recorded with the decoded-array
    buffers (commit 526247c) over 40 episodes of 2-way 2-shot, buffer_per_class 6, two epochs."""
    import hashlib

    expected = {
        ("entry", "weak"): "85bb1eed77bb378f77a843a28705e9190a76f0c7f2eba2145b7d00923ae4773f",
        ("entry", "full"): "4ec617c496539f991990d41fcec55d51b748dbacc395918afbf1f098c4164c2d",
        ("entry", "mixed"): "620e790f88dcbdabbf55aeb7f7a47f51854b6ea5ab348acf0f51b0c2f1ce42fb",
        ("class", "weak"): "c8e3c98afdb2670f976d3cf3479267912d2ed1c8f8ee1720cdc3ddee76199153",
        ("class", "full"): "0e8f1793704bfcd50bb4055faee3df6e2ab4b0be4d1d9f50c5a4a4d8d96cefc2",
        ("class", "mixed"): "62e6704c122b70a2e5e3c4560d8f1cc134ad62a81e8224ce49a97664da997a08",
    }
    stream = TrainEpisodeStream(_png_shards(tmp_path, mode), fold=0, way=2, shot=2, image_size=16, seed=3,
                                use_masks=regime == "full", buffer_per_class=6, shuffle_buffer=8,
                                gt_fraction=0.5 if regime == "mixed" else 0.0)
    h = hashlib.sha256()
    _episodes_digest(h, stream, 40)
    stream.set_epoch(1)
    _episodes_digest(h, stream, 40)
    assert h.hexdigest() == expected[(mode, regime)]


@pytest.mark.parametrize("use_masks", [False, True])
def test_buffers_hold_the_shard_bytes_not_decoded_arrays(shard_dir, monkeypatch, use_masks):
    """What a worker keeps per buffered image is what the tar holds for it (JPEG + json [+ mask.png]), not
    the decoded uint8 arrays: ~7x larger, 2.5 GB of RSS per worker on COCO-like shards (docs/real-data.md)."""
    import tarfile

    import numpy as np

    index = read_index(shard_dir)
    held = []
    real = TrainEpisodeStream._remember

    def spy(self, sample, classes, buffers):
        held.append(sample)
        return real(self, sample, classes, buffers)

    monkeypatch.setattr(TrainEpisodeStream, "_remember", spy)
    eps = [e for _, e in zip(range(8), _stream(shard_dir, use_masks=use_masks))]
    assert len(eps) == 8 and held
    for h in held:
        assert not any(isinstance(v, np.ndarray) for v in vars(h).values()), h.key
        with tarfile.open(index.root / index.samples[h.key]["shard"]) as tf:
            members = {m.name.partition(".")[2]: tf.extractfile(m).read() for m in tf.getmembers()
                       if m.name.partition(".")[0] == h.key}
        assert dict(h.files) == {e: b for e, b in members.items() if use_masks or e != "mask.png"}


def test_balanced_loader_batches_hold_as_many_present_as_absent(shard_dir):
    """data.balance_presence: 1-way batches of 4 from the real stream, two present and two absent each,
    from the same episodes as the plain stream (a reordering)."""
    def batches(balance):
        stream = _stream(shard_dir, way=1, use_masks=False, balance_batch=4 if balance else 0)
        return list(make_train_loader(stream, batch_size=4, num_workers=0, steps_per_epoch=12))

    plain, balanced = batches(False), batches(True)
    counts = [int(b["presence"].sum()) for b in balanced]
    assert sum(c == 2 for c in counts) >= 10, counts
    assert [int(b["presence"].sum()) for b in plain] != counts

    def episodes(bs):
        return sorted((b["classes"][i].tolist(), float(b["query_img"][i].sum())) for b in bs for i in range(4))

    common = set(map(str, episodes(plain))) & set(map(str, episodes(balanced)))
    assert len(common) >= 40  # the first 48 episodes, less the few still waiting in the window


def test_negative_balance_batch_is_a_one_line_error(shard_dir):
    with pytest.raises(FSCSError, match="balance_batch=-1"):
        _stream(shard_dir, balance_batch=-1)

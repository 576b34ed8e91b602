"""Tests of shard writing (atomic, cached), index reading and corrupt-tolerant shard iteration."""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile

import numpy as np
import pytest

from fscs.data.shard_write import write_shards
from fscs.data.shards import (
    CorruptShardLog,
    iter_shard_samples,
    load_samples,
    read_index,
)
from fscs.data.synthetic import (
    DATASET_NAME,
    SYNTH_CLASS_NAMES,
    SYNTH_FOLDS,
    build_synthetic_shards,
    generate_synthetic,
)
from fscs.data.types import Sample
from fscs.errors import FSCSError

N, SIZE, SEED = 120, 96, 11


@pytest.fixture(scope="module")
def generated():
    return list(generate_synthetic(seed=SEED, num_images=N, size=SIZE, workers=1))


def _write(samples, out, per_shard=25, params=None):
    return write_shards(iter(samples), out, dataset=DATASET_NAME, class_names=SYNTH_CLASS_NAMES,
                        folds=dict(enumerate(SYNTH_FOLDS)), samples_per_shard=per_shard,
                        params=params if params is not None else {"seed": SEED})


@pytest.fixture(scope="module")
def shard_dir(generated, tmp_path_factory):
    return _write(generated, tmp_path_factory.mktemp("shards") / "synth")


def test_index_roundtrip(shard_dir, generated):
    index = read_index(shard_dir)
    assert index.dataset == DATASET_NAME and index.num_classes == 20
    assert index.class_names[1] == SYNTH_CLASS_NAMES[0]
    assert index.folds[2] == [11, 12, 13, 14, 15]
    assert len(index.samples) == N
    counts = {s: sum(1 for _, sp in generated if sp == s) for s in ("trn", "val", "test")}
    for split, n in counts.items():
        entries = [s for s in index.shards if s["split"] == split]
        assert sum(s["count"] for s in entries) == n and all(s["count"] <= 25 for s in entries)
        assert [p.rsplit("/", 1)[1] for p in index.shard_paths(split)] == [
            f"{split}-{i:06d}.tar" for i in range(len(entries))]
    raw = json.loads((shard_dir / "index.json").read_text())
    assert raw["format"] == "fscs-shards/1" and set(raw["lists"]) == {"train", "select", "test"}
    assert not list(shard_dir.parent.glob("*.tmp-*"))


def test_samples_decode_like_written(shard_dir, generated):
    index = read_index(shard_dir)
    originals = {s.key: s for s, _ in generated}
    seen = 0
    for sample in iter_shard_samples(index.shard_paths("trn") + index.shard_paths("test")):
        ref = originals[sample.key]
        assert np.array_equal(sample.mask, ref.mask)  # PNG: exact
        err = np.abs(sample.image.astype(int) - ref.image).mean()  # JPEG q95 (4:2:0 chroma): close
        other = originals["synth_000000" if sample.key != "synth_000000" else "synth_000001"]
        assert err < 10 and err < 0.3 * np.abs(sample.image.astype(int) - other.image).mean()
        assert sample.labels == ref.labels
        seen += 1
    assert seen == sum(1 for _, sp in generated if sp != "val")
    no_masks = next(iter_shard_samples(index.shard_paths("val"), decode_masks=False))
    assert no_masks.mask is None and no_masks.labels


def test_tar_members_and_json(shard_dir):
    with tarfile.open(read_index(shard_dir).shard_paths("trn")[0]) as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile(names[2]).read())
    assert names[:3] == ["synth_000000.jpg", "synth_000000.mask.png", "synth_000000.json"]
    assert meta == {"key": "synth_000000", "labels": meta["labels"], "split": "trn", "height": SIZE,
                    "width": SIZE}


def test_lists_separate_folds(shard_dir):
    index = read_index(shard_dir)
    for f in range(4):
        test_classes = set(index.folds[f])
        train = index.fold_entries("train", f)
        assert train and all(not set(index.samples[k]["labels"]) & test_classes for k, _ in train)
        assert all(index.samples[k]["split"] == "trn" and c not in test_classes for k, c in train)
        select = index.fold_entries("select", f)
        assert select and all(index.samples[k]["split"] == "val" and c not in test_classes for k, c in select)
        test = index.fold_entries("test", f)
        assert test and all(index.samples[k]["split"] == "test" and c in test_classes for k, c in test)
        assert index.fold_classes("select", f) == sorted(set(range(1, 21)) - test_classes)


def test_cache_reuses_without_consuming(shard_dir, generated):
    def exploding():
        raise AssertionError("the cached set must not consume samples")
        yield

    before = (shard_dir / "index.json").stat().st_mtime_ns
    assert _write(exploding(), shard_dir) == shard_dir
    assert (shard_dir / "index.json").stat().st_mtime_ns == before
    with pytest.raises(FSCSError, match="delete it or pass another --out"):
        _write(generated, shard_dir, params={"seed": SEED + 1})


def test_build_synthetic_shards_cached(tmp_path, monkeypatch):
    out = build_synthetic_shards(tmp_path / "s", seed=1, num_images=20, size=SIZE, workers=1)
    first = (out / "index.json").read_bytes()

    def no_generation(*args, **kwargs):  # a complete set with the same params must not generate anything
        raise AssertionError("synthetic images regenerated for a complete shard set")
        yield

    with monkeypatch.context() as patch:
        patch.setattr("fscs.data.synthetic.generate_synthetic", no_generation)
        assert build_synthetic_shards(tmp_path / "s", seed=1, num_images=20, size=SIZE, workers=1) == out
        with pytest.raises(AssertionError, match="regenerated"):  # the guard does bite on a new set
            build_synthetic_shards(tmp_path / "u", seed=1, num_images=20, size=SIZE, workers=1)
    assert (out / "index.json").read_bytes() == first
    assert read_index(out).params == {"seed": 1, "num_images": 20, "size": SIZE, "generator": 1}
    # same seed -> byte-identical shards
    again = build_synthetic_shards(tmp_path / "t", seed=1, num_images=20, size=SIZE, workers=2)
    assert (again / "trn-000000.tar").read_bytes() == (out / "trn-000000.tar").read_bytes()


def test_failed_write_leaves_nothing(tmp_path, generated):
    def failing():
        yield from generated[:5]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        _write(failing(), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_bad_samples_rejected(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(FSCSError, match="key"):
        _write([(Sample("bad key!", img, None, (1,)), "trn")], tmp_path / "a")
    with pytest.raises(FSCSError, match="split"):
        _write([(Sample("ok", img, None, (1,)), "train")], tmp_path / "b")
    with pytest.raises(FSCSError, match="labels"):
        _write([(Sample("ok", img, None, (21,)), "trn")], tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_read_index_missing(tmp_path):
    with pytest.raises(FSCSError, match=r"fscs shards synth\|pascal\|coco\|folder \.\.\. --out DIR"):
        read_index(tmp_path / "nowhere")
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(FSCSError, match="invalid shard index"):
        read_index(tmp_path)


def test_corrupt_shards_skipped(shard_dir, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    index = read_index(bad)
    paths = index.shard_paths("trn")
    assert len(paths) >= 4
    data = open(paths[0], "rb").read()
    open(paths[0], "wb").write(data[: len(data) // 2 + 100])  # truncated mid-member
    open(paths[1], "wb").write(b"this is not a tar file" * 300)  # garbage
    with tarfile.open(paths[2]) as tf:  # truncated exactly after a member: only the end marker is missing
        m = tf.getmembers()[5]
        cut = m.offset_data + (m.size + 511) // 512 * 512
    open(paths[2], "wb").write(open(paths[2], "rb").read()[:cut])
    log = CorruptShardLog()
    with caplog.at_level(logging.WARNING, logger="fscs.data.shards"):
        got = list(iter_shard_samples(paths, handler=log))
    assert log.count == 3
    assert all(p in text for p, text in zip(paths[:3], log.errors))
    for p in paths[:3]:
        assert any(p in r.getMessage() for r in caplog.records)
    expected = sum(s["count"] for s in index.shards if s["split"] == "trn") - 3 * 25
    assert len(got) == expected


def test_load_samples(shard_dir):
    index = read_index(shard_dir)
    keys = {"synth_000001", "synth_000050", "synth_000119"}
    got = load_samples(index, keys)
    assert set(got) == keys and all(got[k].mask is not None for k in keys)
    assert load_samples(index, {"synth_000001"}, decode_masks=False)["synth_000001"].mask is None
    with pytest.raises(FSCSError, match="not in the index"):
        load_samples(index, {"nope"})


def test_index_cross_references_and_rebuild_hints(shard_dir, tmp_path):
    """A sample without its shard or a list entry without its sample is an invalid index (one line, with the
    converter that rebuilds this dataset), not a KeyError later."""
    from fscs.data.shards import rebuild_hint

    assert "fscs shards pascal --root" in rebuild_hint("pascal-5i", "d")
    assert "fscs shards coco --root" in rebuild_hint("coco-20i", "d")
    assert "fscs shards folder" in rebuild_hint("my-photos", "d")
    for damage, needle in (("shard", "names no shard"), ("list", "is not among the samples"),
                           ("folds", "fold class 99 is outside 1..num_classes=20")):
        bad = tmp_path / damage
        shutil.copytree(shard_dir, bad)
        raw = json.loads((bad / "index.json").read_text())
        key = next(iter(raw["samples"]))
        if damage == "shard":
            del raw["samples"][key]["shard"]
        elif damage == "folds":  # fold 0's classes would all count as training classes
            raw["folds"]["0"] = [99, 98, 97, 96, 95]
        else:
            del raw["samples"][raw["lists"]["test"]["0"][0][0]]
        (bad / "index.json").write_text(json.dumps(raw))
        with pytest.raises(FSCSError, match=f"invalid shard index .*{needle}.*fscs shards synth --out DIR"):
            read_index(bad)


def _rewrite_tar(path, change):
    """Rewrite the tar at `path` with `change(name, data) -> data | None` (None drops the member)."""
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_verify_shards(shard_dir, tmp_path, capsys):
    """`fscs shards verify` passes a fresh set and names each damaged shard: altered bytes of the same size
    (sha256), a truncated file (size), a missing file, a member dropped from a set without checksums, and
    with --decode an image that no longer decodes."""
    from fscs.cli import main
    from fscs.data.shard_check import verify_shards

    index = read_index(shard_dir)
    assert all(len(s["sha256"]) == 64 for s in index.shards)
    assert verify_shards(index, decode=True) == ([], N)
    assert main(["shards", "verify", str(shard_dir)]) == 0
    assert f"{N} samples" in capsys.readouterr().out

    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    paths = read_index(bad).shard_paths("trn")
    data = bytearray(open(paths[0], "rb").read())
    data[700] ^= 0xFF
    open(paths[0], "wb").write(bytes(data))
    whole = open(paths[1], "rb").read()
    open(paths[1], "wb").write(whole[:-1024])
    os.remove(paths[2])
    problems, _ = verify_shards(read_index(bad))
    assert [p.split(": ", 1) for p in problems] == [
        [paths[0], "content differs from index.json (sha256 mismatch)"],
        [paths[1], f"{os.path.getsize(paths[1])} bytes, index.json says {os.path.getsize(paths[1]) + 1024}"],
        [paths[2], "missing"]]
    assert main(["shards", "verify", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and "3 problem(s) above" in err[3] and "fscs shards synth --out DIR" in err[3]

    old = tmp_path / "old"  # a set written before checksums: sizes, tar structure and members are checked
    shutil.copytree(shard_dir, old)
    raw = json.loads((old / "index.json").read_text())
    for s in raw["shards"]:
        del s["sha256"], s["bytes"]
    (old / "index.json").write_text(json.dumps(raw))
    paths = read_index(old).shard_paths("trn")
    _rewrite_tar(paths[0], lambda name, data: None if name.startswith("synth_000003.") else data)
    _rewrite_tar(paths[1], lambda name, data: b"\xff\xd8 not a jpeg" if name.endswith(".jpg") else data)
    assert verify_shards(read_index(old))[0] == [
        f"{paths[0]}: holds 24 samples, index.json assigns 25 "
        "(missing e.g. ['synth_000003'], unexpected e.g. [])"]
    problems, _ = verify_shards(read_index(old), decode=True)
    assert len(problems) == 26 and all(p.startswith(paths[1]) for p in problems[1:])

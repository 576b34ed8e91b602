"""PASCAL-5i converter: standard VOC layout -> shards, hold-out, validation errors, interruption, protocol."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fscs.cli import main
from fscs.data.episodes import EpisodeSampler
from fscs.data.shards import read_index
from fscs.data.sources import common
from fscs.data.sources.common import carve_holdout
from fscs.data.sources.pascal import convert_pascal, index_from_lists
from fscs.errors import FSCSError

# id -> (height, width, [(class, (y0, x0, y1, x1))])
IMAGES = {
    "2008_000001": (40, 52, [(1, (5, 5, 30, 30))]),
    "2008_000002": (36, 48, [(2, (4, 10, 28, 40)), (7, (20, 2, 34, 14))]),
    "2008_000003": (44, 40, [(6, (8, 8, 36, 32))]),
    "2008_000004": (40, 40, [(3, (2, 2, 20, 20)), (11, (22, 22, 38, 38))]),
    "2008_000005": (32, 44, [(8, (6, 6, 26, 40))]),
    "2008_000006": (40, 36, [(16, (4, 4, 30, 30))]),
    "2008_000007": (38, 46, [(12, (5, 5, 30, 40))]),
    "2008_000008": (40, 40, [(17, (10, 10, 34, 34))]),
    "2008_000009": (36, 36, [(6, (3, 3, 20, 20)), (16, (22, 22, 34, 34))]),
    "2008_000010": (42, 50, [(13, (6, 6, 36, 44))]),
}
LISTS = {
    "trn_fold0.txt": [],
    "trn_fold1.txt": ["2008_000003__06", "2008_000005__08", "2008_000009__06"],
    "trn_fold2.txt": ["2008_000007__12", "2008_000010__13"],
    "trn_fold3.txt": ["2008_000006__16", "2008_000008__17", "2008_000009__16"],
    "val_fold0.txt": ["2008_000001__01", "2008_000002__02", "2008_000004__03"],
    "val_fold1.txt": ["2008_000002__07"],
    "val_fold2.txt": ["2008_000004__11"],
    "val_fold3.txt": [],
}


def draw_mask(h: int, w: int, objects) -> np.ndarray:
    """uint8 [h, w] index mask: objects filled with their class, a 255 band (~2 px) along each border."""
    mask = np.zeros((h, w), np.uint8)
    for c, (y0, x0, y1, x1) in objects:
        obj = np.zeros((h, w), bool)
        obj[y0:y1, x0:x1] = True
        grown = np.zeros_like(obj)
        grown[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
        inner = np.zeros_like(obj)
        inner[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = True
        mask[obj] = c
        mask[grown & ~inner] = 255
    return mask


def make_voc(root: Path, splits: Path, images=IMAGES, lists=LISTS) -> None:
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    for key, (h, w, objects) in images.items():
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = draw_mask(h, w, objects)
        img[mask > 0] = (mask[mask > 0, None].astype(int) * 37) % 256
        Image.fromarray(img).save(root / "JPEGImages" / f"{key}.jpg", quality=95)
        Image.fromarray(mask, "L").save(root / "SegmentationClassAug" / f"{key}.png")
    splits.mkdir(parents=True, exist_ok=True)
    for name, lines in lists.items():
        (splits / name).write_text("".join(f"{ln}\n" for ln in lines))


@pytest.fixture()
def voc(tmp_path) -> tuple[Path, Path]:
    root, splits = tmp_path / "VOCdevkit" / "VOC2012", tmp_path / "splits"
    make_voc(root, splits)
    return root, splits


def _members(shard_dir: Path) -> dict[str, bytes]:
    out = {}
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            out.update({m.name: tf.extractfile(m).read() for m in tf.getmembers()})
    return out


def test_convert_layout_splits_lists_and_masks(voc, tmp_path):
    root, splits = voc
    report = convert_pascal(root, tmp_path / "out", splits=splits, workers=1, select_fraction=0.25, seed=3)
    index = read_index(tmp_path / "out")
    assert index.dataset == "pascal-5i" and index.num_classes == 20 and index.folds[2] == [11, 12, 13, 14, 15]
    assert index.params["query_mode"] == "entry" and index.class_names[20] == "tvmonitor"
    # test = val-list images; of the 7 trn-only images round(0.25 * 7) = 2 are held out as val, 5 stay trn
    splits_of = {k: m["split"] for k, m in index.samples.items()}
    assert {k for k, s in splits_of.items() if s == "test"} == {"2008_000001", "2008_000002", "2008_000004"}
    held = {k for k, s in splits_of.items() if s == "val"}
    assert len(held) == 2 and sum(s == "trn" for s in splits_of.values()) == 5
    assert index.lists["test"][0] == [("2008_000001", 1), ("2008_000002", 2), ("2008_000004", 3)]
    for f in range(4):
        listed = [(ln[:11], int(ln[-2:])) for ln in LISTS[f"trn_fold{f}.txt"]]
        assert sorted(index.lists["train"][f] + index.lists["select"][f]) == sorted(listed)
        assert all(k in held for k, _ in index.lists["select"][f])
        assert not any(k in held for k, _ in index.lists["train"][f])
    assert index.samples["2008_000002"]["labels"] == [2, 7]
    assert (index.samples["2008_000002"]["height"], index.samples["2008_000002"]["width"]) == (36, 48)
    files = _members(tmp_path / "out")
    for key in IMAGES:
        src = np.array(Image.open(root / "SegmentationClassAug" / f"{key}.png"))
        got = np.array(Image.open(io.BytesIO(files[f"{key}.mask.png"])))
        assert np.array_equal(src, got) and (got == 255).any()
        img = np.array(Image.open(io.BytesIO(files[f"{key}.jpg"])), dtype=float)
        ref = np.array(Image.open(root / "JPEGImages" / f"{key}.jpg"), dtype=float)
        assert img.shape == ref.shape and np.abs(img - ref).mean() < 8
    text = "\n".join(report.lines())
    assert not report.reused and "val_fold0.txt 3" in text and "total 10" in text
    assert report.entries["test"] == {0: 3, 1: 1, 2: 1, 3: 0} and report.absent_entries == 0


def test_image_in_training_and_test_lists_is_stored_once_as_test(voc, tmp_path, caplog):
    root, splits = voc
    (splits / "trn_fold1.txt").write_text("2008_000003__06\n2008_000001__06\n")  # 2008_000001 is a val image
    report = convert_pascal(root, tmp_path / "out", splits=splits, workers=1)
    index = read_index(tmp_path / "out")
    assert index.samples["2008_000001"]["split"] == "test" and ("2008_000001", 6) in index.lists["train"][1]
    assert report.in_both == 1 and "1 images appear in both" in caplog.text
    assert report.absent_entries == 1  # its mask has no class 6: reported, not fatal


def test_holdout_is_seeded_exact_and_order_free():
    imgs = [f"im{i:03d}" for i in range(200)]
    a = carve_holdout(imgs, 0.1, 0)
    assert len(a) == 20 and a == carve_holdout(reversed(imgs), 0.1, 0) and a != carve_holdout(imgs, 0.1, 1)
    with pytest.raises(FSCSError, match="select-fraction"):
        carve_holdout(imgs, 1.0, 0)


def test_workers_give_identical_shards(voc, tmp_path):
    root, splits = voc
    convert_pascal(root, tmp_path / "one", splits=splits, workers=1)
    convert_pascal(root, tmp_path / "two", splits=splits, workers=2)
    assert _members(tmp_path / "one") == _members(tmp_path / "two")


def _corrupt(root: Path, case: str) -> tuple[str, str]:
    """Damage the tree; returns (text the error must name, its reason)."""
    jpg, png = root / "JPEGImages" / "2008_000005.jpg", root / "SegmentationClassAug" / "2008_000005.png"
    if case == "missing_image":
        jpg.unlink()
        return str(jpg), "missing"
    if case == "missing_mask":
        png.unlink()
        return str(png), "missing"
    if case == "missing_mask_dir":
        for p in png.parent.iterdir():
            p.unlink()
        png.parent.rmdir()
        return str(png.parent), "directory missing"
    if case == "size_mismatch":
        Image.fromarray(np.zeros((10, 10), np.uint8), "L").save(png)
        return str(png), "!= image"
    if case == "bad_value":
        m = np.array(Image.open(png))
        m[0, 0] = 21
        Image.fromarray(m, "L").save(png)
        return str(png), "outside the PASCAL VOC label set"
    if case == "colour_mask":
        Image.fromarray(np.zeros((32, 44, 3), np.uint8)).save(png)
        return str(png), "not an index PNG"
    if case == "unreadable_image":
        jpg.write_bytes(b"not a jpeg at all")
        return str(jpg), "unreadable image"
    if case == "truncated_mask":
        png.write_bytes(png.read_bytes()[:60])
        return str(png), "unreadable mask"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_image", "missing_mask", "missing_mask_dir", "size_mismatch",
                                  "bad_value", "colour_mask", "unreadable_image", "truncated_mask"])
def test_bad_inputs_abort_with_one_line_error_and_leave_nothing(voc, tmp_path, case):
    root, splits = voc
    path, reason = _corrupt(root, case)
    out = tmp_path / "out"
    with pytest.raises(FSCSError) as err:
        convert_pascal(root, out, splits=splits, workers=1)
    msg = str(err.value)
    assert path in msg and reason in msg and "\n" not in msg
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.parametrize("line, reason", [("2008_000001_01", "is not '<VOC id>"),
                                          ("2008_000001__09", "not one of fold 0")])
def test_bad_list_lines_name_file_and_line(voc, tmp_path, line, reason):
    root, splits = voc
    (splits / "val_fold0.txt").write_text(f"2008_000001__01\n{line}\n")
    with pytest.raises(FSCSError, match=rf"val_fold0\.txt:2: .*{reason}"):
        convert_pascal(root, tmp_path / "out", splits=splits, workers=1)


def test_undecodable_list_is_refused_and_an_empty_one_is_loud(voc, tmp_path, caplog):
    root, splits = voc
    (splits / "val_fold0.txt").write_bytes(b"\xff\xfe2008")
    with pytest.raises(FSCSError, match=r"val_fold0\.txt: unreadable list"):
        convert_pascal(root, tmp_path / "out", splits=splits, workers=1)
    assert not (tmp_path / "out").exists()
    (splits / "val_fold0.txt").write_text("\n")
    with caplog.at_level(logging.WARNING):
        report = convert_pascal(root, tmp_path / "out", splits=splits, workers=1)
    assert "val_fold0.txt: the list has no entries (fold 0 gets none" in caplog.text
    assert "fold0 0" in " ".join(report.lines())


def test_missing_list_file(voc, tmp_path):
    root, splits = voc
    (splits / "trn_fold3.txt").unlink()
    with pytest.raises(FSCSError, match=r"trn_fold3\.txt: split list missing; pass --splits"):
        convert_pascal(root, tmp_path / "out", splits=splits, workers=1)


def test_interrupted_run_then_rerun_then_reuse(voc, tmp_path, monkeypatch):
    root, splits = voc
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"out.tmp-{dead.pid}"  # left by a killed conversion
    stale.mkdir()
    (stale / "trn-000000.tar").write_bytes(b"half")
    calls = {"n": 0}
    real = common.load_job

    def flaky(job):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(common, "load_job", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert_pascal(root, out, splits=splits, workers=1)
    assert not out.exists() and not stale.exists() and not list(tmp_path.glob("out.tmp-*"))
    monkeypatch.setattr(common, "load_job", real)
    first = convert_pascal(root, out, splits=splits, workers=1)
    stamp = (out / "index.json").stat().st_mtime_ns
    (root / "JPEGImages" / "2008_000001.jpg").unlink()  # a complete output is reused without reading images
    again = convert_pascal(root, out, splits=splits, workers=1)
    assert not first.reused and again.reused and again.images == first.images
    assert (out / "index.json").stat().st_mtime_ns == stamp
    with pytest.raises(FSCSError, match="exists but is not a complete"):  # other parameters: never overwrite
        convert_pascal(root, out, splits=splits, workers=1, seed=5)


def test_cli_reports_counts_and_one_line_errors(voc, tmp_path, capsys):
    root, splits = voc
    assert main(["shards", "pascal", "--root", str(root), "--out", str(tmp_path / "o"), "--splits", str(splits),
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "pascal-5i shards written" in out and "entries test: fold0 3" in out
    assert main(["shards", "pascal", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope: not a directory; pass --root VOCdevkit/VOC2012" in err
    for flag in ("--seed", "--workers"):  # argparse usage error (exit 2), not a numpy traceback later
        with pytest.raises(SystemExit) as exit_:
            main(["shards", "pascal", "--root", str(root), "--out", str(tmp_path / "q"), flag, "-1"])
        assert exit_.value.code == 2 and f"argument {flag}: -1 is negative" in capsys.readouterr().err


def test_shipped_lists_give_the_published_empty_episode_shares():
    """1,000 episodes per fold with the real sampler on the real val lists (presence from the lists)."""
    index = index_from_lists()
    assert [len(index.lists["test"][f]) for f in range(4)] == [346, 451, 725, 346]
    assert sum(len(es) for es in index.lists["train"].values()) + sum(
        len(es) for es in index.lists["select"].values()) == 2286 + 3425 + 5883 + 2086
    empty = {1: [], 2: []}
    for way in (1, 2):
        for fold in range(4):
            sampler = EpisodeSampler(index, "test", fold, way, 1, seed=0)
            assert sampler.query_mode == "entry"
            eps = [sampler.episode(i) for i in range(1000)]
            assert [e.query for e in eps[:3]] == [k for k, _ in index.lists["test"][fold][:3]]
            empty[way].append(np.mean([not set(e.classes) & set(index.samples[e.query]["labels"]) for e in eps]))
    assert 0.48 <= np.mean(empty[1]) <= 0.51 and 0.18 <= np.mean(empty[2]) <= 0.22
    assert all(0.42 <= s <= 0.56 for s in empty[1]) and all(0.14 <= s <= 0.25 for s in empty[2])


def test_default_splits_are_the_shipped_lists():
    index = index_from_lists()
    shipped = Path(__file__).resolve().parents[2] / "shards" / "splits" / "pascal"
    assert index.root == shipped and json.dumps(index.params)
    assert os.path.isfile(shipped / "val_fold0.txt")

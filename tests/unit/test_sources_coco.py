"""COCO-20i converter: PNG and instance-JSON routes agree, category mapping, lists, errors, class sampling."""
from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fscs.data.episodes import EpisodeSampler
from fscs.data.shards import ShardIndex, read_index
from fscs.data.sources.coco import (
    COCO_CATEGORIES,
    COCO_FOLDS,
    convert_coco,
    plan_coco,
    render_coco_pngs,
    render_semantic,
)
from fscs.data.sources.common import lists_only_index
from fscs.errors import FSCSError

mask_utils = pytest.importorskip("pycocotools.mask")


def rect(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    """COCO polygon of the pixel block rows y0..y1-1, cols x0..x1-1."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def block(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def uncompressed_rle(m: np.ndarray) -> dict:
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return {"counts": runs, "size": list(m.shape)}


def compressed_rle(m: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"counts": rle["counts"].decode(), "size": list(rle["size"])}


# name -> (subset, h, w, [(category id, segmentation, area, iscrowd)])
def _images() -> dict:
    return {
        "COCO_val2014_000000000001": ("val2014", 40, 50, [(1, rect(2, 2, 40, 36), 1368.0, 0),
                                                          (18, rect(10, 10, 20, 20), 100.0, 0)]),
        "COCO_val2014_000000000002": ("val2014", 36, 44, [(3, uncompressed_rle(block(36, 44, 0, 0, 20, 30)),
                                                           600.0, 1), (2, rect(24, 4, 40, 30), 416.0, 0)]),
        "COCO_train2014_000000000003": ("train2014", 30, 30, [(90, compressed_rle(block(30, 30, 1, 1, 12, 25)),
                                                               264.0, 0), (13, rect(14, 2, 28, 28), 364.0, 0)]),
        "COCO_train2014_000000000004": ("train2014", 32, 40, [(5, rect(5, 5, 35, 25), 600.0, 0)]),
        "COCO_train2014_000000000005": ("train2014", 28, 36, [(6, rect(3, 3, 30, 25), 594.0, 0)]),
    }


# 0-based class -> images, per list file
LISTS = {
    "val_fold0": [(0, "val2014/COCO_val2014_000000000001.jpg")],
    "val_fold1": [(17, "val2014/COCO_val2014_000000000001.jpg"), (1, "val2014/COCO_val2014_000000000002.jpg")],
    "val_fold2": [(2, "val2014/COCO_val2014_000000000002.jpg")],
    "val_fold3": [],
    "trn_fold0": [(79, "train2014/COCO_train2014_000000000003.jpg"), (11, "train2014/COCO_train2014_000000000003.jpg"),
                  (5, "train2014/COCO_train2014_000000000005.jpg")],
    "trn_fold1": [(79, "train2014/COCO_train2014_000000000003.jpg"), (11, "train2014/COCO_train2014_000000000003.jpg"),
                  (4, "train2014/COCO_train2014_000000000004.jpg")],
    "trn_fold2": [(79, "train2014/COCO_train2014_000000000003.jpg"), (11, "train2014/COCO_train2014_000000000003.jpg"),
                  (4, "train2014/COCO_train2014_000000000004.jpg"), (5, "train2014/COCO_train2014_000000000005.jpg")],
    "trn_fold3": [(4, "train2014/COCO_train2014_000000000004.jpg"), (5, "train2014/COCO_train2014_000000000005.jpg")],
}


def make_coco(root: Path, splits: Path, images: dict | None = None, lists: dict | None = None) -> None:
    images, lists = images or _images(), lists or LISTS
    rng = np.random.default_rng(0)
    cats = [{"id": i, "name": n, "supercategory": "x"} for i, n in COCO_CATEGORIES]
    data = {s: {"images": [], "annotations": [], "categories": cats} for s in ("train2014", "val2014")}
    ann_id = 100
    for n, (name, (sub, h, w, anns)) in enumerate(sorted(images.items())):
        (root / sub).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(pixels).convert("L") if n == 3 else Image.fromarray(pixels)  # one grayscale
        im.save(root / sub / f"{name}.jpg", quality=95)
        data[sub]["images"].append({"id": n + 1, "file_name": f"{name}.jpg", "height": h, "width": w})
        for cat, seg, area, crowd in anns:
            ann_id -= 7  # ids deliberately not in area order
            data[sub]["annotations"].append({"id": ann_id, "image_id": n + 1, "category_id": cat,
                                             "segmentation": seg, "area": area, "iscrowd": crowd,
                                             "bbox": [0, 0, 1, 1]})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for sub, d in data.items():
        (root / "annotations" / f"instances_{sub}.json").write_text(json.dumps(d))
    splits.mkdir(parents=True, exist_ok=True)
    for name, rows in lists.items():
        with gzip.open(splits / f"{name}.tsv.gz", "wt") as fh:
            fh.write("".join(f"{c}\t{p}\n" for c, p in rows))


@pytest.fixture()
def coco(tmp_path) -> tuple[Path, Path]:
    root, splits = tmp_path / "COCO2014", tmp_path / "splits"
    make_coco(root, splits)
    return root, splits


def _masks(shard_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".mask.png"):
                    out[m.name[:-9]] = np.array(Image.open(io.BytesIO(tf.extractfile(m).read())))
    return out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own numpy-2 notice
def test_render_rule_small_on_top_crowd_painted_and_matches_pycocotools_coco(coco):
    root, _ = coco
    from pycocotools.coco import COCO

    api = COCO(str(root / "annotations" / "instances_val2014.json"))
    data = json.loads((root / "annotations" / "instances_val2014.json").read_text())
    for img in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        got = render_semantic(anns, img["height"], img["width"])
        assert np.array_equal(got, render_semantic(anns[::-1], img["height"], img["width"]))  # order-free
        expected = np.zeros_like(got)
        for a in sorted(anns, key=lambda a: -a["area"]):  # independent decoding through the COCO API
            expected[api.annToMask(a) > 0] = next(k for k, (cid, _) in enumerate(COCO_CATEGORIES, 1)
                                                  if cid == a["category_id"])
        assert np.array_equal(got, expected)
    ids = {im["file_name"][-6:-4]: im["id"] for im in data["images"]}
    first = render_semantic([a for a in data["annotations"] if a["image_id"] == ids["01"]], 40, 50)
    assert first[15, 15] == 17 and first[30, 30] == 1 and first[0, 0] == 0  # dog (id 18 = class 17) over person
    assert (first == 1).sum() == 38 * 34 - 100
    second = render_semantic([a for a in data["annotations"] if a["image_id"] == ids["02"]], 36, 44)
    assert second[20, 10] == 3 and second[10, 30] == 2  # crowd car (uncompressed RLE) painted


def test_png_and_json_routes_give_identical_shards(coco, tmp_path):
    root, splits = coco
    via_json = convert_coco(root, tmp_path / "json", splits=splits, workers=1, mask_source="json")
    for sub in ("train2014", "val2014"):
        render_coco_pngs(root, sub)
    via_png = convert_coco(root, tmp_path / "png", splits=splits, workers=1)  # auto: PNG folders exist now
    a, b = read_index(tmp_path / "json"), read_index(tmp_path / "png")
    assert a.params["mask_source"] == {"train2014": "json", "val2014": "json"}
    assert b.params["mask_source"] == {"train2014": "png", "val2014": "png"}
    assert a.samples == b.samples and a.lists == b.lists
    ma, mb = _masks(tmp_path / "json"), _masks(tmp_path / "png")
    assert ma.keys() == mb.keys() and len(ma) == 5
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)
    assert via_json.images == via_png.images == {"test": 2, "trn": 3, "val": 0}


def test_category_mapping_lists_folds_and_query_mode(coco, tmp_path):
    root, splits = coco
    convert_coco(root, tmp_path / "out", splits=splits, workers=1, select_fraction=0.0)
    index = read_index(tmp_path / "out")
    assert index.dataset == "coco-20i" and index.num_classes == 80 and index.params["query_mode"] == "class"
    assert index.class_names[12] == "stop sign" and index.class_names[80] == "toothbrush"
    assert index.folds == COCO_FOLDS and index.folds[3][:3] == [4, 8, 12]
    assert index.samples["COCO_train2014_000000000003"]["labels"] == [12, 80]
    assert index.lists["test"][1] == [("COCO_val2014_000000000001", 18), ("COCO_val2014_000000000002", 2)]
    # train[g] pools the trn entries of fold g's classes; training for fold f = union over g != f = trn_fold f
    assert index.lists["train"][3] == [("COCO_train2014_000000000003", 80), ("COCO_train2014_000000000003", 12)]
    for f in range(4):
        want = {(Path(p).stem, c + 1) for c, p in LISTS[f"trn_fold{f}"]}
        assert set(index.fold_entries("train", f)) == want
    mask = _masks(tmp_path / "out")["COCO_train2014_000000000003"]
    assert mask[5, 5] == 80 and mask[10, 20] == 12


def test_sampler_query_by_class_then_image():
    entries = [(f"a{i:02d}", 1) for i in range(40)] + [(f"b{i}", 2) for i in range(4)]
    index = ShardIndex(root=Path("mem"), dataset="toy", num_classes=4, class_names={c: str(c) for c in range(1, 5)},
                       folds={0: [1, 2], 1: [3, 4]}, shards=[],
                       samples={k: {"labels": [c]} for k, c in entries}, lists={"test": {0: entries}},
                       params={"query_mode": "class"})
    by_class = EpisodeSampler(index, "test", 0, 1, 1, seed=0)
    by_entry = EpisodeSampler(index, "test", 0, 1, 1, seed=0, query_mode="entry")
    eps = [by_class.episode(i) for i in range(600)]
    share_b = np.mean([e.query_class == 2 for e in eps])
    assert 0.44 <= share_b <= 0.56 and all(e.query.startswith("b" if e.query_class == 2 else "a") for e in eps)
    assert len({e.query for e in eps if e.query_class == 2}) == 4
    assert np.mean([by_entry.episode(i).query_class == 2 for i in range(600)]) < 0.12
    assert [by_class.episode(i) for i in range(5)] == eps[:5]  # index-seeded
    with pytest.raises(FSCSError, match="query_mode 'image'"):
        EpisodeSampler(index, "test", 0, 1, 1, seed=0, query_mode="image")


def _damage(root: Path, case: str) -> tuple[str, str, str]:
    """(mask source, text the error names, reason)."""
    pngs = root / "annotations" / "train2014"
    if case == "bad_png_value":
        render_coco_pngs(root, "train2014")
        render_coco_pngs(root, "val2014")
        p = pngs / "COCO_train2014_000000000004.png"
        m = np.array(Image.open(p))
        m[0, 0] = 81
        Image.fromarray(m, "L").save(p)
        return "auto", str(p), "outside the COCO label set (0..80 and 255)"
    if case == "missing_png":
        render_coco_pngs(root, "train2014")
        render_coco_pngs(root, "val2014")
        (pngs / "COCO_train2014_000000000005.png").unlink()
        return "auto", str(pngs / "COCO_train2014_000000000005.png"), "missing"
    if case == "json_size_mismatch":
        js = root / "annotations" / "instances_val2014.json"
        data = json.loads(js.read_text())
        data["images"][0]["height"] = 41
        js.write_text(json.dumps(data))
        return "json", "instances_val2014.json [COCO_val2014_000000000001.jpg]", "!= image"
    if case == "json_categories":
        js = root / "annotations" / "instances_train2014.json"
        data = json.loads(js.read_text())
        data["categories"][0]["name"] = "human"
        js.write_text(json.dumps(data))
        return "json", str(js), "categories differ"
    if case == "json_missing_image":
        js = root / "annotations" / "instances_train2014.json"
        data = json.loads(js.read_text())
        data["images"] = data["images"][1:]
        js.write_text(json.dumps(data))
        return "json", str(js), "no image entry for COCO_train2014_000000000003"
    if case == "no_masks_at_all":
        (root / "annotations" / "instances_val2014.json").unlink()
        return "auto", str(root / "annotations" / "val2014"), "no semantic PNGs and no instances_val2014.json"
    if case == "missing_image":
        p = root / "val2014" / "COCO_val2014_000000000002.jpg"
        p.unlink()
        return "json", str(p), "missing"
    if case == "unreadable_image":
        p = root / "train2014" / "COCO_train2014_000000000005.jpg"
        p.write_bytes(b"\xff\xd8garbage")
        return "json", str(p), "unreadable image"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["bad_png_value", "missing_png", "json_size_mismatch", "json_categories",
                                  "json_missing_image", "no_masks_at_all", "missing_image", "unreadable_image"])
def test_bad_inputs(coco, tmp_path, case):
    root, splits = coco
    source, names, reason = _damage(root, case)
    with pytest.raises(FSCSError) as err:
        convert_coco(root, tmp_path / "out", splits=splits, workers=1, mask_source=source)
    msg = str(err.value)
    assert names in msg and reason in msg and "\n" not in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_without_pycocotools_the_json_route_says_how_to_install(coco, tmp_path, monkeypatch):
    root, splits = coco
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(FSCSError, match=r"needs pycocotools; pip install 'fscs\[coco\]'"):
        convert_coco(root, tmp_path / "out", splits=splits, workers=1, mask_source="json")


@pytest.mark.parametrize("row, reason", [("3\tval2014/COCO_val2014_000000000001.jpg", "class 3 does not belong"),
                                         ("0 val2014/x.jpg", ":2: ")])
def test_bad_list_rows(coco, tmp_path, row, reason):
    root, splits = coco
    with gzip.open(splits / "val_fold0.tsv.gz", "wt") as fh:
        fh.write(f"0\tval2014/COCO_val2014_000000000001.jpg\n{row}\n")
    with pytest.raises(FSCSError, match=reason) as err:
        convert_coco(root, tmp_path / "out", splits=splits, workers=1)
    assert "val_fold0.tsv.gz" in str(err.value)


def test_shipped_coco_lists_pool_consistently_and_sample_by_class(caplog):
    plan = plan_coco(Path("."), mask_source="png")
    assert "differs from the other trn lists" not in caplog.text
    assert plan.list_lines["val_fold0.tsv.gz"] == 35783 and plan.list_lines["trn_fold3.tsv.gz"] == 141016
    assert sum(s == "test" for s in plan.splits.values()) == 39059
    assert all(c in COCO_FOLDS[g] for r in ("train", "select") for g, es in plan.lists[r].items() for _, c in es)
    index = lists_only_index(plan, Path("coco-lists"))
    sampler = EpisodeSampler(index, "test", 0, 1, 1, seed=0)
    eps = [sampler.episode(i) for i in range(1000)]
    counts = np.bincount([COCO_FOLDS[0].index(e.query_class) for e in eps], minlength=20)
    assert sampler.query_mode == "class" and counts.min() >= 25 and counts.max() <= 80
    empty = np.mean([not set(e.classes) & set(index.samples[e.query]["labels"]) for e in eps])
    assert 0.44 <= empty <= 0.53

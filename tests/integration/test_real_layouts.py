"""Standard PASCAL VOC and COCO 2014 layouts (tiny fixture trees) -> `fscs shards` -> sampler -> benchmark."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fscs.bench.runner import evaluate
from fscs.cli import main
from fscs.data.episodes import EpisodeSampler, make_episode_tensors
from fscs.data.shards import load_samples, read_index
from fscs.data.sources.coco import COCO_CATEGORIES, COCO_FOLDS
from fscs.model.fscs_model import FSCSModel

SLOTS = ((2, 2, 18, 18), (2, 20, 18, 36), (20, 10, 36, 30))  # (y0, x0, y1, x1) object boxes


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _draw(h: int, w: int, classes, band: bool, rng) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [h, w, 3] with one textured block per class, and its index mask (255 band if `band`)."""
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 2
    mask = np.zeros((h, w), np.uint8)
    for c, (y0, x0, y1, x1) in zip(classes, SLOTS):
        mask[y0:y1, x0:x1] = c
        img[y0:y1, x0:x1] = (np.array([c * 37, c * 91, c * 53]) % 256).astype(np.uint8)
        if band:
            mask[y0:y1, x0] = mask[y0:y1, x1 - 1] = mask[y0, x0:x1] = mask[y1 - 1, x0:x1] = 255
    return img, mask


@pytest.fixture(scope="module")
def pascal_shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("voc")
    root, splits = tmp / "VOCdevkit" / "VOC2012", tmp / "splits"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    splits.mkdir()
    rng = np.random.default_rng(1)
    val0 = [[1], [1, 2], [2, 3], [3], [4, 5], [4], [5, 1], [2, 6]]  # fold 0 test images (class 6 = fold 1)
    trn = [[6, 7], [8], [9, 10], [11], [12, 13], [16], [17, 18], [19, 20], [14, 15], [6]]
    lists: dict[str, list[str]] = {f"{k}_fold{f}.txt": [] for k in ("trn", "val") for f in range(4)}
    for n, classes in enumerate(val0 + trn):
        key = f"2009_{n:06d}"
        img, mask = _draw(40 + n % 3 * 4, 44 + n % 2 * 6, classes, band=True, rng=rng)
        Image.fromarray(img).save(root / "JPEGImages" / f"{key}.jpg", quality=95)
        Image.fromarray(mask, "L").save(root / "SegmentationClassAug" / f"{key}.png")
        for c in classes:
            kind = "val" if n < len(val0) else "trn"
            lists[f"{kind}_fold{(c - 1) // 5}.txt"].append(f"{key}__{c:02d}")
    for name, lines in lists.items():
        (splits / name).write_text("".join(f"{ln}\n" for ln in lines))
    out = tmp / "pascal5i"
    assert main(["shards", "pascal", "--root", str(root), "--out", str(out), "--splits", str(splits),
                 "--workers", "2", "--select-fraction", "0.2"]) == 0
    return out


@pytest.fixture(scope="module")
def coco_shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("coco")
    root, splits = tmp / "COCO2014", tmp / "splits"
    for d in ("val2014", "train2014", "annotations/val2014", "annotations/train2014"):
        (root / d).mkdir(parents=True)
    splits.mkdir()
    rng = np.random.default_rng(2)
    fold0 = COCO_FOLDS[0]
    rows: dict[str, list[str]] = {f"{k}_fold{f}": [] for k in ("trn", "val") for f in range(4)}
    val = [[fold0[(3 * i + j) % 20] for j in range(3)] for i in range(14)]  # every fold-0 class in >= 2 images
    trn = [[2, 3], [6, 7, 8], [10], [3, 6]]
    for n, classes in enumerate(val + trn):
        sub = "val2014" if n < len(val) else "train2014"
        name = f"COCO_{sub}_{n:012d}"
        img, mask = _draw(38 + n % 2 * 4, 40, classes, band=False, rng=rng)
        Image.fromarray(img).save(root / sub / f"{name}.jpg", quality=95)
        Image.fromarray(mask, "L").save(root / "annotations" / sub / f"{name}.png")
        for c in classes:
            if sub == "val2014":
                rows[f"val_fold{(c - 1) % 4}"].append(f"{c - 1}\t{sub}/{name}.jpg")
            else:
                rows.update({f"trn_fold{f}": rows[f"trn_fold{f}"] + [f"{c - 1}\t{sub}/{name}.jpg"]
                             for f in range(4) if f != (c - 1) % 4})
    for name, lines in rows.items():
        with gzip.open(splits / f"{name}.tsv.gz", "wt") as fh:
            fh.write("".join(f"{ln}\n" for ln in lines))
    out = tmp / "coco20i"
    assert main(["shards", "coco", "--root", str(root), "--out", str(out), "--splits", str(splits),
                 "--workers", "1", "--select-fraction", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def model() -> FSCSModel:
    return FSCSModel.build("fscs_vit_tiny_patch8", None, image_size=64).eval()


def test_pascal_layout_to_benchmark(pascal_shards, model):
    index = read_index(pascal_shards)
    assert index.dataset == "pascal-5i" and len(index.lists["test"][0]) == 12
    sampler = EpisodeSampler(index, "test", 0, 2, 1, seed=0)
    spec = sampler.episode(3)
    assert spec.query == index.lists["test"][0][3][0] and all(spec.query not in s for s in spec.support)
    samples = load_samples(index, {spec.query, *[k for s in spec.support for k in s]})
    tensors = make_episode_tensors(spec, samples, 64)
    q = samples[spec.query]
    assert tuple(tensors["query_mask_abs"].shape) == q.image.shape[:2] and (q.mask == 255).any()
    assert tensors["presence"].tolist() == [float(c in q.labels) for c in spec.classes]
    for regime, way in (("weak", 1), ("full", 2)):
        res = evaluate(model, index, fold=0, way=way, shot=1, regime=regime, episodes=6, batch_size=3,
                       bootstrap=20)
        assert res["dataset"] == "pascal-5i" and res["metrics"]["episodes"] == 6 and res["ignore_boundary"]
        assert res["manifest"]["query_mode"] == "entry" and len(res["manifest_hash"]) == 64
        assert 0.0 <= res["metrics"]["miou"] <= 100.0 and set(res["metrics"]["per_class_iou"]) == {1, 2, 3, 4, 5}
        assert set(res["ci95"]) >= {"er", "miou", "fbiou"}


def test_shards_keep_the_source_jpeg_bytes(pascal_shards, coco_shards):
    """Benchmarks read the published pixels: each shard holds the original JPEG file, not a re-encoding."""
    import tarfile

    for shards, root in ((pascal_shards, pascal_shards.parent / "VOCdevkit" / "VOC2012" / "JPEGImages"),
                         (coco_shards, coco_shards.parent / "COCO2014")):
        originals = {p.stem: p.read_bytes() for p in root.rglob("*.jpg")}
        seen = 0
        for tar in sorted(shards.glob("*.tar")):
            with tarfile.open(tar) as tf:
                for member in tf.getmembers():
                    if member.name.endswith(".jpg"):
                        assert tf.extractfile(member).read() == originals[member.name[: -len(".jpg")]]
                        seen += 1
        assert seen == len(read_index(shards).samples) > 0


def test_coco_layout_to_benchmark(coco_shards, model):
    index = read_index(coco_shards)
    assert index.dataset == "coco-20i" and index.params["mask_source"] == {"train2014": "png", "val2014": "png"}
    assert index.class_names[1] == "person" and index.num_classes == 80
    assert len(index.lists["test"][0]) == 42 and sum(m["split"] == "test" for m in index.samples.values()) == 14
    sampler = EpisodeSampler(index, "test", 0, 1, 1, seed=0)
    assert sampler.query_mode == "class"
    specs = [sampler.episode(i) for i in range(200)]
    assert len({s.query_class for s in specs}) >= 18  # classes drawn uniformly, not entries in order
    assert all(s.query_class in index.samples[s.query]["labels"] for s in specs)
    res = evaluate(model, index, fold=0, way=1, shot=1, regime="weak", episodes=4, batch_size=2, bootstrap=10)
    assert res["dataset"] == "coco-20i" and res["metrics"]["episodes"] == 4
    assert res["manifest"]["query_mode"] == "class" and len(res["metrics"]["per_class_iou"]) == 20
    assert [e["query"] for e in res["manifest"]["episodes"]] == [s.query for s in specs[:4]]
    for classes in COCO_FOLDS.values():
        assert all(COCO_CATEGORIES[c - 1][1] == index.class_names[c] for c in classes)

"""`fscs bench` on your own data with image-level labels only, or with masks on a few test images.

One generated folder dataset is converted three times (no masks, masks on some novel images, masks on all);
one weak run trained on the mask-free shards is benchmarked on each: ER everywhere, mIoU only over the
episodes whose query has a mask.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fscs.bench.metrics import FSCSMetric, has_segmentation
from fscs.bench.report import write_report
from fscs.cli import main
from fscs.config import load_config
from fscs.data.shards import load_samples, read_index
from fscs.distributed import DistEnv
from fscs.train import Trainer

from folder_data import write_dataset  # tests/integration helper (on sys.path)

ROOT = Path(__file__).resolve().parents[2]
NOVEL = ("cross", "ring")
BENCH = ["bench.settings=[1w1s,2w1s]", "bench.episodes=24", "bench.bootstrap=50", "bench.batch_size=4"]


def _part_masked(name: str) -> bool:
    """Masks kept in the partly masked copy: even-numbered images of the novel classes."""
    cls, num = name.rsplit("_", 1)
    return cls in NOVEL and int(num.split(".")[0]) % 2 == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("labels")
    images, labels, masks = write_dataset(root, lambda c, i: True)
    part = root / "part_masks"
    part.mkdir()
    for f in masks.glob("*.png"):
        if _part_masked(f.name):
            shutil.copy(f, part / f.name)
    # one dataset name and split for the three: they share manifests; val images for model selection
    name = ["--novel", ",".join(NOVEL), "--name", "own", "--select-fraction", "0.4"]
    shards = {k: root / f"shards_{k}" for k in ("none", "part", "all")}
    assert main(["shards", "folder", "--images", str(images), "--labels", str(labels), "--out",
                 str(shards["none"]), *name]) == 0
    for k, m in (("part", part), ("all", masks)):
        assert main(["shards", "folder", "--images", str(images), "--labels", str(labels), "--masks", str(m),
                     "--out", str(shards[k]), *name]) == 0
    cfg = load_config(ROOT / "configs" / "pilot.yaml", [
        f"out_dir={root / 'runs'}", "name=pilot", f"data.shards={shards['none']}", "model.image_size=64",
        "data.batch_size=2", "train.steps_per_epoch=3", "train.epochs=2", "data.num_workers=0",
        "train.val_episodes=4"])
    Trainer(cfg, DistEnv()).fit()
    return {"root": root, "run": root / "runs" / "pilot", **shards}


def _bench(world: dict[str, Path], which: str, *overrides: str, regime: str | None = None) -> int:
    """`fscs bench` of the weak run on shards `which` (in this process) -> exit code."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FSCS_IN_PROCESS", "1")
        out = world["root"] / (f"res_{which}" + (f"_{regime}" if regime else ""))
        return main(["bench", "--run-dir", str(world["run"]), "--out", str(out),
                     *(["--regime", regime] if regime else []), f"data.shards={world[which]}", *BENCH,
                     *overrides])


@pytest.fixture(scope="module")
def results(world) -> dict[str, dict[str, dict]]:
    """{shards kind: {setting: result JSON}} of the weak run benchmarked on each shard directory."""
    out = {}
    for which in ("none", "part", "all"):
        assert _bench(world, which) == 0
        files = sorted((world["root"] / f"res_{which}").glob("*.json"))
        out[which] = {f.stem.rsplit("_", 1)[1]: json.loads(f.read_text()) | {"_path": str(f)} for f in files}
        assert sorted(out[which]) == ["1w1s", "2w1s"]
    return out


def _records(res: dict) -> np.ndarray:
    return np.load(Path(res["_path"]).parent / res["records"]["file"])["records"]


def test_all_novel_images_are_test_queries_and_training_selects_on_er(world):
    for which in ("none", "part", "all"):
        index = read_index(world[which])
        assert len(index.fold_entries("test", 0)) == 30  # 12 + 12 novel images and 6 with a second class
    summary = json.loads((world["run"] / "train_summary.json").read_text())
    assert summary["selection"]["criterion"] == "select ER"  # no select image has a mask
    assert all(h["miou"] is None for h in summary["selection"]["history"])


def test_labels_only_bench_gives_er_with_ci_and_no_miou(world, results, caplog):
    index = read_index(world["none"])
    for setting, res in results["none"].items():
        m, ci = res["metrics"], res["ci95"]
        assert m["episodes"] == 24 and res["segmentation_episodes"] == 0
        assert m["miou"] is None and m["fbiou"] is None and m["per_class_iou"] is None
        assert ci["miou"] is None and ci["fbiou"] is None
        assert ci["er"][0] <= m["er"] <= ci["er"][1]
        assert not has_segmentation(_records(res)).any()
        # presence of each way comes from the query's image-level labels
        episodes = json.loads((Path(res["_path"]).parent / res["manifest_file"]).read_text())["episodes"]
        true = np.array(res["presence"]["true"]).reshape(res["presence"]["shape"])
        want = [[int(c in index.samples[e["query"]]["labels"]) for c in e["classes"]] for e in episodes]
        assert true.tolist() == want and 0 < true.sum() < true.size
        assert res["panels"] and all(p["kind"] == "first" and p["iou"] is None for p in res["panels"])
    with caplog.at_level(logging.INFO, logger="fscs.bench.runner"):
        assert _bench(world, "none", "bench.settings=[1w1s]") == 0
    assert "mIoU n/a FB-IoU n/a (24 episodes, 0 with query masks)" in caplog.text
    page = write_report([world["root"] / "res_none"], world["root"] / "report", bootstrap=50)
    md = (page.parent / "LEADERBOARD.md").read_text()
    assert "| n/a | n/a | 24 (0 with query masks) |" in md and "no query mask" in md


def test_partly_masked_miou_pools_exactly_the_masked_episodes(world, results):
    for setting in ("1w1s", "2w1s"):
        none, part, full = (results[k][setting] for k in ("none", "part", "all"))
        assert none["manifest_hash"] == part["manifest_hash"] == full["manifest_hash"]
        assert len({none["data_sha256"], part["data_sha256"], full["data_sha256"]}) == 3  # masks differ
        episodes = json.loads((Path(part["_path"]).parent / part["manifest_file"]).read_text())["episodes"]
        masked = [e["index"] for e in episodes if _part_masked(e["query"] + ".jpg")]
        assert 0 < len(masked) < 24 and part["segmentation_episodes"] == len(masked)
        assert full["segmentation_episodes"] == 24 and full["metrics"]["miou"] is not None
        # same model, same episodes: ER and presence do not depend on masks; mIoU = the masked episodes' only
        assert none["metrics"]["er"] == part["metrics"]["er"] == full["metrics"]["er"]
        assert none["presence"] == part["presence"] == full["presence"]
        rec_part, rec_full = _records(part), _records(full)
        assert np.flatnonzero(has_segmentation(rec_part)).tolist() == masked
        assert np.array_equal(rec_part[masked], rec_full[masked])
        classes = sorted(int(c) for c in part["class_names"])
        subset = FSCSMetric.from_records(classes, rec_full[masked]).compute()
        assert part["metrics"]["miou"] == subset["miou"] and part["metrics"]["fbiou"] == subset["fbiou"]
        assert part["metrics"]["fbiou"] != full["metrics"]["fbiou"]  # a real subset (the tiny model: mIoU ~0)
        assert part["ci95"]["miou"][0] <= part["metrics"]["miou"] <= part["ci95"]["miou"][1]


def test_full_regime_needs_support_masks(world, capsys):
    assert _bench(world, "none", regime="full") == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fscs ")]
    assert len(err) == 1 and "full regime uses ground-truth support masks" in err[0]
    assert "support image" in err[0] and "--regime weak" in err[0]
    assert _bench(world, "all", "bench.settings=[1w1s]", regime="full") == 0
    res = json.loads(next((world["root"] / "res_all_full").glob("*_full_*1w1s.json")).read_text())
    assert res["regime"] == "full" and res["segmentation_episodes"] == 24
    samples = load_samples(read_index(world["all"]), {"cross_00"})
    assert samples["cross_00"].mask is not None

"""Suite loader, plot helpers, and the report (tables, fold-mean CIs, refusals, escaping) on fake results."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fscs.bench import plots
from fscs.bench.metrics import FSCSMetric
from fscs.bench.report import fold_mean, write_report
from fscs.bench.report_inputs import collect_results
from fscs.bench.suite import load_suite, regime_matches
from fscs.errors import FSCSError

REPO = Path(__file__).resolve().parents[2]
HOSTILE = '<script>alert("x")</script>&|$\\frac{cls'


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- suites
@pytest.mark.parametrize("name,episodes", [("synthetic5i", 500), ("pascal5i", 1000), ("coco20i", 5000)])
def test_shipped_suites_load(name, episodes):
    s = load_suite(REPO / "benchmarks" / "suites" / f"{name}.yaml")
    assert s.name == name and s.episodes == episodes and s.folds == [0, 1, 2, 3]
    assert s.settings == ["1w1s", "2w1s", "1w5s", "2w5s"]
    assert "weak" in s.regimes and "full" in s.regimes and any(r.startswith("mixed@") for r in s.regimes)


@pytest.mark.parametrize("text,needle", [
    ("name: a\ndataset: d\nepisode: 3\n", "unknown suite key 'episode'"),
    ("dataset: d\n", "key 'name' is required"),
    ("name: a\ndataset: d\nregimes: [weak, mixed@1.5]\n", "mixed@1.5"),
    ("name: a\ndataset: d\nsettings: [1way1shot]\n", "1way1shot"),
    ("name: a\ndataset: d\nepisodes: many\n", "'episodes'"),
    ("name: a\ndataset: d\neval_regimes: [strong]\n", "strong"),
])
def test_suite_errors_are_one_line(tmp_path, text, needle):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(FSCSError) as exc:
        load_suite(f)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_suite_overrides_and_regime_matching(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: a\ndataset: d\nregimes: [weak, mixed@0.05]\n")
    s = load_suite(f, ["episodes=7", "folds=[1]"])
    assert s.episodes == 7 and s.folds == [1]
    assert regime_matches("mixed@0.05", "mixed@5e-2") and not regime_matches("mixed@0.1", "mixed@0.05")
    assert regime_matches("mixed@0.3", "mixed") and not regime_matches("weak", "full")


# ----------------------------------------------------------------------------------------------- plots
def test_episode_panel_and_labels():
    img = np.full((40, 60, 3), 100, dtype=np.uint8)
    gt = np.zeros((40, 60), dtype=np.uint8)
    gt[:10] = 1
    gt[10:12] = 255
    ways = torch.zeros(2, 20, 30, dtype=torch.long)
    ways[1, 10:] = 1
    pseudo = plots.ways_to_labels(ways)
    assert pseudo.shape == (20, 30) and set(np.unique(pseudo)) == {0, 2}
    panel = plots.episode_panel(img, gt, pseudo, None, tile=32)
    assert panel.dtype == np.uint8 and panel.shape == (32, 4 * 48 + 3 * 2, 3)
    gt_tile = panel[:, 50:98]
    assert tuple(gt_tile[0, 0]) != (100, 100, 100)  # way-1 colour painted on the first rows
    assert tuple(gt_tile[-1, -1]) == (100, 100, 100)  # background untouched
    assert len(plots.png_bytes(panel)) > 100


def test_epoch_table_and_reliability():
    text = plots.epoch_table([{"epoch": 1, "loss": 0.712345, "val/miou": 12.0}, {"epoch": 2, "loss": 0.5}])
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["epoch", "loss", "val/miou"]
    assert [c.strip() for c in lines[2].split("|")] == ["1", "0.7123", "12"] and len(lines) == 4
    assert lines[3].split("|")[2].strip() == ""  # no value: an empty cell, not "nan" or 0
    bars = [[i for i, c in enumerate(line) if c in "|+"] for line in lines]
    assert bars[0] == bars[1] == bars[2] == bars[3] and len({len(line) for line in lines}) == 1  # columns line up
    st = plots.reliability_stats(np.array([0.05, 0.05, 0.95, 0.95]), np.array([0, 0, 1, 0]))
    assert st["count"][0] == 2 and st["count"][9] == 2
    assert st["freq"][9] == pytest.approx(0.5) and st["ece"] == pytest.approx((2 * 0.05 + 2 * 0.45) / 4)


# ----------------------------------------------------------------------------------------------- report
def _records(rng: np.random.Generator, classes: list[int], n: int) -> np.ndarray:
    rows = []
    for i in range(n):
        u = rng.integers(50, 200, size=len(classes))
        inter = (u * rng.uniform(0, 1, size=len(classes))).astype(np.int64)
        bg_u = int(rng.integers(500, 1000))
        head = [i, rng.integers(0, 2), bg_u - 20, bg_u, inter.sum(), u.sum()]
        rows.append(np.concatenate([head, inter, u]))
    return np.stack(rows).astype(np.int64)


def _fake_result(root: Path, name: str, fold: int, *, regime: str = "weak", dataset: str = "pascal-5i",
                 setting: tuple[int, int] = (1, 1), manifest: str | None = None, n: int = 60, seed: int = 0,
                 class_name: str | None = None, masked: int | None = None, train_seed: int | None = None) -> Path:
    """masked: only the first `masked` episodes had a query mask (the others: ER only); None = all.
    train_seed: recorded as the run's train.seed (train_config), as fscs bench does; None = not recorded."""
    classes = [5 * fold + c for c in range(1, 6)]
    rec = _records(np.random.default_rng([seed, fold]), classes, n)
    if masked is not None:
        rec[masked:, 2:] = 0
    m = FSCSMetric.from_records(classes, rec)
    stem = f"{name}_f{fold}_{setting[0]}w{setting[1]}s"
    np.savez_compressed(root / f"{stem}.records.npz", records=rec, columns=np.array(m.record_columns()))
    (root / f"{stem}.panels").mkdir(parents=True, exist_ok=True)
    png = plots.png_bytes(np.zeros((8, 20, 3), np.uint8))
    (root / f"{stem}.panels" / "first-000000.png").write_bytes(png)
    names = {str(c): f"class{c}" for c in classes}
    if class_name:
        names[str(classes[0])] = class_name
    prob = np.random.default_rng(fold).uniform(0, 1, size=n * setting[0])
    data = {
        "format": "fscs-result/1", "dataset": dataset, "fold": fold, "way": setting[0], "shot": setting[1],
        "regime": regime.split("@")[0], "train_regime": regime, "role": "test", "episodes": n, "seed": 0,
        "manifest_hash": manifest or f"{dataset}-{fold}-{setting}".ljust(64, "0"), "ignore_boundary": True,
        "segmentation_episodes": m.segmentation_episodes(),
        "metrics": m.compute(), "ci95": m.bootstrap_ci(200, 0), "bootstrap": 200, "class_names": names,
        "presence": {"shape": [n, setting[0]], "prob": prob.round(4).tolist(),
                     "true": (prob > 0.4).astype(int).tolist()},
        "records": {"file": f"{stem}.records.npz", "columns": m.record_columns()},
        "panels": [{"index": 0, "iou": 12.5 if masked != 0 else None, "query": "img_1", "classes": [classes[0]],
                    "present": [1], "pred_present": [0], "kind": "first", "file": f"{stem}.panels/first-000000.png"}],
        "backbone": {"name": "vit_small_patch8_224.dino", "weights_sha256": "ab" * 32, "image_size": 400},
        "run": f"{name}_f{fold}", "checkpoint_sha256": f"{name}{fold}".ljust(64, "0"),
    }
    if train_seed is not None:
        data["train_config"] = {"train": {"seed": train_seed}}
    path = root / f"{stem}.json"
    path.write_text(json.dumps(data))
    return path


def test_report_tables_means_published_and_escaping(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    paths = [_fake_result(res, "weak", f, class_name=HOSTILE if f == 0 else None) for f in range(4)]
    paths += [_fake_result(res, "full", f, regime="full", seed=1) for f in range(4)]
    paths += [_fake_result(res, "weak", 0, setting=(2, 1))]
    page = write_report([res], tmp_path / "rep", bootstrap=200)
    text = page.read_text()
    assert text.count('data-kind="fold"') == 9 and text.count('data-kind="mean"') == 2
    assert text.count('data-kind="published"') == 5 + 5  # pascal 1w1s and 2w1s: 5 published models each
    assert "<script" not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert re.search(r"src=\"(?!data:image/png;base64,)", text) is None  # nothing external
    md = (tmp_path / "rep" / "LEADERBOARD.md").read_text()
    assert "CST (published, boundary pixels as background)" in md and "&amp;\\|$" not in md and "&\\|$" in md and "<script" not in md
    assert len(list((tmp_path / "rep" / "figures").glob("*.png"))) == 2 + 2 * 2
    assert not [p for p in (tmp_path / "rep").rglob("*") if ".tmp-" in p.name]  # every file renamed into place
    # the mean row is the mean of the four fold values
    results = [r for r in collect_results([res]) if r.setting == "1w1s" and r.model == "weak"]
    fm = fold_mean(results, bootstrap=200)
    assert fm["metrics"]["miou"] == pytest.approx(np.mean([r.data["metrics"]["miou"] for r in results]))
    assert f"{fm['metrics']['miou']:.1f} [{fm['ci95']['miou'][0]:.1f}, {fm['ci95']['miou'][1]:.1f}]" in md


def test_fold_mean_ci_is_narrower_than_a_fold_ci(tmp_path):
    paths = [_fake_result(tmp_path, "weak", f, n=200, seed=3) for f in range(4)]
    results = collect_results(paths)
    fm = fold_mean(results, bootstrap=400)
    width = {m: fm["ci95"][m][1] - fm["ci95"][m][0] for m in ("er", "miou")}
    single = {m: np.mean([r.data["ci95"][m][1] - r.data["ci95"][m][0] for r in results])
              for m in ("er", "miou")}
    for m in width:  # 4 independent folds: the mean's spread is about half of one fold's
        assert 0.3 * single[m] < width[m] < 0.75 * single[m]
        assert fm["ci95"][m][0] <= fm["metrics"][m] <= fm["ci95"][m][1]


def test_report_refuses_other_manifests_duplicates_and_missing(tmp_path):
    a = _fake_result(tmp_path, "weak", 0)
    b = _fake_result(tmp_path, "full", 0, regime="full", manifest="f" * 64)
    with pytest.raises(FSCSError, match="different episode manifests"):
        write_report([a, b], tmp_path / "rep")
    other_data = json.loads(a.read_text())
    other_data.update(data_sha256="d" * 64, run="weak2", checkpoint_sha256="e" * 64)
    c = tmp_path / "other_data.json"
    c.write_text(json.dumps({**json.loads(a.read_text()), "data_sha256": "c" * 64}))
    c2 = tmp_path / "other_data2.json"
    c2.write_text(json.dumps(other_data))
    with pytest.raises(FSCSError, match="share the episode manifest but read other images, masks or labels"):
        write_report([c, c2], tmp_path / "rep")
    dup = tmp_path / "copy.json"
    dup.write_text(a.read_text())
    with pytest.raises(FSCSError, match="two results of model 'weak'"):
        write_report([a, dup], tmp_path / "rep")
    with pytest.raises(FSCSError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "rep")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FSCSError, match="no fscs results"):
        write_report([empty], tmp_path / "rep")
    with pytest.raises(FSCSError, match="--bootstrap -5: the number of resamples must be >= 0"):
        write_report([a], tmp_path / "rep", bootstrap=-5)


def test_report_refuses_one_checkpoint_in_two_folds_and_incomplete_results(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    f0, f1 = _fake_result(res, "weak", 0), _fake_result(res, "weak", 1)
    data = json.loads(f1.read_text())
    data["checkpoint_sha256"] = json.loads(f0.read_text())["checkpoint_sha256"]  # fold 0's head on fold 1
    f1.write_text(json.dumps(data))
    with pytest.raises(FSCSError, match=r"evaluate one checkpoint .*train one run per data.fold"):
        write_report([res], tmp_path / "rep")
    f1.unlink()
    (res / "notes.json").write_text("[1, 2, 3]")  # another JSON file in the folder: not a result, skipped
    assert write_report([res], tmp_path / "rep").is_file()
    del data["manifest_hash"]
    (res / "broken.json").write_text(json.dumps(data))
    with pytest.raises(FSCSError, match=r"broken.json' has no 'manifest_hash'"):
        write_report([res], tmp_path / "rep")


def test_missing_records_means_no_mean_ci(tmp_path):
    paths = [_fake_result(tmp_path, "weak", f) for f in range(2)]
    (tmp_path / "weak_f1_1w1s.records.npz").unlink()
    md = (write_report(paths, tmp_path / "rep").parent / "LEADERBOARD.md").read_text()
    assert "mean of 2 (no CI: records missing)" in md
    (tmp_path / "rep" / "LEADERBOARD.md").unlink()
    paths = [_fake_result(tmp_path, "weak", f) for f in range(2)]  # records back
    md = (write_report(paths, tmp_path / "rep", bootstrap=0).parent / "LEADERBOARD.md").read_text()
    assert "mean of 2 (no CI: --bootstrap 0)" in md  # not a false "records missing"


def test_training_panels_for_tensorboard():
    from fscs.model.fscs_model import FSCSModel

    model = FSCSModel.build("fscs_vit_tiny_patch8", image_size=32)
    g = torch.Generator().manual_seed(0)
    batch = {"query_img": torch.randn(3, 3, 32, 32, generator=g),
             "support_img": torch.randn(3, 2, 1, 3, 32, 32, generator=g),
             "presence": torch.tensor([[1.0, 0.0]] * 3), "classes": torch.tensor([[1, 2]] * 3),
             "support_mask": torch.ones(3, 2, 1, 32, 32),
             "query_target": torch.zeros(3, 2, 32, 32, dtype=torch.long)}
    model.head.train(True)
    for regime in ("weak", "full"):
        panels = plots.training_panels(model, batch, regime, count=2, tile=40)
        assert len(panels) == 2
        assert all(p.shape == (40, 4 * 40 + 6, 3) and p.dtype == np.uint8 for p in panels)
    assert model.head.training  # restored


def test_report_of_results_without_query_masks(tmp_path):
    """ER-only results (labels, no query masks) render n/a, not 0; a partly masked model keeps its mIoU."""
    paths = [_fake_result(tmp_path, "labels", f, masked=0) for f in range(2)]
    page = write_report(paths, tmp_path / "rep", bootstrap=100)
    md = (page.parent / "LEADERBOARD.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| labels") or ln.startswith("| **labels")]
    assert len(rows) == 3  # two folds and the mean
    for row in rows:
        cells = [c.strip("* ") for c in row.split("|")[1:-1]]
        assert re.fullmatch(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", cells[5])  # ER with its CI
        assert cells[6] == cells[7] == "n/a"
    assert "60 (0 with query masks)" in md and "120 (0 with query masks)" in md
    assert "no query mask" in md  # panel caption
    assert ">n/a<" in page.read_text()
    figures = sorted(p.name for p in (page.parent / "figures").glob("*.png"))
    assert not any("per-class" in f for f in figures) and any("reliability" in f for f in figures)
    fm = fold_mean(collect_results(paths), bootstrap=100)
    assert fm["metrics"]["miou"] is None and fm["ci95"]["miou"] is None and fm["ci95"]["fbiou"] is None
    assert fm["metrics"]["er"] is not None and fm["ci95"]["er"] is not None
    assert fm["segmentation_episodes"] == 0 and fm["episodes"] == 120

    part = [_fake_result(tmp_path, "part", f, masked=20, seed=2) for f in range(2)]
    results = collect_results(part)
    fm = fold_mean(results, bootstrap=100)
    assert fm["metrics"]["miou"] == pytest.approx(np.mean([r.data["metrics"]["miou"] for r in results]))
    assert fm["ci95"]["miou"][0] <= fm["metrics"]["miou"] <= fm["ci95"]["miou"][1]
    assert fm["segmentation_episodes"] == 40
    md = (write_report(paths + part, tmp_path / "rep2", bootstrap=100).parent / "LEADERBOARD.md").read_text()
    assert "60 (20 with query masks)" in md and "mIoU / FB-IoU over the episodes whose query has a mask" in md
    assert any("per-class" in p.name for p in (tmp_path / "rep2" / "figures").glob("*.png"))


def _with(path: Path, new: Path, **changes) -> Path:
    """A copy of result `path` at `new` (same folder: its records file still resolves) with `changes`."""
    data = json.loads(path.read_text())
    data.update(changes)
    new.write_text(json.dumps(data))
    return new


def test_report_refuses_test_and_select_results_of_one_dataset(tmp_path):
    """A select (validation) result of fold 0 must not join the test folds' mean; published rows are test
    numbers and are not shown beside validation results."""
    t0, t1 = _fake_result(tmp_path, "weak", 0), _fake_result(tmp_path, "weak", 1)
    sel = _with(t0, tmp_path / "sel0.json", role="select", manifest_hash="5" * 64, checkpoint_sha256="9" * 64)
    with pytest.raises(FSCSError, match=r"mix role test and role select") as exc:
        write_report([t0, t1, sel], tmp_path / "rep")
    assert "\n" not in str(exc.value)
    sel1 = _with(t1, tmp_path / "sel1.json", role="select", manifest_hash="6" * 64, checkpoint_sha256="8" * 64)
    md = (write_report([sel, sel1], tmp_path / "rep2", bootstrap=50).parent / "LEADERBOARD.md").read_text()
    assert "mean of 2" in md and "published" not in md.split("### Plots")[0].split("not measured here.")[1]


def test_report_refuses_boundary_rules_mixed_across_folds_and_lists_every_seed(tmp_path):
    """Fold 0 with boundary pixels ignored and fold 1 with them counted as background must not form one mean
    (under a note naming fold 0's rule only); a table of several seeds names them all."""
    f0, f1 = _fake_result(tmp_path, "weak", 0), _fake_result(tmp_path, "weak", 1)
    bg1 = _with(f1, tmp_path / "bg1.json", ignore_boundary=False)
    with pytest.raises(FSCSError, match=r"pascal-5i 1w1s use different boundary rules") as exc:
        write_report([f0, bg1], tmp_path / "rep")
    assert "\n" not in str(exc.value)
    s1 = _with(f1, tmp_path / "seed7.json", seed=7)
    md = (write_report([f0, s1], tmp_path / "rep2", bootstrap=50).parent / "LEADERBOARD.md").read_text()
    assert "seeds 0, 7;" in md


@pytest.mark.parametrize("change,needle", [
    (lambda d: d["metrics"].update(miou=float("nan")), "metrics.miou = nan"),
    (lambda d: d["ci95"].update(er=[float("nan"), float("nan")]), "ci95.er = [nan, nan]"),
    (lambda d: d["metrics"].update(er="74.8"), "metrics.er = '74.8'"),
    (lambda d: d["metrics"].pop("er"), "metrics.er = None"),
    (lambda d: d["metrics"].pop("per_class_iou"), "no 'metrics.per_class_iou'"),
    (lambda d: d["metrics"].update(episodes=0), "metrics.episodes = 0"),
    (lambda d: d.update(way="2"), "way = '2'"),
    (lambda d: d["metrics"]["per_class_iou"].update({"1": None}), "metrics.per_class_iou"),
])
def test_report_refuses_values_it_cannot_show(tmp_path, change, needle):
    """A NaN, a string number or a result of 0 episodes is a one-line error naming the file and the key, never
    a 'nan' / '0.0' cell or a traceback."""
    data = json.loads(_fake_result(tmp_path, "weak", 0).read_text())
    change(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(FSCSError) as exc:
        write_report([bad], tmp_path / "rep")
    msg = str(exc.value)
    assert needle in msg and "bad.json" in msg and "\n" not in msg
    index = tmp_path / "idx"
    index.mkdir()
    (index / "suite-x.json").write_text(json.dumps({"format": "fscs-suite-index/1", "results": "r.json"}))
    with pytest.raises(FSCSError, match="has no 'results' list"):
        write_report([index], tmp_path / "rep")


def test_report_refuses_unreadable_or_foreign_records(tmp_path):
    """A truncated records file is a one-line error, and so is one that does not reproduce its result's
    metrics (a stale file of another evaluation): its fold-mean CI would not even contain the mean."""
    paths = [_fake_result(tmp_path, "weak", f) for f in range(2)]
    npz = tmp_path / "weak_f1_1w1s.records.npz"
    rec = np.load(npz)["records"]
    npz.write_bytes(npz.read_bytes()[:100])
    with pytest.raises(FSCSError, match=r"weak_f1_1w1s.records.npz' of .* is unreadable") as exc:
        write_report(paths, tmp_path / "rep")
    assert "\n" not in str(exc.value)
    for other in (rec[:30], np.concatenate([rec[:, :1], 1 - rec[:, 1:2], rec[:, 2:]], axis=1)):
        np.savez_compressed(npz, records=other)
        with pytest.raises(FSCSError, match=r"weak_f1_1w1s.records.npz' does not match"):
            write_report(paths, tmp_path / "rep")
    np.savez_compressed(npz, records=rec)
    assert write_report(paths, tmp_path / "rep", bootstrap=50).is_file()


def test_report_marks_an_miou_that_counts_classes_without_pixels(tmp_path):
    """A fold class with no pixel (zero union) in the episodes counts as IoU 0 in the mIoU (the protocol's
    I / max(U, 1)): the cell and the mean are marked and the note names the class, from the metrics or, for
    older results, from the records."""
    f0, f1 = _fake_result(tmp_path, "weak", 0), _fake_result(tmp_path, "weak", 1)
    npz = tmp_path / "weak_f0_1w1s.records.npz"
    rec = np.load(npz)["records"]
    c_num = (rec.shape[1] - 6) // 2
    gone = c_num - 1  # the last class of fold 0: never in a query's truth nor predicted
    rec[:, 5] -= rec[:, 6 + c_num + gone]
    rec[:, 4] -= rec[:, 6 + gone]
    rec[:, [6 + gone, 6 + c_num + gone]] = 0
    np.savez_compressed(npz, records=rec)
    m = FSCSMetric.from_records([1, 2, 3, 4, 5], rec).compute()
    assert m["classes_without_pixels"] == [5]
    data = json.loads(f0.read_text())
    data["metrics"] = {**m, "per_class_iou": {str(k): v for k, v in m["per_class_iou"].items()}}
    for with_key in (True, False):
        if not with_key:
            del data["metrics"]["classes_without_pixels"]
        f0.write_text(json.dumps(data))
        md = (write_report([f0, f1], tmp_path / "rep", bootstrap=50).parent / "LEADERBOARD.md").read_text()
        rows = [ln for ln in md.splitlines() if ln.startswith(("| weak", "| **weak"))]
        assert [("†" in row.split("|")[7]) for row in rows] == [True, False, True]  # fold 0, fold 1, mean
        assert "(weak fold 0: class5)" in md and "as IoU 0" in md


def test_published_rows_only_beside_the_standard_benchmarks(tmp_path):
    """A folder dataset whose name contains 'pascal' (fscs shards folder names it folder-<dir>) has its own
    images, classes and folds: the published PASCAL-5i numbers are not shown beside it."""
    std = _fake_result(tmp_path, "weak", 0)
    own = _with(std, tmp_path / "own.json", dataset="folder-pascal_crops", manifest_hash="7" * 64)
    md = (write_report([std, own], tmp_path / "rep", bootstrap=50).parent / "LEADERBOARD.md").read_text()
    tables = [t.split("### Plots")[0] for t in md.split("\n## ")]
    assert "published" not in next(t for t in tables if t.startswith("folder-pascal_crops"))
    assert "*CST (published" in next(t for t in tables if t.startswith("pascal-5i"))


@pytest.mark.parametrize("run,fold,model", [("weak_f0", 0, "weak"), ("weak-fold2", 2, "weak"),
                                            ("weakfold1", 1, "weak"), ("half0", 0, "half0"),
                                            ("weak_f1", 0, "weak_f1"), ("f0", 0, "f0")])
def test_model_name_drops_only_a_fold_marker(tmp_path, run, fold, model):
    from fscs.bench.report_inputs import Result

    assert Result(tmp_path / "r.json", {"run": run, "fold": fold}).model == model


def test_report_out_that_is_a_file_is_a_one_line_error(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    _fake_result(res, "weak", 0)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(FSCSError, match=rf"--out {blocker}: cannot create .*; pass a writable --out") as err:
        write_report([res], blocker, bootstrap=0)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, value, needle", [
    ("fold", "x", "has fold = 'x', must be an integer >= 0"),
    ("way", None, "has way = None, must be an integer >= 1"),
    ("class_names", [1], "has class_names = [1], must be an object or null"),
    ("ci95", "x", "has ci95 = 'x', must be an object or null"),
    ("metrics.miou", "abc", "has metrics.miou = 'abc', must be a finite number"),
])
def test_result_fields_of_the_wrong_type_are_one_line_errors(tmp_path, key, value, needle):
    """A hand-edited or foreign result JSON ended in int()/AttributeError/numpy tracebacks deep in the tables."""
    res = tmp_path / "res"
    res.mkdir()
    path = _fake_result(res, "weak", 0)
    data = json.loads(path.read_text())
    if key.startswith("metrics."):
        data["metrics"][key.split(".")[1]] = value
    else:
        data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(FSCSError, match=re.escape(needle) + ".*rerun the bench or leave the file out") as err:
        write_report([res], tmp_path / "rep", bootstrap=0)
    assert "\n" not in str(err.value)


def test_panels_outside_the_results_folder_or_incomplete_are_skipped(tmp_path, caplog):
    """A result from elsewhere must not embed an arbitrary file (../../secret.txt) into a report that gets
    shared, and a panel entry without its keys is skipped, not a KeyError."""
    from fscs.bench.figures import build_panels

    res = tmp_path / "res"
    res.mkdir()
    path = _fake_result(res, "weak", 0)
    (tmp_path / "secret.png").write_bytes(b"not for the report")
    data = json.loads(path.read_text())
    good = data["panels"][0]
    data["panels"] = [good | {"file": "../secret.png"}, good | {"file": "weak_f0_1w1s.json"},
                      {"file": good["file"]}, good]
    path.write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        pics = [p for ps in build_panels(collect_results([res])).values() for p in ps]
    assert len(pics) == 1 and pics[0].png.startswith(b"\x89PNG")
    assert sum("not a PNG beside its result" in r.getMessage() for r in caplog.records) == 2
    assert any("lacks" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("run,fold,seed,model", [("weak_s3_f0", 0, 3, "weak"), ("weak-seed12", 1, 12, "weak"),
                                                 ("vit_s8", 0, 0, "vit_s8"), ("weak_s3", 0, None, "weak_s3"),
                                                 ("weak_s1_f0", 0, 1, "weak"), ("s1", 0, 1, "s1"),
                                                 ("runs1", 0, 1, "runs1"), ("weak_f2_s3", 2, 3, "weak"),
                                                 ("weak_f0", 0, 0, "weak")])
def test_model_name_drops_a_seed_marker_only_when_it_is_the_recorded_seed(tmp_path, run, fold, seed, model):
    from fscs.bench.report_inputs import Result

    data = {"run": run, "fold": fold}
    if seed is not None:
        data["train_config"] = {"train": {"seed": seed}}
    r = Result(tmp_path / "r.json", data)
    assert r.model == model and r.train_seed == seed


def test_report_of_a_model_trained_with_several_seeds(tmp_path):
    """Three training seeds x two folds of one model: a row per (fold, seed) and one mean +- sd row, where the
    sd is the spread of the seeds' fold means; a second model with one seed keeps its fold-mean CI."""
    res = tmp_path / "res"
    res.mkdir()
    for k in range(3):
        for f in range(2):
            _fake_result(res, f"weak_s{k}", f, seed=10 * k + f, train_seed=k)
    for f in range(2):
        _fake_result(res, "full", f, regime="full", seed=99 + f, train_seed=0)
    md = (write_report([res], tmp_path / "rep", bootstrap=50).parent / "LEADERBOARD.md").read_text()
    results = collect_results([res])
    weak = [r for r in results if r.model == "weak"]
    assert len(weak) == 6 and {r.train_seed for r in weak} == {0, 1, 2}
    per_seed = {m: [np.mean([r.data["metrics"][m] for r in weak if r.train_seed == k]) for k in range(3)]
                for m in ("er", "miou", "fbiou")}
    cells = " | ".join(f"**{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}**" for v in per_seed.values())
    assert f"**mean ± sd of 3 seeds × 2 folds** | {cells} | **360** |" in md
    assert md.count("· seed ") == 6 and "| 1 · seed 2 |" in md
    assert re.search(r"\*\*mean of 2\*\* \| \*\*[\d.]+ \[[\d.]+, [\d.]+\]\*\*", md)  # one seed: fold-mean CI
    assert "sample sd over training seeds" in md
    assert "mean over the seeds ± their sd" in (tmp_path / "rep" / "index.html").read_text()


def test_report_refuses_seeds_on_other_folds_and_two_results_of_one_seed(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    _fake_result(res, "weak_s0", 0, train_seed=0)
    _fake_result(res, "weak_s0", 1, train_seed=0)
    _fake_result(res, "weak_s1", 0, train_seed=1)
    with pytest.raises(FSCSError, match=r"model 'weak' 1w1s: its training seeds cover different folds "
                                        r"\(seed 0: folds \[0, 1\]; seed 1: folds \[0\]\)"):
        write_report([res], tmp_path / "rep")
    a = _fake_result(tmp_path, "weak_s1", 0, train_seed=1)
    dup = tmp_path / "copy.json"
    dup.write_text(json.dumps({**json.loads(a.read_text()), "checkpoint_sha256": "9" * 64}))
    with pytest.raises(FSCSError, match="two results of model 'weak' .* trained with seed 1 for"):
        write_report([a, dup], tmp_path / "rep")

"""End to end on a generated folder dataset: CSV labels + some masks -> shards -> training -> predict."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fscs.cli import main
from fscs.config import load_config
from fscs.data.shards import read_index
from fscs.data.sources.folder import build_folder_shards
from fscs.data.transforms import to_tensor_image
from fscs.distributed import DistEnv
from fscs.predict import run_predict
from fscs.predict_inputs import read_rgb
from fscs.predict_model import Predictor
from fscs.train import Trainer

from folder_data import SIZE, make_image, write_dataset  # tests/integration helper (on sys.path)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """6 classes x 12 images (some with a second class), labels CSV, masks for the novel classes' images."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("own")
    images, labels_csv, masks = write_dataset(root, lambda c, i: c in ("cross", "ring") or i % 3 == 0)
    shards = build_folder_shards(images, root / "shards", labels=labels_csv, masks=masks,
                                 novel=["cross", "ring"])
    support, queries = root / "support", root / "queries"
    for k, c in enumerate(("cross", "ring", "disk")):
        (support / c).mkdir(parents=True)
        for i in range(2):
            img, mask = make_image([c], 1000 + 10 * k + i)
            Image.fromarray(img).save(support / c / f"s{i}.png")
            if i == 0:
                Image.fromarray(mask * 255).save(support / c / f"s{i}.mask.png")
    queries.mkdir()
    for i, labels in enumerate([["cross"], ["ring"], ["disk", "ring"], ["bar"], ["square"]]):
        name = f"q{i}{' & <x>' if i == 0 else ''}.jpg"
        Image.fromarray(make_image(labels, 2000 + i)[0]).save(queries / name)
    (queries / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    cfg = load_config(ROOT / "configs" / "pilot.yaml", [
        f"out_dir={root / 'runs'}", "name=pilot", f"data.shards={shards}", "model.image_size=64",
        "data.batch_size=2", "train.steps_per_epoch=3", "train.epochs=1", "data.num_workers=0"])
    Trainer(cfg, DistEnv()).fit()
    return {"root": root, "shards": shards, "run": root / "runs" / "pilot", "support": support,
            "queries": queries}


def test_shards_follow_the_novel_layout(world):
    index = read_index(world["shards"])
    assert [index.class_names[c] for c in index.folds[0]] == ["cross", "ring"]
    train_keys = {k for k, _ in index.fold_entries("train", 0)}
    novel = set(index.folds[0])
    assert novel == {2, 4} and train_keys
    assert all(not novel & set(index.samples[k]["labels"]) for k in train_keys)
    assert all(index.samples[k]["split"] == "test" for k, _ in index.fold_entries("test", 0))


def test_predict_writes_sane_outputs(world, tmp_path):
    out = tmp_path / "pred"
    summary = run_predict(world["run"], world["support"], [str(world["queries"])], out, batch_size=2,
                          threshold=0.5, progress=False)
    assert summary["queries"] == 6 and summary["predicted"] == 5
    assert [Path(s["image"]).name for s in summary["skipped"]] == ["broken.jpg"]
    meta = json.loads((out / "classes.json").read_text())
    assert [c["name"] for c in meta["classes"]] == ["cross", "disk", "ring"] and meta["regime"] == "weak"
    assert [c["support_masks"] for c in meta["classes"]] == [1, 1, 1]
    page = (out / "index.html").read_text()
    assert html.escape("q0 & <x>.jpg") in page and "<x>" not in page and "broken.jpg" in page
    for name in ("q0_x", "q1", "q2", "q3", "q4"):
        rec = json.loads((out / f"{name}.json").read_text())
        probs = [c["probability"] for c in rec["classes"]]
        assert len(probs) == 3 and all(0.0 <= p <= 1.0 for p in probs)
        assert [c["present"] for c in rec["classes"]] == [p > 0.5 for p in probs]
        mask = np.array(Image.open(out / rec["mask"]))
        assert mask.shape == (SIZE, SIZE) and mask.max() <= 3
        present_ids = {c["id"] for c in rec["classes"] if c["present"]}
        assert set(np.unique(mask)) - {0} <= present_ids  # absent classes are never painted
        assert Image.open(out / rec["overlay"]).size == (SIZE, SIZE)
        assert f'src="{rec["overlay"]}"' in page
    rows = (out / "predictions.csv").read_text().strip().splitlines()
    assert rows[0] == "image,present,cross,disk,ring" and len(rows) == 6
    assert not [f.name for f in out.iterdir() if ".tmp-" in f.name]  # every file written atomically
    (out / "mine.txt").write_text("a user's own file")
    again = run_predict(world["run"], world["support"], [str(world["queries"] / "q1.jpg")], out,
                        progress=False)
    left = sorted(f.name for f in out.iterdir())
    assert again["files"] == ["q1.json", "q1.mask.png", "q1.overlay.png"]
    assert left == sorted(["classes.json", "index.html", "predictions.csv", "summary.json", "mine.txt",
                           *again["files"]])  # the first run's other queries are gone, the user's file stays


def test_chunked_ways_equal_one_episode_and_forward_episode(world):
    """Each class is a way of one episode: chunking changes nothing, and results equal forward_episode."""
    whole = Predictor(world["run"], world["support"], device="cpu")
    chunked = Predictor(world["run"], world["support"], device="cpu", max_pairs=1)
    files = sorted(world["queries"].glob("q[1-4].jpg"))
    x = torch.stack([to_tensor_image(read_rgb(f), whole.size) for f in files])
    p1, l1 = whole.predict_tensors(x)
    p2, l2 = chunked.predict_tensors(x)
    assert p1.shape == (4, 3) and l1.shape == (4, 3, 2, 64, 64)
    torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-4)
    sup = torch.stack([to_tensor_image(img, whole.size) for img in whole.classes[0].images])  # "cross", K = 2
    with torch.no_grad():
        support = sup[None, None].expand(4, 1, *sup.shape).contiguous()
        ref = whole.model.forward_episode(x, support, regime="weak")
    torch.testing.assert_close(p1[:, 0], ref.cls_logits.softmax(-1)[:, 0, 1], rtol=1e-4, atol=1e-5)
    full = Predictor(world["run"], world["support"], device="cpu", regime="full")
    enc = full.encoded[0]
    gt = np.array(Image.open(world["support"] / "cross" / "s0.mask.png")) > 0
    assert enc.has_gt.tolist() == [True, False] and torch.equal(enc.masks[0].bool(), torch.from_numpy(gt))
    assert not torch.allclose(full.predict_tensors(x)[0], p1)  # the given masks change the episode


def test_cli_predict_full_regime_with_disk_cache(world, tmp_path, capsys):
    def args(out: str) -> list[str]:
        return ["predict", "--run", str(world["run"]), "--support", str(world["support"]), "--query",
                str(world["queries"] / "q1.jpg"), str(world["queries"] / "q[23].jpg"),
                "--out", str(tmp_path / out),
                "--regime", "full", "--cache", str(tmp_path / "cache"), "--no-progress", "--threshold", "0.3"]

    assert main(args("a")) == 0
    assert "predicted 3 of 3 images" in capsys.readouterr().out
    cached = sorted((tmp_path / "cache").rglob("*.pt"))
    assert len(cached) == 6
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert main(args("b")) == 0  # second run reads the cache instead of rewriting it
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    a = json.loads((tmp_path / "a" / "q1.json").read_text())
    b = json.loads((tmp_path / "b" / "q1.json").read_text())
    assert a["classes"] == b["classes"] and a["threshold"] == 0.3
    assert json.loads((tmp_path / "a" / "classes.json").read_text())["regime"] == "full"
    assert main(["predict", "--run", str(world["run"]), "--support", str(world["support"]), "--query",
                 str(tmp_path / "nothing*.png"), "--out", str(tmp_path / "c")]) == 2
    assert "no images found" in capsys.readouterr().err


def test_mixed_regime_without_enhancer_is_refused_before_outputs_change(world, tmp_path):
    """A weak run has no enhancer: --regime mixed stops at once and leaves an earlier prediction intact."""
    from fscs.errors import FSCSError

    out = tmp_path / "pred"
    run_predict(world["run"], world["support"], [str(world["queries"] / "q1.jpg")], out, progress=False)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(FSCSError, match="--regime mixed: .* no pseudo-mask enhancer; use --regime full or "
                                        "weak"):
        run_predict(world["run"], world["support"], [str(world["queries"] / "q2.jpg")], out, regime="mixed",
                    progress=False)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_rerun_with_out_inside_the_query_folder_does_not_predict_its_own_outputs(world, tmp_path):
    """`--query new/ --out new/pred` twice: the first run's masks/overlays are not queries of the second."""
    new = tmp_path / "new"
    new.mkdir()
    for name in ("q1.jpg", "q2.jpg"):
        (new / name).write_bytes((world["queries"] / name).read_bytes())
    first = run_predict(world["run"], world["support"], [str(new)], new / "pred", progress=False)
    second = run_predict(world["run"], world["support"], [str(new)], new / "pred", progress=False)
    assert first["queries"] == second["queries"] == second["predicted"] == 2 and second["skipped"] == []
    assert second["files"] == first["files"]


def test_an_interrupted_run_leaves_nothing_stale_for_the_next(world, tmp_path, monkeypatch):
    """Stopped after one query: no table of the previous run points at removed files, and the rerun removes
    what the stopped run wrote."""
    import fscs.predict as predict_mod

    out = tmp_path / "pred"
    run_predict(world["run"], world["support"], [str(world["queries"] / "q1.jpg")], out, progress=False)
    real, calls = predict_mod.write_query, []

    def stop_after_one(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_mod, "write_query", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_predict(world["run"], world["support"], [str(world["queries"] / "q[234].jpg")], out, batch_size=1,
                    progress=False)
    left = sorted(f.name for f in out.iterdir())
    assert left == ["classes.json", "q2.json", "q2.mask.png", "q2.overlay.png", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["complete"] is False
    monkeypatch.setattr(predict_mod, "write_query", real)
    again = run_predict(world["run"], world["support"], [str(world["queries"] / "q1.jpg")], out,
                        progress=False)
    assert again["complete"] is True
    assert sorted(f.name for f in out.iterdir()) == sorted(
        ["classes.json", "index.html", "predictions.csv", "summary.json", *again["files"]])


def test_out_inside_the_support_folder_is_refused_before_it_is_made(world, tmp_path):
    from fscs.errors import FSCSError

    support = tmp_path / "support"
    for c in ("cross", "ring"):
        (support / c).mkdir(parents=True)
        (support / c / "s0.png").write_bytes((world["support"] / c / "s0.png").read_bytes())
    with pytest.raises(FSCSError, match=r"--out .*pred is inside --support .*; write the predictions "):
        run_predict(world["run"], support, [str(world["queries"] / "q1.jpg")], support / "pred",
                    progress=False)
    assert sorted(p.name for p in support.iterdir()) == ["cross", "ring"]


def test_a_query_over_pillows_limit_is_predicted_from_a_downscaled_read(world, tmp_path, monkeypatch):
    """A query over Pillow's ~179 MP limit (here: over 2 x 2000 pixels) was skipped as a 'decompression
    bomb'; it is read downscaled, predicted, and its mask written at the original size."""
    import fscs.data.transforms as tr

    big = np.asarray(Image.fromarray(make_image(["ring"], 2100)[0]).resize((3 * SIZE, 2 * SIZE)))
    Image.fromarray(big).save(tmp_path / "big.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    monkeypatch.setattr(tr, "PIL_LIMIT_PIXELS", 4000)
    summary = run_predict(world["run"], world["support"], [str(tmp_path / "big.jpg")], tmp_path / "pred",
                          max_side=SIZE, progress=False)
    assert summary["predicted"] == 1 and not summary["skipped"]
    rec = json.loads((tmp_path / "pred" / "big.json").read_text())
    assert (rec["width"], rec["height"]) == (3 * SIZE, 2 * SIZE)
    monkeypatch.undo()
    with Image.open(tmp_path / "pred" / "big.mask.png") as mask, \
            Image.open(tmp_path / "pred" / "big.overlay.png") as overlay:
        assert mask.size == (3 * SIZE, 2 * SIZE) and max(overlay.size) == SIZE

"""End to end on tiny synthetic shards: torchrun training (2 processes, gloo) -> checkpoint -> benchmark.

Also: 1 and 2 evaluation processes give bit-identical metrics; the same seed gives the same episodes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

COMMON = ["model.image_size=64", "data.batch_size=2", "data.num_workers=1", "train.steps_per_epoch=3",
          "train.epochs=2", "data.buffer_per_class=16"]


def _fscs(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fscs", *args]
    else:
        cmd = [sys.executable, "-m", "fscs", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from fscs.data.synthetic import build_synthetic_shards

    return build_synthetic_shards(tmp_path_factory.mktemp("data") / "synth", num_images=400, size=96, workers=1)


@pytest.fixture(scope="module")
def weak_run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    proc = _fscs(["train", f"out_dir={out}", "name=weak", f"data.shards={shards}", "train.regime=weak", *COMMON,
                  "train.image_every=3", "train.val_episodes=6", "train.log_every=2"], nproc=2)
    assert "epoch summary" in proc.stdout and "val/miou" in proc.stdout  # the per-epoch table
    return out / "weak"


def test_training_writes_checkpoint_config_and_tensorboard(weak_run):
    assert (weak_run / "checkpoint.pt").is_file()
    assert "regime: weak" in (weak_run / "config.yaml").read_text()
    summary = json.loads((weak_run / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 2
    # train_log.jsonl numbers epochs like train_summary.json's history (1-based: steps 1-3 are epoch 1)
    logged = [json.loads(line) for line in (weak_run / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in logged] == [(2, 1), (4, 2), (6, 2)]
    assert [(h["epoch"], h["step"]) for h in summary["history"]] == [(1, 3), (2, 6)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(weak_run / "tb"))
    events.Reload()
    assert "episodes/0" in events.Tags()["images"]
    assert {"train/loss", "val/miou", "val/er"} <= set(events.Tags()["scalars"])


def test_rerun_resumes_instead_of_retraining(weak_run, shards):
    import torch

    before = torch.load(weak_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    log = (weak_run / "train_log.jsonl").read_text()
    proc = _fscs(["train", f"out_dir={weak_run.parent}", "name=weak", f"data.shards={shards}",
                  "train.regime=weak", *COMMON])
    assert "resumed" in proc.stderr + proc.stdout
    after = torch.load(weak_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert after["step"] == before["step"] == 6  # nothing trained again
    assert all(torch.equal(before["engine"]["head"][k], v) for k, v in after["engine"]["head"].items())
    assert (weak_run / "train_log.jsonl").read_text() == log


def _bench(run: Path, out: Path, nproc: int) -> dict:
    _fscs(["bench", "--run-dir", str(run), "--out", str(out), "bench.settings=[1w1s,2w1s]", "bench.episodes=24",
           "bench.bootstrap=50", "bench.batch_size=5"], nproc=nproc)
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def test_bench_one_and_two_ranks_bit_identical(weak_run, tmp_path):
    one = _bench(weak_run, tmp_path / "p1", 1)
    two = _bench(weak_run, tmp_path / "p2", 2)
    assert len(one) == 2 and one.keys() == two.keys()
    for name in one:
        assert one[name]["metrics"] == two[name]["metrics"]
        assert one[name]["manifest_hash"] == two[name]["manifest_hash"]
        assert one[name]["data_sha256"] == two[name]["data_sha256"]  # gathered over the ranks' episodes
        assert one[name]["ci95"] == two[name]["ci95"]
        assert one[name]["metrics"]["episodes"] == 24
        assert one[name]["world_size"] == 1 and two[name]["world_size"] == 2
    again = _bench(weak_run, tmp_path / "p1b", 1)
    assert {k: v["metrics"] for k, v in again.items()} == {k: v["metrics"] for k, v in one.items()}


def test_full_regime_trains_single_process(shards, tmp_path):
    _fscs(["train", f"out_dir={tmp_path}", "name=full", f"data.shards={shards}", "train.regime=full",
           *COMMON, "train.epochs=1"])
    res = _bench(tmp_path / "full", tmp_path / "res", 1)
    for r in res.values():
        assert r["regime"] == "full" and 0.0 <= r["metrics"]["miou"] <= 100.0


def test_bad_inputs_are_one_line_errors(tmp_path, shards):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cases = [
        (["train", f"data.shards={tmp_path / 'none'}"], "fscs shards synth"),
        (["train", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["train", f"data.shards={shards}", "model.weights=/no/such/weights.pth"], "/no/such/weights.pth"),
        (["bench", "--run-dir", str(tmp_path / "norun")], "no checkpoint"),
    ]
    for args, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "fscs", *args], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fscs ")]
        assert len(err_lines) == 1 and needle in err_lines[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_saved_predictions_recompute_the_metrics(weak_run, shards, tmp_path):
    """--save-predictions writes enough to recompute every metric from files alone."""
    import numpy as np
    from PIL import Image

    from fscs.bench.metrics import FSCSMetric, episodic_target
    from fscs.data.shards import load_samples, read_index

    preds = tmp_path / "preds"
    _fscs(["bench", "--run-dir", str(weak_run), "--out", str(tmp_path / "res"), "--save-predictions", str(preds),
           "bench.settings=[2w1s]", "bench.episodes=12", "bench.bootstrap=0"], nproc=2)
    result = json.loads(next((tmp_path / "res").glob("*_2w1s.json")).read_text())
    entries = [json.loads(p.read_text()) for p in sorted((preds / "2w1s").glob("episode_*.json"))]
    assert [e["episode"]["index"] for e in entries] == list(range(12))
    index = read_index(shards)
    samples = load_samples(index, {e["episode"]["query"] for e in entries})
    metric = FSCSMetric(sorted(index.fold_classes("test", 0)))
    for e in entries:
        ep = e["episode"]
        gt = samples[ep["query"]].mask
        pred = np.array(Image.open(preds / "2w1s" / e["mask"]))
        assert pred.shape == gt.shape
        true = [int(c in set(np.unique(gt).tolist())) for c in ep["classes"]]
        metric.update(pred, episodic_target(gt, ep["classes"]), ep["classes"], np.array(e["presence"]),
                      np.array(true, dtype=bool), episode_index=ep["index"])
    assert json.loads(json.dumps(metric.compute())) == result["metrics"]
    made_by = json.loads((preds / "2w1s" / "predictions.json").read_text())
    assert made_by["run"] == "weak" and made_by["checkpoint_sha256"] == result["checkpoint_sha256"]
    _fscs(["bench", "--run-dir", str(weak_run), "--out", str(tmp_path / "res6"), "--save-predictions", str(preds),
           "bench.settings=[2w1s]", "bench.episodes=6", "bench.bootstrap=0"])
    assert len(list((preds / "2w1s").glob("episode_*.json"))) == 6  # the earlier run's 12 do not linger
    assert len(list((preds / "2w1s").glob("episode_*.png"))) == 6


def test_bench_reference_checkpoint(shards, tmp_path):
    """The authors' released head format (Lightning .ckpt, 'learner.*' keys + pickled hparams) benchmarks
    in this harness with DINO-format backbone weights (generated here: ViT-S/16 at 64 px, same 72 channels)."""
    import argparse as ap

    import torch

    from fscs.model.backbone import FrozenBackbone
    from fscs.model.cst import CSTHead, _reference_module_map

    reverse = {ours: ref for ref, ours in _reference_module_map().items()}
    head_sd = CSTHead(in_channels=72).state_dict()
    ref = {f"learner.{reverse[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": v for k, v in head_sd.items()}
    ckpt = tmp_path / "fold0.ckpt"
    torch.save({"state_dict": ref, "hyper_parameters": ap.Namespace(lr=1e-3)}, ckpt)
    dino = tmp_path / "dino_vits16.pth"
    torch.save(FrozenBackbone("vit_small_patch16_224.dino", None, 224).model.state_dict(), dino)
    out = tmp_path / "fold0_results"  # the default --out of a reference checkpoint: beside it, and printed
    proc = _fscs(["bench", "--reference-checkpoint", str(ckpt), "--backbone-weights", str(dino),
                  f"data.shards={shards}", "model.backbone=vit_small_patch16_224.dino", "model.image_size=64",
                  "bench.settings=[1w1s]", "bench.episodes=6", "bench.bootstrap=0"])
    assert proc.stdout.strip().splitlines()[-1] == f"bench: 1 result(s) in {out}"
    res = json.loads(next(out.glob("*.json")).read_text())
    assert res["regime"] == "weak" and res["metrics"]["episodes"] == 6
    assert res["checkpoint"].endswith("fold0.ckpt") and len(res["checkpoint_sha256"]) == 64
    assert res["backbone"]["name"] == "vit_small_patch16_224.dino"


def _reference_ckpt(path: Path) -> Path:
    """A head in the authors' checkpoint format (72 input channels, 'learner.*' keys)."""
    import torch

    from fscs.model.cst import CSTHead, _reference_module_map

    reverse = {ours: ref for ref, ours in _reference_module_map().items()}
    sd = CSTHead(in_channels=72).state_dict()
    torch.save({"state_dict": {f"learner.{reverse[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": v
                               for k, v in sd.items()}}, path)
    return path


def test_bench_misuse_is_refused_before_any_episode(weak_run, shards, tmp_path, capsys):
    """Ways that would publish a wrong number: another fold's (seen) classes, overrides the checkpoint
    ignores, impossible settings, a reference head on random or mismatched backbone weights."""
    from fscs.cli import main

    ckpt = _reference_ckpt(tmp_path / "ref.ckpt")
    run = ["bench", "--run-dir", str(weak_run), "--out", str(tmp_path / "out")]
    ref = ["bench", "--reference-checkpoint", str(ckpt), "--out", str(tmp_path / "ref_out"),
           f"data.shards={shards}", "model.image_size=64", "bench.episodes=2"]
    cases = [
        (run + ["data.fold=1"], "fold 1's classes were among its training classes"),
        (run + ["model.image_size=224"], "override 'model.image_size=224' would be ignored"),
        (run + ["train.regime=full"], "--regime sets how the head decodes"),
        (run + ["bench.settings=[1w1s,9w1s]"], "9-way 1-shot episodes need 1 <= way <= 5"),
        (run + ["bench.settings=[1w1]"], "bad setting '1w1'"),
        (run + ["bench.episodes=0"], "'bench.episodes' is 0"),
        (ref, "pass --backbone-weights"),
        (ref + ["model.backbone=fscs_vit_mini_patch8", "model.weights=null"], "the reference heads take 72"),
    ]
    for args, needle in cases:
        assert main(args) == 2, args
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fscs ")]
        assert len(err) == 1 and needle in err[0], (args, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ref_out").exists()

"""The benchmark runner's per-pixel decision: the head's own mask logits upsampled once to each query's
original size, K shots averaged after upsampling (cst.md's evaluation order)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fscs import FSCSModel
from fscs.bench.runner import EvalJob, evaluate_jobs
from fscs.data.episodes import EpisodeSampler, make_episode_tensors
from fscs.data.shards import load_samples
from fscs.model.fscs_model import upsample_logits

S = 32


@pytest.mark.parametrize("shot", [1, 2])
def test_saved_label_maps_follow_the_reference_upsampling_order(shard_dir, index, tmp_path, shot):
    model = FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=S).eval()
    torch.nn.init.normal_(model.head.seg_out.weight, std=0.5)  # a head whose masks are not all background
    out = tmp_path / "pred"
    evaluate_jobs([EvalJob(model, "weak", "m", out)], index, fold=0, way=2, shot=shot, episodes=3, seed=0,
                  role="test", ignore_boundary=True, batch_size=3, bootstrap=0)
    sampler = EpisodeSampler(index, "test", 0, 2, shot, 0)
    specs = [sampler.episode(i) for i in range(3)]
    keys = {specs[i].query for i in range(3)} | {k for s in specs for row in s.support for k in row}
    samples = load_samples(index, keys)
    foreground = 0
    for spec in specs:
        it = make_episode_tensors(spec, samples, S)
        with torch.no_grad():
            feats = model.encode_episode(it["query_img"][None], it["support_img"][None])
            logits = model.decode_episode(feats, None, "weak", out_size=(S // 4, S // 4))  # native: 2 x grid
        size = samples[spec.query].image.shape[:2]
        per_shot = logits.shot_mask_logits[0] if shot > 1 else logits.mask_logits[0][:, None]  # [N, K, 2, h, w]
        fg = upsample_logits(per_shot, size).softmax(2)[:, :, 1].mean(1)  # upsample, softmax, then average
        best, arg = fg.max(0)
        expected = torch.where(best >= 0.5, arg + 1, torch.zeros_like(arg)).numpy()
        saved = np.asarray(Image.open(out / f"episode_{spec.index:06d}.png"))
        assert saved.shape == tuple(size)
        np.testing.assert_array_equal(saved, expected)
        foreground += int((expected > 0).sum())
    assert foreground > 0


@pytest.mark.parametrize("flag", ["out", "save_predictions"])
def test_an_unusable_output_folder_is_refused_before_any_episode(shard_dir, tmp_path, monkeypatch, flag):
    from pathlib import Path

    from fscs.bench import runner
    from fscs.bench.runs import LoadedRun
    from fscs.config import load_config
    from fscs.distributed import DistEnv
    from fscs.errors import FSCSError

    cfg = load_config(None, [f"data.shards={shard_dir}", "model.backbone=fscs_vit_tiny_patch8", "model.weights=null",
                             f"model.image_size={S}", "bench.settings=[1w1s]", "bench.episodes=2"])
    loaded = LoadedRun(cfg, FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=S).eval(),
                       Path("checkpoint.pt"), "0" * 64)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(runner, "evaluate_jobs", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    out, preds = (blocker, None) if flag == "out" else (tmp_path / "results", blocker / "sub")
    with pytest.raises(FSCSError, match=r"cannot create .*; pass a writable --") as err:
        runner.bench_run(loaded, cfg, DistEnv(), out, save_predictions=preds)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, needle", [
    ({"format": "fscs-pretrain-checkpoint/1", "config": {"export": None}, "step": 2},
     "is a `fscs pretrain` checkpoint"),
    ({"a": 1}, "is not a `fscs train` checkpoint (format None)"),
    ([1, 2], "is not a `fscs train` checkpoint (format None)"),
    ({"format": "fscs-checkpoint/1", "engine": {"head": {}}}, "is incomplete (no 'config')"),
])
def test_bench_and_predict_refuse_files_that_are_no_train_checkpoint(tmp_path, content, needle):
    """A pretraining run directory, or another torch file saved as checkpoint.pt: a one-line error, not a
    KeyError traceback or an 'unknown config key' about the stored config."""
    import re

    from fscs.bench.runs import load_run
    from fscs.errors import FSCSError

    torch.save(content, tmp_path / "checkpoint.pt")
    with pytest.raises(FSCSError, match=re.escape(needle) + r".*pass the run directory of `fscs train`") as err:
        load_run(tmp_path)
    assert "\n" not in str(err.value)

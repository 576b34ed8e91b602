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


def _png_eval_shards(tmp_path, mask_every):
    """8 classes in 4 folds, 48 lossless test images of 16 x 20 or 20 x 16 px with 1-2 labels; every
    `mask_every`-th image has no mask (0: all have one). PNG decodes to the same pixels with any libpng, so
    data_sha256 is the same everywhere."""
    import io

    from fscs.data.shard_write import write_shards
    from fscs.data.types import Sample

    rng = np.random.default_rng(11)
    samples = []
    for n in range(48):
        labels = tuple(sorted(int(c) for c in rng.choice(8, size=1 + n % 2, replace=False) + 1))
        h, w = (16, 20) if n % 3 else (20, 16)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for i, c in enumerate(labels):
            mask[2 + 6 * i:8 + 6 * i, 3:13] = c
        mask[0, :] = 255
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        masked = not mask_every or n % mask_every
        samples.append((Sample(f"e{n:02d}", image, mask if masked else None, labels,
                               encoded=("png", buf.getvalue())), "test"))
    folds, names = {0: [1, 2], 1: [3, 4], 2: [5, 6], 3: [7, 8]}, [f"k{c}" for c in range(1, 9)]
    return write_shards(samples, tmp_path / f"png-eval-{mask_every}", dataset="png-eval", class_names=names,
                        folds=folds, samples_per_shard=12, params={"query_mode": "class"})


def _comparable(results):
    """Everything results hold but their timings; record arrays and panel PNGs as bytes."""
    out = []
    for res in results:
        art = res["artifacts"]
        out.append({**{k: v for k, v in res.items() if k not in ("seconds", "artifacts")},
                    "records": art["records"].tobytes(), "record_columns": art["record_columns"],
                    "panels": art["panels"]})
    return out


@pytest.mark.parametrize(("mask_every", "regimes", "data_sha256"), [
    (0, ("weak", "full"), "9b1ca60e7c47430919b93f1a89a2fa9350a9a56309752fd6525995225096a09e"),
    (4, ("weak",), "24b3fdcd78f8e35a4558516f95949607f398b06d7e34888f6e805b21beceb57d"),
])
def test_results_unchanged_by_decoding_samples_on_use(tmp_path, monkeypatch, mask_every, regimes,
                                                      data_sha256):
    """The sample cache holds shard bytes and each batch decodes what it uses (it held every decoded image
    and mask: tens of GB for COCO-20i's 5,000 2-way 5-shot episodes). The results are those of the old path,
    bit for bit: data_sha256 as recorded with the decoded cache (commit f734067), and metrics, records,
    presence and panels equal to an evaluation whose cache holds the samples decoded up front as before."""
    from fscs.bench import eval_samples
    from fscs.data.shards import read_index, sample_digest

    index = read_index(_png_eval_shards(tmp_path, mask_every))
    model = FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=16).eval()
    torch.nn.init.normal_(model.head.seg_out.weight, std=0.5)  # a head whose masks are not all background

    def run():
        torch.manual_seed(0)
        return _comparable(evaluate_jobs([EvalJob(model, r, r) for r in regimes], index, fold=0, way=2,
                                         shot=2, episodes=14, seed=3, batch_size=4, bootstrap=20,
                                         panels=(2, 3)))

    new = run()
    assert {r["data_sha256"] for r in new} == {data_sha256}
    assert all(r["segmentation_episodes"] == (14 if not mask_every else 8) for r in new)

    class Decoded:  # what the cache held before: the decoded Sample, masks included, digested as read
        def __init__(self, sample):
            self.sample, self.has_mask, self.digest = sample, sample.mask is not None, sample_digest(sample)

        def decode(self, masks=True):
            return self.sample

    monkeypatch.setattr(eval_samples, "load_encoded",
                        lambda index, keys: {k: Decoded(s) for k, s in load_samples(index, keys).items()})
    assert run() == new


def test_the_sample_cache_holds_shard_bytes_not_decoded_arrays(shard_dir, index):
    """What a shared cache keeps per image is what the tar holds for it (image, json, mask.png), not the
    decoded uint8 arrays (~8x larger: ~1.2 MB per 640 x 480 COCO image, docs/real-data.md)."""
    import tarfile

    from fscs.data.shards import EncodedSample

    model = FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=S).eval()
    cache: dict = {}
    decoded = []
    real = EncodedSample.decode

    def spy(self, masks=True):
        decoded.append(self.key)
        return real(self, masks)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EncodedSample, "decode", spy)
        evaluate_jobs([EvalJob(model, "full")], index, fold=0, way=2, shot=2, episodes=6, seed=0, bootstrap=0,
                      batch_size=6, samples=cache)
    assert sorted(decoded) == sorted(cache)  # one batch: each of its images decoded once, however often used
    evaluate_jobs([EvalJob(model, "weak")], index, fold=0, way=1, shot=1, episodes=6, seed=0, bootstrap=0,
                  samples=cache)  # the next setting of the fold adds what it lacks
    assert len(cache) > 12
    for key, held in cache.items():
        assert not any(isinstance(v, np.ndarray) for v in vars(held).values()), key
        with tarfile.open(index.root / index.samples[key]["shard"]) as tf:
            members = {m.name.partition(".")[2]: tf.extractfile(m).read() for m in tf.getmembers()
                       if m.name.partition(".")[0] == key}
        assert dict(held.files) == members


def test_full_regime_without_support_masks_fails_before_any_episode(tmp_path, monkeypatch):
    """The one-line error of the full regime (a support without a mask) comes before the first batch, as when
    every sample was decoded up front (its text as recorded then)."""
    from fscs.bench import runner
    from fscs.data.shards import read_index
    from fscs.errors import FSCSError

    index = read_index(_png_eval_shards(tmp_path, 4))
    model = FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=16).eval()
    monkeypatch.setattr(runner, "make_episode_tensors", lambda *a: pytest.fail("an episode ran"))
    with pytest.raises(FSCSError) as err:
        evaluate_jobs([EvalJob(model, "weak"), EvalJob(model, "full")], index, fold=0, way=2, shot=2,
                      episodes=14, seed=3, batch_size=4, bootstrap=0)
    assert str(err.value) == EXPECTED_FULL_ERROR.format(root=index.root)


EXPECTED_FULL_ERROR = (
    "{root}: the full regime uses ground-truth support masks, but support image 'e32' (episode 0) has "
    "none; add masks for the test classes' images, or test with pseudo-masks (fscs bench --regime weak; "
    "suites: eval_regimes: [weak])")

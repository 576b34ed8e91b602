"""Pretraining pieces: pseudo-mask rules, label objective, DINO loss, schedules, data order, views, export."""
from __future__ import annotations

import math
import re

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from fscs.errors import FSCSError
from fscs.model.dino_head import DINOHead, DINOLoss, EvidenceNet, evidence_target, label_losses, topk_mean
from fscs.model.distill import MASK_RULES, PseudoMaskDistiller, border_majority, key_two_means, pseudo_mask
from fscs.data.multicrop import MultiCropAugment
from fscs.model.student import build_student_vit
from fscs.pretrain import cosine_schedule
from fscs.pretrain_config import PretrainConfig, load_pretrain_config
from fscs.pretrain_data import batch_indices, step_seed
from fscs.pretrain_export import export_backbone


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _object(grid: int = 8) -> torch.Tensor:
    """[1, grid, grid] {0,1}: a 3x3 object inside the grid, away from the border."""
    obj = torch.zeros(1, grid, grid)
    obj[0, 2:5, 3:6] = 1
    return obj


def test_otsu_border_fixes_inverted_polarity_reference_does_not() -> None:
    obj = _object()
    cos = 0.6 - 1.2 * obj + 0.02 * torch.randn(1, 8, 8)  # CLS query aligned with the background
    mask = pseudo_mask(cos, 8, "otsu_border")
    assert torch.equal(mask, obj)
    assert pseudo_mask(cos, 8, "reference").sum() == 64 - 9  # the reference rule marks the background
    assert torch.equal(pseudo_mask(-cos, 8, "otsu_border"), obj)  # right polarity stays right


def test_border_majority() -> None:
    assert not border_majority(_object()).item()
    assert border_majority(1 - _object()).item()


def _keys(obj: torch.Tensor, heads: int = 2, dh: int = 8, seed: int = 0) -> torch.Tensor:
    """[1, heads, T, dh] keys: object tokens near one direction, background tokens near another, + noise."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(heads, 1, dh, generator=gen), torch.randn(heads, 1, dh, generator=gen)
    flat = obj.flatten()[None, :, None]  # [1, T, 1]
    keys = flat * a + (1 - flat) * b + 0.1 * torch.randn(heads, flat.shape[1], dh, generator=gen)
    return keys[None]


def test_key_clustering_rule_finds_the_object_whatever_the_cls_query() -> None:
    obj = _object()
    keys = _keys(obj)
    for sign in (1.0, -1.0):  # CLS query similar to the object or to the background
        q_cls = sign * keys[:, :, 30]  # token (3, 6)... any token: rule must not depend on it
        distiller = PseudoMaskDistiller(rule="keys_border")
        mask = distiller.support_masks(q_cls, keys, (8, 8), 8)
        assert torch.equal(mask, obj)
    cos = torch.randn(1, 8, 8)
    clusters = key_two_means(keys, cos)
    assert torch.equal(clusters, obj) or torch.equal(clusters, 1 - obj)  # the two groups, seeded by the map
    inside, outside = cos[clusters == 1].mean(), cos[clusters == 0].mean()
    assert inside >= outside  # 1 = the cluster more similar to the CLS query
    with pytest.raises(FSCSError, match="keys"):
        pseudo_mask(torch.zeros(1, 8, 8), 8, "keys_border")


def test_rules_registered_and_upsample_to_size() -> None:
    assert {"reference", "otsu", "otsu_border", "keys_border"} <= set(MASK_RULES)
    obj = _object()
    keys = _keys(obj)
    cos = torch.einsum("bhd,bhtd->bht", F.normalize(keys[:, :, 20], dim=-1), F.normalize(keys, dim=-1))
    cos = cos.mean(1).reshape(1, 8, 8)
    for rule in ("otsu", "otsu_border", "keys_border"):
        mask = pseudo_mask(cos, (32, 32), rule, q_cls=keys[:, :, 20], k=keys)
        assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
        small = F.adaptive_avg_pool2d(mask[:, None], 8)[:, 0] > 0.5
        assert (small.float() == obj).float().mean() > 0.9, rule


def test_evidence_target_and_label_losses() -> None:
    evidence = torch.full((1, 3, 4, 4), -4.0)
    evidence[0, 1, 1:3, 1:3] = 1.0  # class 1 (present) evidence on 4 tokens
    evidence[0, 2, 0, 0] = 5.0  # class 2 is absent: ignored by the target
    labels = torch.tensor([[0.0, 1.0, 0.0]])
    target = evidence_target(evidence, labels, "max")
    assert target[0, 1, 1] == 1.0 and target[0, 0, 0] < 0.05  # max-normalised, absent classes ignored
    minmax = evidence_target(evidence, labels, "minmax")
    assert minmax[0, 1, 1] == 1.0 and minmax[0, 0, 0] == 0.0
    assert evidence_target(evidence, labels)[0, 1, 1] == pytest.approx(torch.sigmoid(torch.tensor(1.0)))
    assert topk_mean(evidence, 0.25)[0, 1] == 1.0
    cos = torch.zeros(1, 4, 4, requires_grad=True)
    terms = label_losses(evidence, cos, labels, offset=-0.2, temperature=0.1, normalize="max")
    terms["mask"].backward()
    assert cos.grad[0, 1, 1] < 0 and cos.grad[0, 0, 0] > 0  # raise cos on evidence, lower it elsewhere


def test_evidence_net_grid_and_bound() -> None:
    net = EvidenceNet(num_classes=5, patch_size=8, width=16, bound=6.0)
    out = net(100 * torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 5, 4, 6) and out.abs().max() <= 6.0
    with pytest.raises(ValueError):
        EvidenceNet(5, patch_size=14)


def test_dino_loss_and_centering() -> None:
    loss = DINOLoss(out_dim=6, student_temp=0.1, center_momentum=0.5)
    teacher = [torch.randn(4, 6), torch.randn(4, 6)]
    student = [teacher[1].clone(), teacher[0].clone(), torch.randn(4, 6)]
    value = loss(student, teacher, teacher_temp=0.1)
    # student crop i is never compared with teacher crop i: 2 teachers x 2 other crops = 4 pairs
    manual = 0.0
    for ti, t in enumerate(teacher):
        for si, s in enumerate(student):
            if si != ti:
                manual += -(F.softmax(t / 0.1, -1) * F.log_softmax(s / 0.1, -1)).sum(-1).mean()
    assert value.item() == pytest.approx(manual.item() / 4, rel=1e-5)
    loss.update_center(teacher)
    torch.testing.assert_close(loss.center, 0.5 * torch.cat(teacher).mean(0, keepdim=True))
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    out = head(torch.randn(3, 16))
    assert out.shape == (3, 32) and out.abs().max() <= 1.0 + 1e-5  # cosine logits


def test_cosine_schedule_endpoints() -> None:
    assert cosine_schedule(1.0, 0.1, 0, 100, warmup=10) == 0.0
    assert cosine_schedule(1.0, 0.1, 10, 100, warmup=10) == pytest.approx(1.0)
    assert cosine_schedule(1.0, 0.1, 100, 100, warmup=10) == pytest.approx(0.1)
    assert cosine_schedule(0.996, 1.0, 50, 100) == pytest.approx(0.998)


def test_batch_indices_partition_each_epoch_across_ranks() -> None:
    num, batch, world = 12, 3, 2
    seen = [batch_indices(num, s, batch, r, world, seed=5) for s in range(2) for r in range(world)]
    assert sorted(torch.cat(seen).tolist()) == list(range(num))  # 2 steps x 2 ranks x 3 = one epoch
    assert torch.equal(batch_indices(num, 1, batch, 1, world, 5), seen[3])  # a pure function of the step
    assert len(batch_indices(5, 3, 4, 0, 1, 0)) == 4  # crosses an epoch boundary
    assert step_seed(0, 3, 1) == step_seed(0, 3, 1) != step_seed(0, 3, 0)


def test_multicrop_views_shapes_and_determinism() -> None:
    cfg = load_pretrain_config(None, ["model.image_size=32", "dino.local_size=16", "dino.local_crops=2"])
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    aug = MultiCropAugment(cfg)
    views = aug(images, torch.Generator().manual_seed(1))
    assert views["full"].shape == (3, 3, 32, 32) and views["crop"].shape == (3, 3, 32, 32)
    assert views["locals"].shape == (6, 3, 16, 16)
    again = aug(images, torch.Generator().manual_seed(1))
    assert all(torch.equal(views[k], again[k]) for k in views)
    other = aug(images, torch.Generator().manual_seed(2))
    assert not torch.equal(views["crop"], other["crop"])
    no_dino = MultiCropAugment(load_pretrain_config(None, ["dino.weight=0", "labels.fold=0"]))
    assert set(no_dino(images, torch.Generator().manual_seed(0))) == {"full"}


def test_pretrain_config_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(FSCSError, match="optim.stepz|did you mean"):
        load_pretrain_config(None, ["optim.stepz=3"])
    with pytest.raises(FSCSError, match="nothing is learned"):
        load_pretrain_config(None, ["dino.weight=0"])
    with pytest.raises(FSCSError, match="not found"):
        load_pretrain_config(tmp_path / "missing.yaml")
    cfg = load_pretrain_config(None, ["optim.steps=7", "labels.fold=0"])
    assert isinstance(cfg, PretrainConfig) and cfg.optim.steps == 7 and cfg.labels.fold == 0
    for key in ("ckpt_every", "log_every"):  # a ZeroDivisionError mid-run before
        with pytest.raises(FSCSError, match=f"'{key}' is 0; it must be >= 1"):
            load_pretrain_config(None, [f"{key}=0"])
    for override, needle in (("optim.seed=-1", "'optim.seed' is -1; it must be >= 0"),
                             ("optim.batch_size=0", "'optim.batch_size' is 0; it must be >= 1"),
                             ("optim.steps=0", "'optim.steps' is 0; it must be >= 1"),
                             ("optim.lr=inf", "'optim.lr' is inf; it must be a finite number"),
                             ("optim.lr=0", "'optim.lr' is 0.0; it must be > 0"),
                             ("dino.momentum=nan", "'dino.momentum' is nan; it must be a finite number")):
        with pytest.raises(FSCSError, match=re.escape(needle)):
            load_pretrain_config(None, [override])


def test_pretrain_resume_refuses_other_architecture_or_novel_folds(tmp_path) -> None:
    from dataclasses import asdict

    from fscs.pretrain import check_pretrain_resume

    saved = asdict(load_pretrain_config(None, ["optim.steps=2"]))
    longer = asdict(load_pretrain_config(None, ["optim.steps=3", "ckpt_every=1"]))
    assert check_pretrain_resume(saved, longer, tmp_path) == []
    assert check_pretrain_resume(saved, asdict(load_pretrain_config(None, ["optim.lr=0.1"])), tmp_path) == [
        f"optim.lr changed from {saved['optim']['lr']!r} to 0.1"]
    for change, key in ((["dino.out_dim=128"], "dino.out_dim"), (["model.image_size=64"], "model.image_size"),
                        (["labels.fold=1", "data.exclude_folds=[1]"], "data.exclude_folds")):
        with pytest.raises(FSCSError, match=rf"made with {key}=.*set {key}=") as err:
            check_pretrain_resume(saved, asdict(load_pretrain_config(None, change)), tmp_path)
        assert "\n" not in str(err.value)


def test_export_loads_through_fscs_model_build(tmp_path) -> None:
    from fscs.model.fscs_model import FSCSModel

    torch.manual_seed(3)
    vit = build_student_vit("fscs_vit_mini_patch8", 32)
    path = export_backbone(vit, tmp_path / "bb.safetensors", {"format": "fscs-backbone/1"})
    model = FSCSModel.build(backbone="fscs_vit_mini_patch8", weights=path, image_size=32)
    loaded = model.backbone.model.state_dict()
    for key, value in vit.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert model.backbone.identity["weights_sha256"] != "random-init-seed0"
    resized = FSCSModel.build(backbone="fscs_vit_mini_patch8", weights=path, image_size=48)  # pos_embed resampled
    assert resized.backbone.grid == (6, 6)
    x = torch.randn(2, 3, 32, 32)
    out = model.backbone(x)
    assert out.q.shape == (2, 4, 17, 32) and math.isfinite(float(out.tokens.sum()))


@pytest.mark.parametrize("bad, key", [
    ("optim.steps=0", "optim.steps"),  # exported a random-init backbone as 'completed'
    ("optim.batch_size=0", "optim.batch_size"),
    ("model.image_size=30", "model.image_size"),
    ("dino.local_size=20", "dino.local_size"),
    ("dino.global_scale=[1.0]", "dino.global_scale"),
    ("dino.local_scale=[0.5,0.1]", "dino.local_scale"),
    ("labels.normalize_target=minmx", "labels.normalize_target"),  # silently ran as 'max'
    ("dino.local_crops=-1", "dino.local_crops"),
    ("labels.topk=0", "labels.topk"),
    ("dino.out_dim=0", "dino.out_dim"),
    ("dino.student_temp=0", "dino.student_temp"),  # a NaN backbone
    ("dino.momentum=1.5", "dino.momentum"),
    ("optim.lr=-1", "optim.lr"),
    ("augment.hue_prob=2", "augment.hue_prob"),
])
def test_pretrain_config_bad_values_are_one_line_errors(bad, key) -> None:
    with pytest.raises(FSCSError, match=rf"^pretrain config key '{key}' is .*; ") as err:
        load_pretrain_config(None, ["labels.fold=0", bad])
    assert "\n" not in str(err.value)


def test_shipped_pretrain_config_passes_the_checks() -> None:
    from pathlib import Path

    cfg = load_pretrain_config(Path(__file__).resolve().parents[2] / "configs" / "pretrain.yaml")
    assert cfg.labels.fold == 0 and cfg.dino.local_crops == 2


def test_train_refuses_a_fold_whose_classes_the_pretrained_backbone_saw(tmp_path) -> None:
    """The shipped backbone saw synthetic-5i images and labels of folds 1..3; `fscs train data.fold=1` with it
    trained silently, so its 'novel-class' numbers were on classes the backbone had learned."""
    from fscs.model.backbone_weights import pretraining_scope
    from fscs.model.fscs_model import FSCSModel
    from fscs.pretrain_data import novel_folds
    from fscs.run_dir import check_backbone_novel_fold

    from fscs.assets import DEFAULT_BACKBONE_WEIGHTS

    shipped = pretraining_scope(DEFAULT_BACKBONE_WEIGHTS)
    assert shipped == {"dataset": "synthetic-5i", "novel_folds": [0]}
    cfg = load_pretrain_config(None, ["labels.fold=2", "data.exclude_folds=[3]"])
    assert novel_folds(cfg) == [2, 3]
    torch.manual_seed(0)
    path = export_backbone(build_student_vit("fscs_vit_mini_patch8", 32), tmp_path / "bb.safetensors",
                           {"format": "fscs-backbone/1", "dataset": "synthetic-5i", "novel_folds": "[2, 3]"})
    model = FSCSModel.build(backbone="fscs_vit_mini_patch8", weights=path, image_size=32, mask_rule="otsu")
    for fold in (2, 3):
        check_backbone_novel_fold(model, "synthetic-5i", fold, str(path))
    check_backbone_novel_fold(model, "pascal-5i", 0, str(path))  # another shard set: its folds were never seen
    with pytest.raises(FSCSError, match=r"fold 0 is not novel to it; .*labels.fold=0.* one of \[2, 3\]") as err:
        check_backbone_novel_fold(model, "synthetic-5i", 0, str(path))
    assert "\n" not in str(err.value)
    plain = export_backbone(build_student_vit("fscs_vit_mini_patch8", 32), tmp_path / "plain.safetensors", {})
    assert pretraining_scope(plain) is None  # not made by fscs pretrain: no claim either way


def test_pretrain_export_records_its_dataset_and_novel_folds(tmp_path) -> None:
    from fscs.data.synthetic import build_synthetic_shards
    from fscs.distributed import DistEnv
    from fscs.model.backbone_weights import pretraining_scope
    from fscs.pretrain import run_pretrain

    shards = build_synthetic_shards(tmp_path / "synth", num_images=24, size=96, workers=1)
    cfg = load_pretrain_config(None, [f"data.shards={shards}", f"out_dir={tmp_path}", "name=p", "optim.steps=1",
                                      "model.backbone=fscs_vit_mini_patch8", "model.image_size=32", "dino.weight=0",
                                      "labels.fold=1", "data.exclude_folds=[3]", "labels.evidence_width=8",
                                      "optim.batch_size=2", "image_every=0"])
    summary = run_pretrain(cfg, DistEnv())
    assert pretraining_scope(summary["export"]) == {"dataset": "synthetic-5i", "novel_folds": [1, 3]}


def test_a_diverged_pretraining_stops_with_one_line_and_exports_nothing(tmp_path, monkeypatch) -> None:
    """A NaN loss trained on to the end and exported a NaN backbone as 'completed' (and wrote NaN into
    pretrain_summary.json); it must stop before saving the NaN state, with a one-line error."""
    from fscs.data.synthetic import build_synthetic_shards
    from fscs.distributed import DistEnv
    from fscs.pretrain import CHECKPOINT, Pretrainer

    shards = build_synthetic_shards(tmp_path / "synth", num_images=24, size=96, workers=1)
    cfg = load_pretrain_config(None, [f"data.shards={shards}", f"out_dir={tmp_path}", "name=p", "optim.steps=4",
                                      "model.backbone=fscs_vit_mini_patch8", "model.image_size=32", "dino.weight=0",
                                      "labels.fold=0", "labels.evidence_width=8", "optim.batch_size=2",
                                      "image_every=0", "ckpt_every=1"])
    real = Pretrainer.train_step

    def diverge_at_step_3(self):
        out = real(self)
        if self.step == 3:
            with torch.no_grad():
                self.teacher_vit.cls_token.fill_(float("nan"))
            out["loss"] = float("nan")
        return out

    monkeypatch.setattr(Pretrainer, "train_step", diverge_at_step_3)
    with pytest.raises(FSCSError, match=r"loss is not finite at step 3 .*nothing exported.*optim.lr") as err:
        Pretrainer(cfg, DistEnv()).fit()
    assert "\n" not in str(err.value)
    assert not cfg.export_path.exists()
    state = torch.load(cfg.run_dir / CHECKPOINT, weights_only=True)
    assert state["step"] == 2 and torch.isfinite(state["teacher_vit"]["cls_token"]).all()


def test_export_is_byte_identical_for_identical_weights(tmp_path) -> None:
    """Rerunning a completed `fscs pretrain` re-exports the teacher: safetensors ordered the metadata at random,
    so the file's sha256 (the backbone identity fscs train records) changed and heads trained on the first
    export were refused as trained on another backbone."""
    from safetensors import safe_open

    from fscs.model.backbone import file_sha256

    torch.manual_seed(0)
    vit = build_student_vit("fscs_vit_mini_patch8", 32)
    meta = {"format": "fscs-backbone/1", "backbone": "fscs_vit_mini_patch8", "image_size": "32", "step": "2",
            "config": "{}", "dataset": "synthetic-5i", "novel_folds": "[0]"}
    paths = [export_backbone(vit, tmp_path / f"bb{i}.safetensors", dict(meta)) for i in range(6)]
    assert len({file_sha256(p) for p in paths}) == 1
    with safe_open(str(paths[0]), "pt") as fh:
        assert fh.metadata() == meta and torch.equal(fh.get_tensor("pos_embed"), vit.pos_embed.detach())


def test_export_path_must_be_a_safetensors_file(tmp_path) -> None:
    """export=x.pt wrote safetensors bytes that FrozenBackbone then read with torch.load (refused); export=DIR
    crashed with IsADirectoryError after the whole run."""
    (tmp_path / "d.safetensors").mkdir()
    for bad in (str(tmp_path / "bb.pt"), str(tmp_path), str(tmp_path / "d.safetensors")):
        with pytest.raises(FSCSError, match=r"^pretrain config key 'export' is .*\.safetensors file"):
            load_pretrain_config(None, [f"export={bad}"])
    assert load_pretrain_config(None, [f"export={tmp_path / 'bb.safetensors'}"]).export_path.name == "bb.safetensors"


def test_shards_with_images_of_several_sizes_load_with_data_load_size(tmp_path) -> None:
    """Docs: `fscs pretrain` runs on any image shards; PASCAL, COCO and folder shards keep each image's own size
    and were refused ('pretraining needs one image size') with no way around it."""
    from fscs.data.shard_write import write_shards
    from fscs.data.types import Sample
    from fscs.pretrain_data import load_images

    rng = np.random.default_rng(0)

    def samples():
        for i, (h, w, label) in enumerate([(40, 56, 1), (64, 48, 2), (50, 50, 3), (72, 40, 2)]):
            mask = np.full((h, w), label, dtype=np.uint8)
            yield Sample(f"s{i}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mask, (label,)), "trn"

    shards = write_shards(samples(), tmp_path / "mixed", dataset="mixed-sizes", class_names=["a", "b", "c"],
                          folds={0: [1], 1: [2, 3]})
    with pytest.raises(FSCSError, match=r"needs one image size: set data.load_size=N"):
        load_images(load_pretrain_config(None, [f"data.shards={shards}", "labels.fold=0"]))
    cfg = load_pretrain_config(None, [f"data.shards={shards}", "labels.fold=0", "data.load_size=24"])
    images, labels, classes = load_images(cfg)
    assert images.shape == (3, 3, 24, 24) and images.dtype == torch.uint8 and classes == [2, 3]
    assert labels.tolist() == [[1, 0], [0, 1], [1, 0]]  # the fold-0 image (class 1) is dropped


def test_resume_on_another_dataset_is_refused(tmp_path) -> None:
    """data.shards may change on resume (moved files), but not to another shard set: a labels run died with a
    load_state_dict traceback (another class count), a plain DINO run went on silently on other images."""
    from fscs.data.shard_write import write_shards
    from fscs.data.synthetic import build_synthetic_shards
    from fscs.data.types import Sample
    from fscs.distributed import DistEnv
    from fscs.pretrain import run_pretrain

    synth = build_synthetic_shards(tmp_path / "synth", num_images=24, size=96, workers=1)
    rng = np.random.default_rng(0)
    other = write_shards(((Sample(f"s{i}", rng.integers(0, 256, (96, 96, 3), dtype=np.uint8),
                                  np.full((96, 96), 1 + i % 4, dtype=np.uint8), (1 + i % 4,)), "trn")
                          for i in range(8)), tmp_path / "other", dataset="other-set",
                         class_names=["a", "b", "c", "d"], folds={0: [1], 1: [2], 2: [3], 3: [4]})
    tiny = [f"out_dir={tmp_path}", "name=p", "optim.steps=3", "model.backbone=fscs_vit_mini_patch8",
            "model.image_size=32", "dino.local_size=16", "dino.local_crops=1", "dino.out_dim=16",
            "dino.hidden_dim=16", "dino.bottleneck_dim=8", "optim.batch_size=2", "image_every=0"]
    run_pretrain(load_pretrain_config(None, [f"data.shards={synth}", "stop_at=1", *tiny]), DistEnv())
    with pytest.raises(FSCSError, match=r"made on dataset 'synthetic-5i', but data.shards holds 'other-set'") as err:
        run_pretrain(load_pretrain_config(None, [f"data.shards={other}", *tiny]), DistEnv())
    assert "\n" not in str(err.value)
    assert run_pretrain(load_pretrain_config(None, [f"data.shards={synth}", *tiny]), DistEnv())["steps"] == 3


def test_rerunning_a_finished_pretraining_keeps_its_summary(tmp_path) -> None:
    """A rerun of a completed run (a requeue, the documented command again) only re-exports, but it overwrote
    pretrain_summary.json with steps_this_run 0, seconds 0 and no losses: the record of the training was lost."""
    import json

    from fscs.data.synthetic import build_synthetic_shards
    from fscs.distributed import DistEnv
    from fscs.model.backbone import file_sha256
    from fscs.pretrain import run_pretrain

    shards = build_synthetic_shards(tmp_path / "synth", num_images=24, size=96, workers=1)
    cfg = load_pretrain_config(None, [f"data.shards={shards}", f"out_dir={tmp_path}", "name=p", "optim.steps=2",
                                      "model.backbone=fscs_vit_mini_patch8", "model.image_size=32", "dino.weight=0",
                                      "labels.fold=0", "labels.evidence_width=8", "optim.batch_size=2",
                                      "image_every=0"])
    first = run_pretrain(cfg, DistEnv())
    sha = file_sha256(first["export"])
    again = run_pretrain(cfg, DistEnv())
    on_disk = json.loads((cfg.run_dir / "pretrain_summary.json").read_text())
    assert again == on_disk and on_disk["steps_this_run"] == 2 and "mask" in on_disk["last"]
    assert on_disk["seconds"] == first["seconds"] and file_sha256(again["export"]) == sha


def test_resume_with_another_process_count_warns(tmp_path, caplog) -> None:
    """Rerunning resumes exactly only with the same number of processes (the batch of step s is drawn per
    rank); a resume under another torchrun --nproc_per_node went on without a word."""
    import logging

    from fscs.data.synthetic import build_synthetic_shards
    from fscs.distributed import DistEnv
    from fscs.pretrain import CHECKPOINT, Pretrainer, run_pretrain

    shards = build_synthetic_shards(tmp_path / "synth", num_images=24, size=96, workers=1)
    cfg = load_pretrain_config(None, [f"data.shards={shards}", f"out_dir={tmp_path}", "name=p", "optim.steps=3",
                                      "model.backbone=fscs_vit_mini_patch8", "model.image_size=32", "dino.weight=0",
                                      "labels.fold=0", "labels.evidence_width=8", "optim.batch_size=2",
                                      "image_every=0", "stop_at=1"])
    run_pretrain(cfg, DistEnv())
    state = torch.load(cfg.run_dir / CHECKPOINT, weights_only=True)
    state["world_size"] = 2  # as a 2-process torchrun job would have saved it
    torch.save(state, cfg.run_dir / CHECKPOINT)
    with caplog.at_level(logging.WARNING, logger="fscs.pretrain"):
        Pretrainer(cfg, DistEnv())._resume()
    assert "number of processes changed from 2 to 1" in caplog.text

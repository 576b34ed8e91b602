"""Mixed supervision: deterministic GT subset, subset-only mask decoding, enhancer, no pixel label in weak."""
from __future__ import annotations

from itertools import islice

import pytest
import torch

import fscs.data.stream as stream_mod
from fscs import FSCSModel
from fscs.config import load_config
from fscs.data.stream import TrainEpisodeStream, gt_subset, gt_subset_member, make_train_loader
from fscs.distributed import DistEnv
from fscs.engine.checkpoint import load_checkpoint, save_checkpoint
from fscs.engine.ddp import DDPEngine
from fscs.errors import FSCSError
from fscs.model.enhancer import PseudoMaskEnhancer, enhancer_loss
from fscs.run_dir import build_model
from fscs.train import Trainer

S = 32  # network input size in these tests (images are 96 px)
PIXEL_KEYS = {"support_mask", "query_target", "support_has_gt", "query_has_gt"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> FSCSModel:
    return FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=S, enhancer=True).eval()


def _stream(shard_dir, **kw) -> TrainEpisodeStream:
    args = {"fold": 0, "way": 1, "shot": 1, "image_size": S, "seed": 0, "use_masks": False,
            "buffer_per_class": 8}
    args.update(kw)
    return TrainEpisodeStream(shard_dir, **args)


def _spy_decodes(monkeypatch) -> list[tuple[str, bool, bool]]:
    """Record (key, mask.png was read from the tar, mask decode requested) for every decoded sample."""
    calls: list[tuple[str, bool, bool]] = []
    real = stream_mod.decode_sample

    def spy(key, files, decode_masks=True):
        calls.append((key, "mask.png" in files, bool(decode_masks)))
        return real(key, files, decode_masks)

    monkeypatch.setattr(stream_mod, "decode_sample", spy)
    return calls


def test_gt_subset_is_deterministic_nested_and_sized():
    keys = [f"img_{i:05d}" for i in range(4000)]
    small, large = gt_subset(keys, 3, 0.05), gt_subset(keys, 3, 0.2)
    assert small == gt_subset(list(reversed(keys)), 3, 0.05)  # order-free, recomputable anywhere
    assert abs(len(small) / len(keys) - 0.05) < 0.015 and abs(len(large) / len(keys) - 0.2) < 0.03
    assert small <= large  # nested across fractions of one seed
    assert gt_subset(keys, 4, 0.2) != large  # the seed picks the subset
    assert gt_subset(keys, 3, 0.0) == set() and gt_subset(keys, 3, 1.0) == set(keys)
    assert all(gt_subset_member(k, 3, 0.2) == (k in large) for k in keys[:200])


def test_gt_subset_same_on_every_rank_and_epoch(shard_dir):
    streams = [_stream(shard_dir, gt_fraction=0.3, rank=r, world_size=2) for r in (0, 1)]
    assert streams[0].gt_keys == streams[1].gt_keys == gt_subset(streams[0].allowed, 0, 0.3)
    assert 0.15 < len(streams[0].gt_keys) / len(streams[0].allowed) < 0.45
    streams[0].set_epoch(5)
    assert streams[0].gt_keys == streams[1].gt_keys  # no epoch/rank/worker dependence
    assert _stream(shard_dir, gt_fraction=0.3, seed=1).gt_keys != streams[0].gt_keys


def test_mixed_stream_decodes_only_subset_masks(shard_dir, monkeypatch):
    calls = _spy_decodes(monkeypatch)
    stream = _stream(shard_dir, gt_fraction=0.3, way=2, shot=2)
    episodes = list(islice(stream, 12))
    assert calls, "the stream decoded nothing"
    for key, mask_read, decode_requested in calls:
        in_subset = key in stream.gt_keys
        assert mask_read == in_subset and decode_requested == in_subset, key  # others' mask.png never read
    assert any(k in stream.gt_keys for k, _, _ in calls) and any(k not in stream.gt_keys for k, _, _ in calls)
    for e in episodes:
        assert set(e) == {"query_img", "support_img", "presence", "classes"} | PIXEL_KEYS
        assert e["support_mask"].shape == (2, 2, S, S) and e["support_has_gt"].shape == (2, 2)
        assert e["support_has_gt"].dtype == torch.bool and e["query_has_gt"].shape == ()
        has = e["support_has_gt"][..., None, None]
        assert not (e["support_mask"] * ~has).any()  # no information where there is no GT
        shows_class = e["support_mask"].flatten(2).amax(-1) == 1
        assert (shows_class == e["support_has_gt"]).all()  # a GT support mask shows its class
        if not e["query_has_gt"]:
            assert (e["query_target"] == 255).all()
        else:
            assert set(e["query_target"].unique().tolist()) <= {0, 1, 255}
    flags = torch.cat([torch.cat([e["support_has_gt"].flatten(), e["query_has_gt"].view(1)])
                       for e in episodes])
    assert flags.any() and not flags.all()


def test_weak_regime_uses_no_pixel_label(shard_dir, tmp_path, monkeypatch):
    # 1) the weak stream never reads a mask file and delivers no mask key
    calls = _spy_decodes(monkeypatch)
    stream = _stream(shard_dir, way=2)
    batch = next(iter(make_train_loader(stream, batch_size=2, num_workers=0, steps_per_epoch=1)))
    assert calls and not any(mask_read or requested for _, mask_read, requested in calls)
    assert not PIXEL_KEYS & set(batch)
    # 2) the model refuses masks in weak
    model = FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=S)
    feats = model.encode_episode(batch["query_img"], batch["support_img"])
    with pytest.raises(ValueError, match="weak"):
        model.decode_episode(feats, torch.ones(2, 2, 1, S, S), regime="weak")
    with pytest.raises(ValueError, match="weak"):
        model.decode_episode(feats, None, regime="weak", support_has_gt=torch.ones(2, 2, 1, dtype=torch.bool))
    # 3) a weak training step gets no mask tensor to the model, and refuses a batch that carries one
    cfg = load_config(None, [f"data.shards={shard_dir}", f"out_dir={tmp_path}", f"model.image_size={S}",
                             "data.way=2", "data.batch_size=2", "train.regime=weak"])
    trainer = Trainer(cfg, DistEnv())
    seen: list[dict] = []
    real_decode = FSCSModel.decode_episode

    def spy(self, feats, support_masks=None, regime="weak", *args, **kwargs):
        seen.append({"masks": support_masks, "regime": regime, "has_gt": kwargs.get("support_has_gt")})
        return real_decode(self, feats, support_masks, regime, *args, **kwargs)

    monkeypatch.setattr(FSCSModel, "decode_episode", spy)
    parts = trainer.train_step(batch)
    assert seen == [{"masks": None, "regime": "weak", "has_gt": None}] and parts["loss"] > 0
    with pytest.raises(FSCSError, match="pixel labels"):
        trainer.train_step({**batch, "support_mask": torch.ones(2, 2, 1, S, S)})


def test_mixed_forward_shapes_and_gt_substitution(model, monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, s = torch.randn(2, 3, S, S, generator=g), torch.randn(2, 2, 3, 3, S, S, generator=g)
    presence = torch.tensor([[1, 0], [0, 1]])
    with torch.no_grad():
        feats = model.encode_episode(q, s)
        mixed = model.decode_episode(feats, regime="mixed", query_presence=presence, out_size=(40, 50))
    assert mixed.cls_logits.shape == (2, 2, 2) and mixed.mask_logits.shape == (2, 2, 2, 40, 50)
    assert mixed.pseudo_support.shape == (2, 2, 3, S, S) and mixed.pseudo_query.shape == (2, 2, S, S)
    assert mixed.enhancer_support_logits.shape == mixed.enhancer_query_logits.shape == (2, 2, 3, 4, 4)
    assert not mixed.pseudo_query[0, 1].any() and not mixed.pseudo_query[1, 0].any()  # absent -> empty
    # the untrained enhancer (zero last conv + rule prior) starts at the configured rule on the token grid
    grid = model.backbone.grid
    rule_grid = model.distiller.support_masks(feats.support_q, feats.support_k, grid, grid)
    assert torch.equal(mixed.enhancer_support_logits.flatten(0, 2) > 0, rule_grid.bool())
    # GT support masks replace the enhanced ones exactly where support_has_gt is set
    gt = torch.zeros(2, 2, 3, S, S)
    gt[..., 8:20, 8:20] = 1
    has_gt = torch.zeros(2, 2, 3, dtype=torch.bool)
    has_gt[0, 1, 2] = has_gt[1, 0, 0] = True
    got: list[torch.Tensor] = []
    real_forward = type(model.head).forward

    def spy(self, corr, m, *args, **kwargs):
        got.append(m.clone())
        return real_forward(self, corr, m, *args, **kwargs)

    monkeypatch.setattr(type(model.head), "forward", spy)
    with torch.no_grad():
        model.decode_episode(feats, gt, regime="mixed", support_has_gt=has_gt)
    want = torch.where(has_gt[..., None, None], gt, mixed.pseudo_support).flatten(0, 2)
    assert torch.equal(got[0], want)
    with pytest.raises(ValueError, match="together"):
        model.decode_episode(feats, gt, regime="mixed")
    plain = FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=S)
    with pytest.raises(FSCSError, match="enhancer"):
        plain.decode_episode(plain.encode_episode(q, s), regime="mixed")


@pytest.mark.parametrize("rule", ["otsu_border", "reference"])
def test_untrained_enhancer_follows_the_rule_and_empty_supports_fall_back(rule):
    m = FSCSModel.build(backbone="fscs_vit_mini_patch8", weights="asset:fscs_vit_mini_patch8.safetensors",
                        image_size=S, mask_rule=rule, enhancer=True).eval()
    g = torch.Generator().manual_seed(3)
    q, s = torch.rand(2, 3, S, S, generator=g), torch.rand(2, 1, 2, 3, S, S, generator=g)
    with torch.no_grad():
        feats = m.encode_episode(q, s)
        grid = m.backbone.grid
        rule_grid = m.distiller.support_masks(feats.support_q, feats.support_k, grid, grid)
        logits = m.enhancer_logits(feats.support_q, feats.support_k)
        assert torch.equal(logits > 0, rule_grid.bool())
        assert rule != "otsu_border" or (rule_grid.any() and not rule_grid.all())
        weak_support, _ = m.pseudo_masks(feats)
        m.enhancer.prior_scale.fill_(0.0)
        m.enhancer.body[-1].bias.fill_(-10.0)  # an enhancer that has collapsed to empty masks
        support, query, _, _ = m.enhanced_masks(feats)
    assert torch.equal(support, weak_support)  # a support always shows its class: the rule's mask instead
    assert not query.any()


def test_enhancer_loss_skips_query_maps_of_absent_classes(model):
    from fscs.model.enhancer import mixed_step_loss

    cfg = load_config(None, [f"model.image_size={S}", "train.regime=mixed", "train.gt_fraction=0.2"]).train
    g = torch.Generator().manual_seed(2)
    target = torch.zeros(3, 1, S, S, dtype=torch.long)
    target[0, 0, 4:12, 4:12] = 1
    batch = {"query_img": torch.rand(3, 3, S, S, generator=g),
             "support_img": torch.rand(3, 1, 1, 3, S, S, generator=g), "presence": torch.tensor([[1.0], [0.0], [1.0]]), "support_mask": torch.zeros(3, 1, 1, S, S),
             "support_has_gt": torch.tensor([[[False]], [[True]], [[False]]]), "query_target": target,
             "query_has_gt": torch.tensor([True, True, False])}
    batch["support_mask"][1, 0, 0, 8:20, 8:20] = 1
    _, parts = mixed_step_loss(model, batch, cfg)
    # maps with GT: support 1, query 0 (class present); query 1 has GT but its class is absent: left out
    assert int(parts["gt_maps"]) == 2


def test_enhancer_trains_on_a_tiny_set():
    torch.manual_seed(0)
    maps = torch.rand(12, 3, 8, 8) * 2 - 1
    # toy target: where head 0 exceeds head 1 (the mean-cosine prior alone cannot express it)
    target = PseudoMaskEnhancer.upsample(maps[:, 0] - maps[:, 1], (S, S)).gt(0).long()
    target[:, :2] = 255  # an ignored band
    rule = maps.mean(1).gt(0).float()  # a rule that cannot express the target
    enh = PseudoMaskEnhancer(num_heads=3, channels=32)
    opt = torch.optim.Adam(enh.parameters(), lr=1e-2)
    valid = torch.ones(12, dtype=torch.bool)
    valid[-1] = False
    losses = []
    for _ in range(30):
        loss, count = enhancer_loss(enh(maps, rule), target, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert int(count) == 11
    assert losses[-1] < 0.6 * losses[0], losses
    pred = enh.probs(enh(maps, rule), (S, S)) > 0.5
    keep = target != 255
    assert (pred == target.bool())[keep].float().mean() > 0.85
    # no valid map: zero loss that still reaches every parameter (DDP needs a gradient for each)
    zero, _ = enhancer_loss(enh(maps, rule), target, torch.zeros(12, dtype=torch.bool))
    enh.zero_grad()
    zero.backward()
    assert zero.item() == 0.0 and all(p.grad is not None for p in enh.parameters())


def test_checkpoint_round_trip_includes_enhancer(tmp_path):
    cfg = load_config(None, [f"model.image_size={S}", "train.regime=mixed", "train.gt_fraction=0.2"])
    model = FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=S, enhancer=True)
    engine = DDPEngine(model.head, cfg.train, DistEnv(), torch.device("cpu"))
    ids = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in ids for p in model.enhancer.parameters())  # optimised (and DDP-wrapped) with the head
    with torch.no_grad():
        for p in model.enhancer.parameters():
            p.add_(0.01)
    save_checkpoint(tmp_path / "ckpt.pt", {"engine": engine.state_dict()})
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert any(k.startswith("enhancer.") for k in state["engine"]["head"])
    fresh = FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=S, enhancer=True)
    fresh.head.load_state_dict(state["engine"]["head"])
    for a, b in zip(model.enhancer.state_dict().values(), fresh.enhancer.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="enhancer"):  # a head without enhancer cannot take it silently
        plain = FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=S)
        plain.head.load_state_dict(state["engine"]["head"])


def test_config_keys():
    cfg = load_config(None, ["train.regime=mixed", "train.gt_fraction=0.05", "model.enhancer_channels=64"])
    assert cfg.train.gt_fraction == 0.05 and cfg.model.enhancer_channels == 64
    assert cfg.train.enhancer_weight == 1.0
    with pytest.raises(FSCSError, match="gt_fraction"):
        load_config(None, ["train.regime=mixed"])
    with pytest.raises(FSCSError, match="gt_fraction"):
        load_config(None, ["train.regime=weak", "train.gt_fraction=0.1"])


def test_build_model_attaches_enhancer_for_mixed_only():
    mixed = load_config(None, [f"model.image_size={S}", "train.regime=mixed", "train.gt_fraction=0.2",
                               "model.enhancer_channels=16"])
    assert build_model(mixed).enhancer.channels == 16
    assert build_model(load_config(None, [f"model.image_size={S}"])).enhancer is None


def test_trainer_mixed_end_to_end(shard_dir, tmp_path):
    from fscs.bench.runs import load_run
    from fscs.losses import at_chance

    cfg = load_config(None, [f"data.shards={shard_dir}", f"out_dir={tmp_path}", "name=mixed",
                             f"model.image_size={S}", "data.batch_size=2", "data.num_workers=0",
                             "data.buffer_per_class=8", "train.regime=mixed", "train.gt_fraction=0.5",
                             "train.epochs=1", "train.steps_per_epoch=2"])
    summary = Trainer(cfg, DistEnv()).fit()
    assert summary["steps"] == 2 and "enh" in summary["history"][0]
    assert summary["classifier_at_chance"] == at_chance(summary["history"][-1]["cls"])
    loaded = load_run(tmp_path / "mixed")
    assert loaded.model.enhancer is not None and loaded.cfg.train.regime == "mixed"

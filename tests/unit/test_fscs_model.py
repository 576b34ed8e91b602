"""FSCSModel: episode forward in both regimes, one backbone pass per image, K-shot averaging, reference loading."""
from __future__ import annotations

import argparse

import pytest
import torch

from fscs import FSCSModel
from fscs.errors import FSCSError
from fscs.model.cst import _reference_module_map

SIZE = 64


@pytest.fixture(scope="module")
def model() -> FSCSModel:
    torch.manual_seed(0)
    return FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=SIZE).eval()


def _episode(b=2, n=2, k=1):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, SIZE, SIZE, generator=g), torch.randn(b, n, k, 3, SIZE, SIZE, generator=g)


def test_weak_and_full_shapes(model):
    q, s = _episode()
    with torch.no_grad():
        weak = model.forward_episode(q, s, regime="weak", query_presence=torch.tensor([[1, 0], [0, 1]]))
        full = model.forward_episode(q, s, torch.ones(2, 2, 1, SIZE, SIZE), regime="full", out_size=(50, 70))
    assert weak.cls_logits.shape == (2, 2, 2) and weak.mask_logits.shape == (2, 2, 2, SIZE, SIZE)
    assert weak.pseudo_support.shape == (2, 2, 1, SIZE, SIZE) and weak.pseudo_query.shape == (2, 2, SIZE, SIZE)
    assert set(weak.pseudo_query.unique().tolist()) <= {0.0, 1.0}
    assert weak.pseudo_query[0, 1].sum() == 0 and weak.pseudo_query[1, 0].sum() == 0  # absent -> zeroed
    assert full.mask_logits.shape == (2, 2, 2, 50, 70) and full.pseudo_query is None


def test_weak_regime_refuses_pixel_labels(model):
    q, s = _episode()
    with pytest.raises(ValueError, match="no pixel labels"):
        model.forward_episode(q, s, torch.ones(2, 2, 1, SIZE, SIZE), regime="weak")
    with pytest.raises(ValueError, match="support_masks"):
        model.forward_episode(q, s, None, regime="full")


def test_wrong_input_shapes_name_the_argument_and_its_public_shape(model):
    """A support mask without its K axis was reported in the head's flattened shapes ("support_mask must be
    [B=2, Hs, Ws], got (128, 64)"); each argument is now checked against its documented shape."""
    q, s = _episode()
    want = rf"support_masks must be \[B, N, K, S, S\] = \[2, 2, 1, {SIZE}, {SIZE}\]"
    with pytest.raises(ValueError, match=want):
        model.forward_episode(q, s, torch.ones(2, 2, SIZE, SIZE), regime="full")
    with pytest.raises(ValueError, match=rf"query must be \[B, 3, {SIZE}, {SIZE}\]"):
        model.forward_episode(q[..., :-8], s)
    with pytest.raises(ValueError, match=r"support must be \[B=2, N, K, 3"):
        model.forward_episode(q, s[:, 0])  # no way axis
    with pytest.raises(ValueError, match=r"query_presence must be \[B, N\] = \[2, 2\]"):
        model.forward_episode(q, s, regime="weak", query_presence=torch.ones(2))


def test_each_image_passes_backbone_once(model, monkeypatch):
    calls = []
    original = model.backbone.forward

    def counting(images):
        calls.append(images.shape[0])
        return original(images)

    monkeypatch.setattr(model.backbone, "forward", counting)
    q, s = _episode(b=2, n=2, k=3)
    with torch.no_grad():
        model.forward_episode(q, s, regime="weak")
    assert calls == [2 + 2 * 2 * 3]  # one pass: 2 queries + 12 supports, the query not repeated per way/shot


def test_k_shot_averages_probabilities(model):
    q, s = _episode(b=1, n=1, k=2)
    masks = torch.ones(1, 1, 2, SIZE, SIZE)
    with torch.no_grad():
        both = model.forward_episode(q, s, masks, regime="full")
        one = [model.forward_episode(q, s[:, :, i : i + 1], masks[:, :, :1], regime="full") for i in range(2)]
    expect = torch.stack([o.cls_logits.softmax(-1) for o in one]).mean(0)
    assert torch.allclose(both.cls_logits.softmax(-1), expect, atol=1e-5)
    expect_seg = torch.stack([o.mask_logits.softmax(2) for o in one]).mean(0)
    assert torch.allclose(both.mask_logits.softmax(2), expect_seg, atol=1e-5)


def test_k_shot_query_pseudo_mask_is_the_strict_majority_of_the_shots(model, monkeypatch):
    q, s = _episode(b=1, n=1, k=2)
    with torch.no_grad():
        feats = model.encode_episode(q, s)
    shots = torch.zeros(2, SIZE, SIZE)
    shots[0, :, : SIZE // 2] = 1  # shot 0: left half; shot 1: top half; they agree on the top-left quarter
    shots[1, : SIZE // 2] = 1
    monkeypatch.setattr(model.distiller, "query_masks", lambda *a, **k: shots.clone())
    _, query = model.pseudo_masks(feats)
    expect = torch.zeros(SIZE, SIZE)
    expect[: SIZE // 2, : SIZE // 2] = 1
    assert torch.equal(query[0, 0], expect)  # a 1-of-2 tie is background (the mixed path's rule too)


def test_predict_decisions(model):
    q, s = _episode()
    with torch.no_grad():
        out = model.forward_episode(q, s, regime="weak")
    presence, pred = model.predict(out)
    assert presence.shape == (2, 2) and presence.dtype == torch.bool
    assert pred.shape == (2, SIZE, SIZE) and int(pred.max()) <= 2


def test_load_reference_checkpoint(tmp_path):
    """A Lightning-style checkpoint ('learner.*' head keys, 'backbone.*' keys, pickled hparams) loads strictly."""
    model = FSCSModel.build(backbone="vit_small_patch16_224.dino", image_size=64)
    reverse = {ours: ref for ref, ours in _reference_module_map().items()}
    ref_sd = {}
    for key, value in model.head.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        ref_sd[f"learner.{reverse[mod]}.{leaf}"] = torch.randn_like(value)
    ref_sd["backbone.cls_token"] = torch.zeros(1, 1, 384)
    path = tmp_path / "fold0.ckpt"
    torch.save({"state_dict": ref_sd, "hyper_parameters": argparse.Namespace(lr=1e-3), "epoch": 10}, path)
    model.load_reference_checkpoint(path)
    assert torch.equal(model.head.state_dict()["cls_out.weight"], ref_sd["learner.decoder2_cls.2.weight"])
    assert model.head.cls_out.weight.shape == (2, 64, 1, 1)
    ours = tmp_path / "checkpoint.pt"  # an fscs train head by mistake: one short line, not 60 key names
    torch.save({"format": "fscs-checkpoint/1", "engine": {"head": model.head.state_dict()}, "step": 3}, ours)
    with pytest.raises(FSCSError, match=r"is an fscs checkpoint \(fscs-checkpoint/1\).*--run-dir RUN$"):
        model.load_reference_checkpoint(ours)


def test_encode_once_decode_many_equals_forward(model):
    """Features of an episode can be reused by several heads and regimes with identical results."""
    q, s = _episode(b=2, n=2, k=2)
    masks = (torch.rand(2, 2, 2, SIZE, SIZE) > 0.5).float()
    with torch.no_grad():
        feats = model.encode_episode(q, s)
        for regime, m in (("weak", None), ("full", masks)):
            direct = model.forward_episode(q, s, m, regime=regime)
            reused = model.decode_episode(feats, m, regime=regime)
            assert torch.equal(direct.cls_logits, reused.cls_logits)
            assert torch.equal(direct.mask_logits, reused.mask_logits)


def _stub_head(corr, masks, grid, out_size):
    """A head whose 'present' / foreground logit of pair j is the mean of pair j's support mask (+ ramp)."""
    v = masks.float().flatten(1).mean(1)  # [M]
    cls = torch.stack([torch.zeros_like(v), 4 * v - 1], dim=1)
    ramp = torch.linspace(-2, 2, out_size[1])
    fg = (4 * v - 1)[:, None, None] + ramp[None, None, :]
    seg = torch.stack([torch.zeros_like(fg.expand(-1, *out_size)), fg.expand(-1, *out_size)], dim=1)
    return cls, seg


def test_k_shot_averages_probabilities_of_each_way_and_shot_in_order(model):
    """K > 1: per (episode, way) the output's softmax is the mean over that way's shots of each shot's
    softmax (not a mean of logits), for classification and segmentation alike, and the per-shot mask
    logits are kept in [B, N, K] order."""
    b, n, k = 2, 2, 3
    q, s = _episode(b=b, n=n, k=k)
    frac = torch.arange(b * n * k, dtype=torch.float32).view(b, n, k) / (b * n * k)  # distinct per pair
    masks = torch.zeros(b, n, k, SIZE, SIZE)
    for idx in torch.cartesian_prod(torch.arange(b), torch.arange(n), torch.arange(k)):
        i, j, kk = idx.tolist()
        masks[i, j, kk, : int(round(float(frac[i, j, kk]) * SIZE))] = 1
    v = masks.flatten(3).mean(3)  # [B, N, K] exact fractions the stub head sees
    with torch.no_grad():
        feats = model.encode_episode(q, s)
        out = model.decode_episode(feats, masks, regime="full", head=_stub_head, out_size=(4, 5))
    p_shot = torch.sigmoid(4 * v - 1)  # softmax([0, x])[1]
    assert torch.allclose(out.cls_logits.softmax(-1)[..., 1], p_shot.mean(2), atol=1e-6)
    ramp = torch.linspace(-2, 2, 5)
    fg_shot = torch.sigmoid((4 * v - 1)[..., None, None] + ramp)  # [B, N, K, 1, 5]
    assert torch.allclose(out.mask_logits.softmax(2)[:, :, 1], fg_shot.mean(2).expand(b, n, 4, 5), atol=1e-6)
    assert out.shot_mask_logits.shape == (b, n, k, 2, 4, 5)
    assert torch.allclose(out.shot_mask_logits[:, :, :, 1, 0, 0], 4 * v - 3, atol=1e-6)  # ramp starts at -2


def test_predict_thresholds_present_probability_and_way_argmax():
    """predict(): presence = softmax(cls)[present] > 0.5; label = 1 + argmax over ways of the foreground
    probability (softmax over background/foreground), 0 where that maximum is below 0.5."""
    logit = lambda p: torch.log(torch.tensor(p) / (1 - torch.tensor(p)))  # noqa: E731
    cls = torch.stack([torch.zeros(2), logit([0.7, 0.3])], -1)[None]  # [1, N=2, 2]
    fg = torch.tensor([[[0.9, 0.2, 0.55]], [[0.6, 0.3, 0.45]]])  # [N, 1, 3] foreground probabilities
    mask = torch.stack([torch.zeros_like(fg), logit(fg.tolist())], 1)[None]  # [1, N, 2, 1, 3]
    from fscs.model.fscs_model import EpisodeOutput
    presence, pred = FSCSModel.predict(None, EpisodeOutput(cls, mask))
    assert presence.tolist() == [[True, False]]
    assert pred.tolist() == [[[1, 0, 1]]]
    presence, pred = FSCSModel.predict(None, EpisodeOutput(cls, mask), threshold=0.58)
    assert presence.tolist() == [[True, False]] and pred.tolist() == [[[1, 0, 0]]]


def test_batched_weak_pseudo_masks_equal_each_pair_alone():
    """B, N, K > 1: pseudo-masks of support (b, n, k) and the query's per-shot masks are those of the single
    pair (query b, support (b, n, k)); the image-level label of (b, n) zeroes every shot of way n only."""
    torch.manual_seed(0)
    model = FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=SIZE, mask_rule="otsu").eval()
    b, n, k = 2, 2, 2
    q, s = _episode(b=b, n=n, k=k)
    presence = torch.tensor([[1, 0], [1, 1]])
    with torch.no_grad():
        sup, qry = model.pseudo_masks(model.encode_episode(q, s), presence)
        alone_q = {}
        for i in range(b):
            for j in range(n):
                for kk in range(k):
                    pair = model.encode_episode(q[i:i + 1], s[i:i + 1, j:j + 1, kk:kk + 1])
                    one_s, one_q = model.pseudo_masks(pair)
                    assert torch.equal(sup[i, j, kk], one_s[0, 0, 0]), (i, j, kk)
                    alone_q[i, j, kk] = one_q[0, 0]
    assert len({alone_q[key].sum().item() for key in alone_q}) > 2  # the checks can tell pairs apart
    assert len({sup[i, j, kk].sum().item() for i in range(b) for j in range(n) for kk in range(k)}) > 2
    for i in range(b):
        for j in range(n):
            expect = alone_q[i, j, 0] * alone_q[i, j, 1] * presence[i, j]  # strict majority of 2 = both
            assert torch.equal(qry[i, j], expect), (i, j)


def test_upsample_logits_is_corner_aligned_bilinear_over_leading_dims():
    """Mask logits reach the original query size by bilinear upsampling with align_corners=True (as the
    reference): corners are kept, the midpoint of a 2x2 map is its mean; leading dims are preserved."""
    from fscs.model.fscs_model import upsample_logits

    logits = torch.tensor([[0.0, 4.0], [8.0, 12.0]]).expand(2, 3, 2, 2, 2)  # [B, N, C, h, w]
    up = upsample_logits(logits, (3, 5))
    assert up.shape == (2, 3, 2, 3, 5)
    assert up[1, 2, 0].tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0], [4.0, 5.0, 6.0, 7.0, 8.0],
                                    [8.0, 9.0, 10.0, 11.0, 12.0]]


def test_batched_enhanced_masks_equal_each_pair_alone():
    """Mixed regime, B and N > 1: the enhanced support mask of (b, n) and the enhanced query mask of query b
    for way n are those of the single pair (query b, support (b, n)), zeroed where the label is absent."""
    m = FSCSModel.build(backbone="fscs_vit_mini_patch8", weights="asset:fscs_vit_mini_patch8.safetensors",
                        image_size=32, mask_rule="otsu_border", enhancer=True).eval()
    g = torch.Generator().manual_seed(5)
    q, s = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 2, 1, 3, 32, 32, generator=g)
    presence = torch.tensor([[1, 1], [1, 0]])
    with torch.no_grad():
        sup, qry, _, _ = m.enhanced_masks(m.encode_episode(q, s), presence)
        alone = {(i, j): m.enhanced_masks(m.encode_episode(q[i:i + 1], s[i:i + 1, j:j + 1]))
                 for i in range(2) for j in range(2)}
    assert not torch.equal(alone[0, 0][1], alone[1, 0][1])  # the two queries' masks differ
    assert len({float(a[0].sum()) for a in alone.values()}) > 2
    for (i, j), (one_s, one_q, _, one_ql) in alone.items():
        assert torch.equal(sup[i, j, 0], one_s[0, 0, 0]), (i, j)
        assert torch.equal(qry[i, j], one_q[0, 0] * presence[i, j]), (i, j)
        with torch.no_grad():  # query masks read the support-CLS-vs-query-keys logits, not the support's own
            feats = m.encode_episode(q[i:i + 1], s[i:i + 1, j:j + 1])
            ql = m.enhancer_logits(feats.support_q, feats.query_k)
            assert torch.allclose(one_ql.flatten(0, 2), ql, atol=1e-6)
            assert torch.equal(one_q[0, 0], (m.enhancer.probs(ql, (32, 32))[0] > 0.5).float())

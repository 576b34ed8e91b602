"""Hand-computed tests of the FS-CS loss (weights, flattening over ways, ignore index)."""
from __future__ import annotations

import math

import pytest
import torch

from fscs.errors import FSCSError
from fscs.losses import fscs_loss


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _ce(logits: tuple[float, float], label: int) -> float:
    """Two-class cross-entropy by hand."""
    a, b = logits
    lse = math.log(math.exp(a) + math.exp(b))
    return lse - logits[label]


def _inputs():
    # B=1, N=2, H=1, W=2
    cls = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]], requires_grad=True)
    seg = torch.tensor(
        [[
            [[[2.0, 0.0]], [[0.0, 1.0]]],   # way 1: pixel logits (2,0) and (0,1)
            [[[0.5, 3.0]], [[-0.5, 3.0]]],  # way 2: pixel logits (0.5,-0.5) and (3,3)
        ]],
        requires_grad=True,
    )
    presence = torch.tensor([[1.0, 0.0]])
    target = torch.tensor([[[[0, 1]], [[1, 0]]]])
    return cls, seg, presence, target


def test_loss_equals_hand_computation():
    cls, seg, presence, target = _inputs()
    loss, parts = fscs_loss(cls, seg, presence, target)
    want_cls = (_ce((0.0, 0.0), 1) + _ce((1.0, -1.0), 0)) / 2
    want_seg = (_ce((2.0, 0.0), 0) + _ce((0.0, 1.0), 1) + _ce((0.5, -0.5), 1) + _ce((3.0, 3.0), 0)) / 4
    assert parts["cls"].item() == pytest.approx(want_cls, rel=1e-6)
    assert parts["seg"].item() == pytest.approx(want_seg, rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * want_cls + want_seg, rel=1e-6)
    assert not parts["cls"].requires_grad and not parts["seg"].requires_grad
    loss.backward()
    assert cls.grad is not None and seg.grad is not None
    loss2, _ = fscs_loss(cls, seg, presence, target, cls_weight=1.0, seg_weight=0.5)
    assert loss2.item() == pytest.approx(want_cls + 0.5 * want_seg, rel=1e-6)


def test_foreground_weight_is_a_weighted_mean_of_pixel_ce():
    cls, seg, presence, target = _inputs()
    _, parts = fscs_loss(cls, seg, presence, target, fg_weight=3.0)
    # pixels (label): (2,0)->0, (0,1)->1, (0.5,-0.5)->1, (3,3)->0; foreground pixels weigh 3
    num = _ce((2.0, 0.0), 0) + 3 * _ce((0.0, 1.0), 1) + 3 * _ce((0.5, -0.5), 1) + _ce((3.0, 3.0), 0)
    assert parts["seg"].item() == pytest.approx(num / 8, rel=1e-6)


def test_ignore_index_excluded_from_mean_and_gradient():
    cls, seg, presence, target = _inputs()
    target = target.clone()
    target[0, 1, 0, 1] = 255  # the (3,3) pixel of way 2
    with torch.no_grad():
        seg[0, 1, 0, 0, 1] = -50.0  # would be a huge loss if it counted
    loss, parts = fscs_loss(cls, seg, presence, target)
    want_seg = (_ce((2.0, 0.0), 0) + _ce((0.0, 1.0), 1) + _ce((0.5, -0.5), 1)) / 3
    assert parts["seg"].item() == pytest.approx(want_seg, rel=1e-6)
    loss.backward()
    assert torch.all(seg.grad[0, 1, :, 0, 1] == 0)
    assert torch.any(seg.grad[0, 0] != 0)


def test_all_ignored_gives_zero_seg_with_graph():
    cls, seg, presence, target = _inputs()
    loss, parts = fscs_loss(cls, seg, presence, torch.full_like(target, 255))
    assert parts["seg"].item() == 0.0 and math.isfinite(loss.item())
    loss.backward()
    assert torch.all(seg.grad == 0)


def test_bad_shapes_and_values_raise():
    cls, seg, presence, target = _inputs()
    with pytest.raises(FSCSError):
        fscs_loss(cls, seg, presence[:, :1], target)
    with pytest.raises(FSCSError):
        fscs_loss(cls, seg, presence, target[..., :1])
    with pytest.raises(FSCSError):
        fscs_loss(cls[..., :1], seg, presence, target)
    with pytest.raises(FSCSError):
        fscs_loss(cls, seg, presence, target * 2)  # label 2 in a 2-class target
    with pytest.raises(FSCSError):
        fscs_loss(cls, seg, presence * 3, target)


def test_at_chance_is_a_band_around_ln2():
    from fscs.losses import CHANCE_CE, at_chance

    assert CHANCE_CE == pytest.approx(0.6931, abs=1e-4)
    assert at_chance(0.693) and at_chance(0.688) and at_chance(0.702)
    assert not at_chance(0.65) and not at_chance(0.71) and not at_chance(0.2)
    assert at_chance(0.66, margin=0.05)


def _tiny_model():
    from fscs import FSCSModel

    torch.manual_seed(0)
    return FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=32, mask_rule="otsu").eval()


def _batch(b=2, n=2, size=32):
    g = torch.Generator().manual_seed(3)
    return {"query_img": torch.randn(b, 3, size, size, generator=g),
            "support_img": torch.randn(b, n, 1, 3, size, size, generator=g),
            "presence": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}


def test_batch_loss_weak_targets_the_label_zeroed_query_pseudo_mask_with_config_weights():
    """Weak regime: the segmentation target is the query pseudo-mask, zeroed for classes the image-level
    label says are absent; train.cls_weight and train.seg_fg_weight reach the loss."""
    from fscs.config import TrainConfig
    from fscs.losses import batch_loss

    model, batch = _tiny_model(), _batch()
    cfg = TrainConfig(regime="weak", cls_weight=0.7, seg_fg_weight=2.5)
    with torch.no_grad():
        loss, parts = batch_loss(model, batch, cfg)
        out = model.forward_episode(batch["query_img"], batch["support_img"], regime="weak",
                                    query_presence=batch["presence"])
    target = out.pseudo_query.long()
    assert target[0, 1].sum() == 0 and target[1, 0].sum() == 0 and target.sum() > 0
    assert not torch.equal(target, out.pseudo_support[:, :, 0].long())  # the check below can tell them apart
    want, want_parts = fscs_loss(out.cls_logits, out.mask_logits, batch["presence"], target,
                                 cls_weight=0.7, fg_weight=2.5)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert parts["seg"].item() == pytest.approx(want_parts["seg"].item(), rel=1e-6)


@pytest.mark.parametrize("ignore_boundary", [False, True])
def test_batch_loss_full_uses_gt_support_masks_and_the_boundary_switch(ignore_boundary):
    """Full regime: GT support masks feed the head; 255 query pixels are background in the loss by default
    (the reference) and ignored with train.loss_ignore_boundary."""
    from fscs.config import TrainConfig
    from fscs.losses import batch_loss

    model, batch = _tiny_model(), _batch()
    smask = torch.zeros(2, 2, 1, 32, 32)
    smask[..., :12, :20] = 1
    target = torch.zeros(2, 2, 32, 32, dtype=torch.long)
    target[..., 4:10, 4:10] = 1
    target[..., 0:3, :] = 255
    batch.update(support_mask=smask, query_target=target)
    cfg = TrainConfig(regime="full", loss_ignore_boundary=ignore_boundary)
    with torch.no_grad():
        loss, _ = batch_loss(model, batch, cfg)
        out = model.forward_episode(batch["query_img"], batch["support_img"], smask, regime="full")
    used = target if ignore_boundary else torch.where(target == 255, torch.zeros_like(target), target)
    want, _ = fscs_loss(out.cls_logits, out.mask_logits, batch["presence"], used)
    as_bg = torch.where(target == 255, torch.zeros_like(target), target)
    other, _ = fscs_loss(out.cls_logits, out.mask_logits, batch["presence"],
                         as_bg if ignore_boundary else target)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert abs(want.item() - other.item()) > 1e-4  # the two boundary treatments differ here

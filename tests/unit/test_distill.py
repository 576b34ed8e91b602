"""Tests for the attention pseudo-mask distiller against brute-force full-attention computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fscs.errors import FSCSError
from fscs.model.backbone import FrozenBackbone
from fscs.model.distill import (
    MASK_RULES,
    PseudoMaskDistiller,
    cls_key_cosine,
    otsu_threshold,
    pseudo_mask,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _brute_force_cos(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Full [B, h, N, N] cosine logits of L2-normalised q/k, then the CLS row's image columns, head mean."""
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    return logits[:, :, 0, 1:].mean(dim=1).reshape(q.shape[0], *grid)


def _brute_force_mask(q: torch.Tensor, k: torch.Tensor, grid, size, threshold: float = 0.4) -> torch.Tensor:
    cos = _brute_force_cos(q, k, grid)
    up = F.interpolate(cos[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
    return ((up + 1) / 2 > threshold).float()


def _qk(batch: int = 3, heads: int = 3, grid=(4, 5), dh: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = 1 + grid[0] * grid[1]
    return torch.randn(batch, heads, n, dh, generator=gen), torch.randn(batch, heads, n, dh, generator=gen)


def test_cls_key_cosine_equals_full_attention_row() -> None:
    grid = (4, 5)
    q, k = _qk(grid=grid)
    cos = cls_key_cosine(q[:, :, 0], k[:, :, 1:], grid)
    assert cos.shape == (3, 4, 5)
    torch.testing.assert_close(cos, _brute_force_cos(q, k, grid), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls_key_cosine(q, k, grid), cos)  # CLS-first layouts accepted too
    assert cos.abs().max() <= 1.0
    with pytest.raises(ValueError, match="expected keys"):
        cls_key_cosine(q, k[:, :, 2:], grid)


def test_reference_rule_threshold_and_upsampling() -> None:
    cos = torch.tensor([[[-0.21, -0.21], [-0.21, -0.21]], [[-0.19, -0.19], [-0.19, -0.19]]])
    masks = pseudo_mask(cos, 6)
    assert masks.shape == (2, 6, 6) and masks.dtype == torch.float32
    assert masks[0].sum() == 0 and masks[1].sum() == 36  # (x+1)/2: 0.395 -> 0, 0.405 -> 1
    assert torch.equal(pseudo_mask(cos, 6, threshold=0.3), torch.ones(2, 6, 6))

    ramp = torch.linspace(-1, 1, 5).repeat(5, 1)[None]  # columns -1 .. 1
    mask = pseudo_mask(ramp, (3, 9))
    up = F.interpolate(ramp[:, None], size=(3, 9), mode="bilinear", align_corners=True)[:, 0]
    assert torch.equal(mask, ((up + 1) / 2 > 0.4).float())
    assert mask[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]  # -1,-.75,-.5,-.25 | 0, ...


def test_support_masks_equal_brute_force() -> None:
    grid = (4, 5)
    q, k = _qk(grid=grid, seed=1)
    masks = PseudoMaskDistiller().support_masks(q, k, grid, (16, 20))
    expected = _brute_force_mask(q, k, grid, (16, 20))
    assert masks.shape == (3, 16, 20)
    assert torch.equal(masks, expected)
    assert 0 < masks.mean() < 1  # both foreground and background occur


def test_query_masks_use_support_cls_and_zero_absent() -> None:
    grid = (4, 4)
    q_s, _ = _qk(batch=2, grid=grid, seed=2)
    q_q, k_q = _qk(batch=2, grid=grid, seed=3)
    present = torch.tensor([True, False])
    masks = PseudoMaskDistiller(threshold=0.45).query_masks(q_s, k_q, grid, (13, 7), present)
    assert masks.shape == (2, 13, 7)
    expected = _brute_force_mask(torch.cat([q_s[:, :, :1], q_q[:, :, 1:]], dim=2), k_q, grid, (13, 7), 0.45)
    assert torch.equal(masks[0], expected[0]) and 0 < masks[0].mean() < 1
    assert masks[1].sum() == 0
    unlabelled = PseudoMaskDistiller(threshold=0.45).query_masks(q_s, k_q, grid, (13, 7), None)
    assert torch.equal(unlabelled[0], masks[0]) and unlabelled[1].sum() > 0
    own_cls = _brute_force_mask(q_q, k_q, grid, (13, 7), 0.45)
    assert not torch.equal(masks[0], own_cls[0])  # the support CLS, not the query's own CLS, is used
    both = PseudoMaskDistiller(threshold=0.45)(q_s, k_q, k_q, grid, 8, (13, 7), torch.tensor([1.0, 0.0]))
    assert both[0].shape == (2, 8, 8) and torch.equal(both[1], masks)


def _otsu_brute(values: np.ndarray) -> float:
    """Best between-class variance over every split of the sorted distinct values (numpy loop)."""
    best, cut = -1.0, float("inf")
    distinct = np.unique(values)
    for low, high in zip(distinct[:-1], distinct[1:]):
        t = (low + high) / 2
        a, b = values[values <= t], values[values > t]
        var = len(a) * len(b) / len(values) ** 2 * (a.mean() - b.mean()) ** 2
        if var > best:
            best, cut = var, t
    return cut


def test_otsu_threshold_matches_brute_force_and_rule() -> None:
    gen = torch.Generator().manual_seed(4)
    values = torch.cat([torch.randn(2, 30, generator=gen) * 0.1 - 0.3,
                        torch.randn(2, 10, generator=gen) * 0.1 + 0.5], dim=1)
    cuts = otsu_threshold(values)
    for row, cut in zip(values.numpy(), cuts.tolist()):
        assert cut == pytest.approx(_otsu_brute(row.astype(np.float64)), abs=1e-6)
    assert torch.isinf(otsu_threshold(torch.full((1, 9), 0.3)))[0]

    cos = torch.full((1, 6, 6), 0.6)  # a 'background' well above the reference threshold...
    cos[:, 1:3, 2:5] = 0.9  # ...and a brighter object
    mask = pseudo_mask(cos, 6, rule="otsu")
    assert torch.equal(mask[0] > 0, cos[0] > 0.75)
    assert pseudo_mask(cos, 6).sum() == 36  # the reference rule marks everything
    assert pseudo_mask(torch.full((1, 3, 3), 0.2), 5, rule="otsu").sum() == 0
    distiller = PseudoMaskDistiller(rule="otsu")
    q, k = _qk(grid=(3, 3), seed=5)
    out = distiller.support_masks(q, k, (3, 3), 9)
    cos = _brute_force_cos(q, k, (3, 3))
    up = F.interpolate(cos[:, None], size=9, mode="bilinear", align_corners=True)[:, 0]
    assert torch.equal(out, (up > otsu_threshold(cos.flatten(1))[:, None, None]).float())


def test_rule_registry() -> None:
    assert {"reference", "otsu"} <= set(MASK_RULES)
    with pytest.raises(FSCSError, match="unknown pseudo-mask rule 'nope'"):
        PseudoMaskDistiller(rule="nope")
    with pytest.raises(FSCSError):
        pseudo_mask(torch.zeros(1, 2, 2), 4, rule="nope")


def test_distiller_on_backbone_output() -> None:
    backbone = FrozenBackbone("fscs_vit_tiny_patch8", None, 32)
    out = backbone(torch.randn(2, 3, 32, 32))
    distiller = PseudoMaskDistiller()
    support = distiller.support_masks(out.q, out.k, backbone.grid, 32)
    query = distiller.query_masks(out.q[:1].expand(2, -1, -1, -1), out.k, backbone.grid, (40, 30),
                                  torch.tensor([1, 1]))
    assert support.shape == (2, 32, 32) and query.shape == (2, 40, 30)
    assert torch.equal(support, _brute_force_mask(out.q, out.k, backbone.grid, (32, 32)))
    assert set(support.unique().tolist()) <= {0.0, 1.0}


def test_reference_rule_is_strictly_greater_than_the_threshold() -> None:
    """cst.md: foreground where (x + 1) / 2 > 0.4: a map value exactly at the threshold is background."""
    at = torch.tensor(0.4, dtype=torch.float32) * 2 - 1  # (at + 1) / 2 == float32(0.4) exactly
    assert float((at + 1) / 2) == float(torch.tensor(0.4, dtype=torch.float32))
    cos = torch.full((1, 2, 2), float(at))
    assert pseudo_mask(cos, 4).sum() == 0
    assert pseudo_mask(cos + 1e-6, 4).sum() == 16


def test_border_majority_needs_more_than_half_of_the_border() -> None:
    from fscs.model.distill import border_majority

    half = torch.zeros(1, 4, 4)  # 12 border tokens
    half[0, 0, :] = 1
    half[0, 1:3, 0] = 1  # 4 + 2 = 6 of 12: exactly half
    half[0, 1:3, 1:3] = 1  # the inner tokens do not count
    assert not border_majority(half).item()
    half[0, 3, 0] = 1  # 7 of 12
    assert border_majority(half).item()

"""Learned pseudo-mask enhancer for the mixed regime: a small conv net over per-head CLS-key cosine maps."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fscs.errors import FSCSError

if TYPE_CHECKING:  # pragma: no cover
    from fscs.config import TrainConfig
    from fscs.model.fscs_model import FSCSModel

logger = logging.getLogger(__name__)

IGNORE = 255
DEFAULT_PRIOR_SCALE = 8.0


class PseudoMaskEnhancer(nn.Module):
    """Refines rule pseudo-masks from the h per-head CLS-key cosine maps of the last block.

    Input: the h per-head cosine maps and the configured rule's mask on the token grid (`model.mask_rule`,
    as {0, 1}; fed as a +-1 channel). Body (cst.md's sketch, one extra input channel for the rule): conv
    (h+1)->C 3x3, ReLU, conv C->C 3x3, ReLU, conv C->1 3x3 (padding 1, C = 128). Added to the body's logit:
    a rule prior `prior_scale * (rule - 1/2)` with a learnable scale initialised to 8 (logit +-4). The last
    conv is zero-initialised, so an untrained enhancer reproduces the configured rule on the token grid,
    whichever rule that is, and training only has to learn corrections.
    """

    def __init__(self, num_heads: int, channels: int = 128, prior_scale: float = DEFAULT_PRIOR_SCALE):
        super().__init__()
        if num_heads < 1 or channels < 1:
            raise FSCSError(f"enhancer: num_heads={num_heads}, channels={channels} invalid; set "
                            "model.enhancer_channels >= 1")
        self.num_heads, self.channels = int(num_heads), int(channels)
        self.body = nn.Sequential(
            nn.Conv2d(num_heads + 1, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, 1, 3, padding=1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)
        self.prior_scale = nn.Parameter(torch.tensor(float(prior_scale)))

    def forward(self, maps: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        """maps [M, h, gh, gw] per-head cosines, rule [M, gh, gw] {0, 1} -> fg logits [M, gh, gw] (grid)."""
        if maps.ndim != 4 or maps.shape[1] != self.num_heads:
            raise ValueError(f"enhancer expects maps [M, {self.num_heads}, gh, gw], got {tuple(maps.shape)}")
        if tuple(rule.shape) != (maps.shape[0], *maps.shape[2:]):
            raise ValueError(f"enhancer rule masks {tuple(rule.shape)} do not match maps {tuple(maps.shape)}")
        rule = rule.to(maps.dtype)
        x = torch.cat([maps, (2.0 * rule - 1.0)[:, None]], dim=1)
        return self.body(x)[:, 0] + self.prior_scale * (rule - 0.5)

    @staticmethod
    def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits [M, gh, gw] -> [M, H, W] (bilinear, align_corners=True, float32)."""
        up = F.interpolate(logits.float()[:, None], size=tuple(size), mode="bilinear", align_corners=True)
        return up[:, 0]

    @torch.no_grad()
    def probs(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Foreground probabilities [M, H, W] from grid logits [M, gh, gw] (no gradient)."""
        return self.upsample(logits, size).sigmoid()


def enhancer_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                  dice_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE + soft Dice of enhancer logits against ground-truth foreground, on maps that have ground truth.

    logits [M, gh, gw] (grid logits, with grad); target [M, H, W] {0, 1} (255 = ignore, e.g. the VOC
    boundary band); valid [M] bool: maps whose image has a ground-truth mask. Logits are upsampled to
    (H, W); BCE is averaged over the non-ignored pixels of valid maps, Dice (1 - (2|p g| + 1) /
    (|p| + |g| + 1), per map) over valid maps, so an empty target (query without the class) pushes the
    map to empty. With no valid map the loss is `0 * logits.sum()`: zero, but every enhancer parameter
    still receives a (zero) gradient, which DDP needs. Returns (loss, number of valid maps).
    """
    valid = valid.reshape(-1).bool()
    if logits.shape[0] != valid.shape[0] or target.shape[0] != valid.shape[0]:
        raise ValueError(f"enhancer_loss: logits {tuple(logits.shape)}, target {tuple(target.shape)} and "
                         f"valid {tuple(valid.shape)} disagree on the number of maps")
    zero = logits.float().sum() * 0.0
    count = valid.sum()
    if not bool(count):
        return zero, count
    up = PseudoMaskEnhancer.upsample(logits[valid], tuple(target.shape[-2:]))
    tgt = target[valid]
    keep = (tgt != IGNORE).float()
    gt = torch.where(tgt == IGNORE, torch.zeros_like(tgt), tgt).float()
    bce = F.binary_cross_entropy_with_logits(up, gt, weight=keep, reduction="sum") / keep.sum().clamp_min(1.0)
    p = up.sigmoid() * keep
    inter = (p * gt).flatten(1).sum(1)
    dice = 1.0 - (2.0 * inter + 1.0) / (p.flatten(1).sum(1) + (gt * keep).flatten(1).sum(1) + 1.0)
    return zero + bce + dice_weight * dice.mean(), count


def mixed_step_loss(model: FSCSModel, batch: dict[str, torch.Tensor], cfg: TrainConfig,
                    head: Callable | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one mixed-regime batch (see docs/mixed.md): head loss + enhancer_weight * enhancer loss.

    batch (from TrainEpisodeStream with gt_fraction > 0, batched over B): query_img [B,3,S,S], support_img
    [B,N,K,3,S,S], presence [B,N], support_mask [B,N,K,S,S] (zeros where no GT), support_has_gt [B,N,K],
    query_target [B,N,S,S] (255 where no GT), query_has_gt [B]. The head sees GT support masks where
    available and enhanced pseudo-masks elsewhere; its segmentation target is the GT query mask where the
    query has GT, else the enhanced query pseudo-mask (zeroed for absent classes). The enhancer learns from
    every GT-having support (its way-class mask) and GT-having query whose way class is present (its mask).
    Returns (loss, {"cls", "seg", "enh", "gt_maps"}).
    """
    from fscs.losses import fscs_loss

    presence = batch["presence"]
    support_gt, query_gt = batch["support_has_gt"].bool(), batch["query_has_gt"].bool().reshape(-1)
    out = model.forward_episode(batch["query_img"], batch["support_img"], support_masks=batch["support_mask"],
                                regime="mixed", query_presence=presence, head=head, support_has_gt=support_gt)
    gt_target = batch["query_target"].long()
    if not cfg.loss_ignore_boundary:
        gt_target = torch.where(gt_target == IGNORE, torch.zeros_like(gt_target), gt_target)
    pseudo = out.pseudo_query.long()  # type: ignore[union-attr]
    target = torch.where(query_gt[:, None, None, None], gt_target, pseudo)
    loss, parts = fscs_loss(out.cls_logits.float(), out.mask_logits.float(), presence, target,
                            cls_weight=cfg.cls_weight, fg_weight=cfg.seg_fg_weight)
    b, n, k = support_gt.shape
    s_logits = out.enhancer_support_logits.flatten(0, 2)  # type: ignore[union-attr]
    q_logits = out.enhancer_query_logits.flatten(0, 2)  # type: ignore[union-attr]
    s_target = batch["support_mask"].flatten(0, 2).long()
    q_target = batch["query_target"].long().repeat_interleave(k, dim=1).flatten(0, 1)
    # query maps of absent classes are left out: their pseudo-mask is zeroed by the image-level label anyway,
    # and training on their empty targets teaches the enhancer to shrink the masks of present classes too
    present = presence.bool().repeat_interleave(k, dim=1)  # [B, N*K]
    q_valid = (query_gt[:, None] & present).reshape(-1)
    enh, count = enhancer_loss(torch.cat([s_logits, q_logits]), torch.cat([s_target, q_target]),
                               torch.cat([support_gt.reshape(-1), q_valid]))
    total = loss + cfg.enhancer_weight * enh
    return total, {**parts, "enh": enh.detach(), "gt_maps": count.float()}

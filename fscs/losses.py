"""FS-CS training loss: weighted 2-class classification CE plus pixel-averaged 2-class segmentation CE, and
the loss of a batch of episodes in each supervision regime."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fscs.errors import FSCSError

if TYPE_CHECKING:
    from fscs.config import TrainConfig
    from fscs.model.fscs_model import FSCSModel

logger = logging.getLogger(__name__)

CHANCE_CE = math.log(2)
"""Classification CE of a 0.5 presence probability: where an untrained presence classifier sits."""
CHANCE_MARGIN = 0.01
"""A mean CE(cls) within this of ln 2 is no better than a constant guess (0.688 at a 45/55 label prior)."""


def at_chance(cls_ce: float, margin: float = CHANCE_MARGIN) -> bool:
    """Whether a mean presence CE is indistinguishable from chance (|CE - ln 2| <= margin)."""
    return abs(float(cls_ce) - CHANCE_CE) <= margin


def fscs_loss(
    cls_logits: torch.Tensor,
    seg_logits: torch.Tensor,
    presence: torch.Tensor,
    seg_target: torch.Tensor,
    cls_weight: float = 0.1,
    seg_weight: float = 1.0,
    ignore_index: int = 255,
    fg_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CST loss ``cls_weight * CE(cls) + seg_weight * CE(seg)``; every (episode, way) is one 1-way pair.

    cls_logits [B, N, 2] (absent, present); seg_logits [B, N, 2, H, W];
    presence [B, N] (0/1, any dtype); seg_target [B, N, H, W] (0/1, ``ignore_index`` ignored).
    Leading dims are flattened (any leading shape works if both logits share it).
    The classification CE is averaged over the B*N pairs, the segmentation CE over all non-ignored
    pixels of all pairs (0 with a live graph when every pixel is ignored). fg_weight != 1 weights the
    foreground class of the segmentation CE (weighted mean: sum w_t * CE / sum w_t); 1 = the reference.
    Returns (loss scalar, {"cls": detached CE, "seg": detached CE}).
    """
    lead = tuple(cls_logits.shape[:-1])
    if cls_logits.shape[-1:] != (2,) or seg_logits.dim() < 3 or seg_logits.shape[-3] != 2:
        raise FSCSError(
            f"losses.fscs_loss: need cls_logits [B, N, 2] and seg_logits [B, N, 2, H, W], "
            f"got {tuple(cls_logits.shape)} and {tuple(seg_logits.shape)}"
        )
    hw = tuple(seg_logits.shape[-2:])
    shapes_ok = (
        tuple(seg_logits.shape[:-3]) == lead
        and tuple(presence.shape) == lead
        and tuple(seg_target.shape) == lead + hw
    )
    if not shapes_ok:
        raise FSCSError(
            f"losses.fscs_loss: shapes disagree: cls {tuple(cls_logits.shape)}, "
            f"seg {tuple(seg_logits.shape)}, presence {tuple(presence.shape)} (want {lead}), "
            f"seg_target {tuple(seg_target.shape)} (want {lead + hw})"
        )
    pres = presence.reshape(-1).long()
    if pres.numel() and (int(pres.min()) < 0 or int(pres.max()) > 1):
        raise FSCSError("losses.fscs_loss: presence must hold 0/1 values")
    tgt = seg_target.reshape(-1, *hw).long()
    valid = tgt != ignore_index
    if bool(((tgt[valid] < 0) | (tgt[valid] > 1)).any()):
        raise FSCSError(f"losses.fscs_loss: seg_target must hold 0/1 (or {ignore_index} = ignore)")

    cls_loss = F.cross_entropy(cls_logits.reshape(-1, 2), pres)
    seg_in = seg_logits.reshape(-1, 2, *hw)
    if bool(valid.any()):
        weight = None if fg_weight == 1.0 else seg_in.new_tensor([1.0, float(fg_weight)])
        seg_loss = F.cross_entropy(seg_in, tgt, weight=weight, ignore_index=ignore_index)
    else:
        seg_loss = seg_in.sum() * 0.0
    loss = cls_weight * cls_loss + seg_weight * seg_loss
    return loss, {"cls": cls_loss.detach(), "seg": seg_loss.detach()}


PIXEL_KEYS = frozenset({"support_mask", "query_target", "support_has_gt", "query_has_gt"})
"""Batch entries that carry pixel labels (the weak regime must never see them)."""


def batch_loss(model: FSCSModel, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               head: Callable | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of one batch of episodes in the regime cfg.regime (`head`: the engine's wrapped head).

    batch (TrainEpisodeStream, batched over B): query_img [B,3,S,S], support_img [B,N,K,3,S,S],
    presence [B,N]; full regime also support_mask [B,N,K,S,S], query_target [B,N,S,S] (255 = boundary);
    mixed: see fscs.model.enhancer.mixed_step_loss. Weak: the segmentation target is the query's pseudo-mask
    from the frozen backbone; full: its GT (boundary pixels ignored, or background when
    cfg.loss_ignore_boundary is off). Returns (loss, detached terms {"cls", "seg", ...}).
    """
    from fscs.model.enhancer import mixed_step_loss

    if cfg.regime == "mixed":
        return mixed_step_loss(model, batch, cfg, head=head)
    pixel_keys = sorted(PIXEL_KEYS & batch.keys())
    if cfg.regime == "weak" and pixel_keys:
        raise FSCSError(f"train.regime=weak got pixel labels {pixel_keys} in its batch; the weak regime "
                        "uses image-level labels only (build the stream with use_masks=False, gt_fraction=0)")
    full = cfg.regime == "full"
    presence = batch["presence"]
    out = model.forward_episode(batch["query_img"], batch["support_img"],
                                support_masks=batch.get("support_mask") if full else None,
                                regime=cfg.regime, query_presence=presence, head=head)
    if full:
        target = batch["query_target"]
        if not cfg.loss_ignore_boundary:
            target = torch.where(target == 255, torch.zeros_like(target), target)
    else:
        target = out.pseudo_query.long()  # type: ignore[union-attr]
    return fscs_loss(out.cls_logits.float(), out.mask_logits.float(), presence, target,
                     cls_weight=cfg.cls_weight, fg_weight=cfg.seg_fg_weight)

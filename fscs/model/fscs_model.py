"""FSCSModel: frozen backbone + pseudo-mask distiller + CST head; the public model API."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fscs.bench.metrics import predict_from_probs
from fscs.errors import FSCSError
from fscs.model.backbone import BACKBONES, BackboneOutput, FrozenBackbone
from fscs.model.cst import CSTHead, convert_reference_state_dict, correlation
from fscs.model.distill import PseudoMaskDistiller
from fscs.safe_load import load_untrusted

logger = logging.getLogger(__name__)

REGIMES = ("weak", "full")


@dataclass
class EpisodeOutput:
    """What one batch of episodes produces.

    cls_logits: [B, N, 2] (absent, present); for K > 1 these are log mean-over-shots probabilities.
    mask_logits: [B, N, 2, H, W] (background, foreground) at the requested output size.
    pseudo_support: [B, N, K, Hs, Ws] {0,1} pseudo-masks used for the supports (weak regime), else None.
    pseudo_query: [B, N, Hs, Ws] {0,1} query pseudo-masks (the weak segmentation target), else None.
    """

    cls_logits: torch.Tensor
    mask_logits: torch.Tensor
    pseudo_support: torch.Tensor | None = None
    pseudo_query: torch.Tensor | None = None


class FSCSModel(nn.Module):
    """Frozen ViT features -> correlation tokens -> CST head, for N-way K-shot episodes.

    Each distinct image of an episode batch passes through the backbone exactly once: the query's
    features are shared by every way and shot.
    """

    def __init__(self, backbone: FrozenBackbone, head: CSTHead, distiller: PseudoMaskDistiller):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.distiller = distiller

    @classmethod
    def build(
        cls,
        backbone: str = "vit_small_patch8_224.dino",
        weights: str | os.PathLike | None = None,
        image_size: int | None = None,
        mask_rule: str = "reference",
        mask_threshold: float = 0.4,
    ) -> "FSCSModel":
        """Build from a registry name and an optional local weights file (None = random init)."""
        if backbone not in BACKBONES:
            raise FSCSError(f"unknown backbone '{backbone}'; choose one of: {', '.join(sorted(BACKBONES))}")
        size = image_size or BACKBONES[backbone].default_image_size
        bb = FrozenBackbone(backbone, None if weights is None else str(weights), size)
        head = CSTHead(in_channels=bb.num_layers * bb.num_heads)
        return cls(bb, head, PseudoMaskDistiller(rule=mask_rule, threshold=mask_threshold))

    @property
    def image_size(self) -> int:
        return self.backbone.identity["image_size"]

    def features(self, images: torch.Tensor) -> BackboneOutput:
        """images [M, 3, S, S] -> frozen backbone output (tokens [M, L, 1+T, D], q/k [M, h, 1+T, dh])."""
        return self.backbone(images)

    def forward_episode(
        self,
        query: torch.Tensor,
        support: torch.Tensor,
        support_masks: torch.Tensor | None = None,
        regime: str = "weak",
        query_presence: torch.Tensor | None = None,
        out_size: tuple[int, int] | None = None,
        head: Callable | None = None,
    ) -> EpisodeOutput:
        """Run a batch of N-way K-shot episodes.

        query [B, 3, S, S]; support [B, N, K, 3, S, S]; support_masks [B, N, K, S, S] {0,1} (full regime
        only; the weak regime refuses pixel labels); query_presence [B, N] image-level labels used to zero
        the query pseudo-masks of absent classes (weak training); out_size defaults to (S, S);
        head: the (possibly DDP-wrapped) head to call, default self.head.
        """
        if regime not in REGIMES:
            raise FSCSError(f"unknown regime '{regime}'; use one of: {', '.join(REGIMES)}")
        if regime == "weak" and support_masks is not None:
            raise ValueError("the weak regime uses no pixel labels: support_masks must be None")
        if regime == "full" and support_masks is None:
            raise ValueError("the full regime needs support_masks [B, N, K, S, S]")
        b, n, k = support.shape[:3]
        size = tuple(query.shape[-2:])
        out_size = tuple(out_size or size)
        feats = self.features(torch.cat([query, support.flatten(0, 2)], dim=0))
        grid = self.backbone.grid
        q_tok, s_tok = feats.tokens[:b], feats.tokens[b:]

        pseudo_support = pseudo_query = None
        if regime == "weak":
            pseudo_support = self.distiller.support_masks(feats.q[b:], feats.k[b:], grid, size)
            pseudo_support = pseudo_support.view(b, n, k, *size)
            masks = pseudo_support.flatten(0, 2)
            # support CLS query of every shot against its episode's query keys: [B*N*K, H, W]
            k_query = feats.k[:b].repeat_interleave(n * k, dim=0)
            present = None if query_presence is None else query_presence.repeat_interleave(k, dim=1).flatten()
            per_shot = self.distiller.query_masks(feats.q[b:], k_query, grid, size, present)
            pseudo_query = (per_shot.view(b, n, k, *size).mean(dim=2) >= 0.5).to(per_shot.dtype)
        else:
            masks = support_masks.flatten(0, 2).to(q_tok.dtype)  # type: ignore[union-attr]

        # the query's tokens are shared (expand, no copy) by all N*K (way, shot) pairs
        q_rep = q_tok.unsqueeze(1).expand(b, n * k, *q_tok.shape[1:]).flatten(0, 1)
        corr = correlation(q_rep, s_tok, self.backbone.num_heads, grid, grid)
        cls_logits, seg_logits = (head or self.head)(corr, masks, grid, out_size)
        cls_logits = cls_logits.view(b, n, k, 2)
        seg_logits = seg_logits.view(b, n, k, 2, *out_size)
        if k == 1:
            cls_out, seg_out = cls_logits[:, :, 0], seg_logits[:, :, 0]
        else:  # average per-shot probabilities, return their log so softmax gives the mean back
            cls_out = cls_logits.float().softmax(-1).mean(2).clamp_min(1e-12).log()
            seg_out = seg_logits.float().softmax(3).mean(2).clamp_min(1e-12).log()
        return EpisodeOutput(cls_out, seg_out, pseudo_support, pseudo_query)

    @torch.no_grad()
    def predict(self, out: EpisodeOutput, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """Decisions from an EpisodeOutput: presence [B, N] bool and label map [B, H, W] (0 bg, k = way k)."""
        presence_p = out.cls_logits.float().softmax(-1)[..., 1]
        fg = out.mask_logits.float().softmax(2)[:, :, 1]  # [B, N, H, W]
        return predict_from_probs(presence_p, fg, threshold, threshold)

    def load_reference_checkpoint(self, path: str | os.PathLike) -> None:
        """Load the authors' released Lightning checkpoint (head keys `learner.*`) without running its pickle code."""
        ckpt = load_untrusted(Path(path))
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(sd, dict):
            raise FSCSError(f"'{path}' holds no state_dict; pass a CST Lightning checkpoint (.ckpt)")
        head_sd = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
        self.head.load_state_dict(convert_reference_state_dict(head_sd), strict=True)
        logger.info("loaded reference head from %s (%d backbone keys left to the frozen backbone)",
                    path, len(sd) - len(head_sd))


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., C, h, w] -> [..., C, H, W], bilinear with align_corners=True (as the reference)."""
    lead = logits.shape[:-3]
    flat = logits.reshape(-1, *logits.shape[-3:])
    up = F.interpolate(flat.float(), size=size, mode="bilinear", align_corners=True)
    return up.view(*lead, *up.shape[-3:])

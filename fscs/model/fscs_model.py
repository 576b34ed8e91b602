"""FSCSModel: frozen backbone + pseudo-mask distiller (+ enhancer) + CST head; the public model API."""
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
from fscs.model.correlation import correlation
from fscs.model.cst import CSTHead, convert_reference_state_dict
from fscs.model.distill import PseudoMaskDistiller, cls_key_cosine_heads
from fscs.model.enhancer import PseudoMaskEnhancer
from fscs.safe_load import load_untrusted

logger = logging.getLogger(__name__)

REGIMES = ("weak", "full", "mixed")


@dataclass
class EpisodeOutput:
    """What one batch of episodes produces.

    cls_logits: [B, N, 2] (absent, present); for K > 1 these are log mean-over-shots probabilities.
    mask_logits: [B, N, 2, H, W] (background, foreground) at the requested output size.
    pseudo_support: [B, N, K, Hs, Ws] {0,1} pseudo-masks of the supports (weak: attention rule; mixed:
        enhanced, for every shot, including those whose GT mask was used), else None.
    pseudo_query: [B, N, Hs, Ws] {0,1} query pseudo-masks (the weak/mixed segmentation target), else None.
    enhancer_support_logits / enhancer_query_logits: [B, N, K, gh, gw] enhancer logits on the token grid of
        each support's own map / each shot's support-CLS-vs-query map (mixed regime only; carry gradients).
    shot_mask_logits: [B, N, K, 2, H, W] the per-shot mask logits behind mask_logits (K > 1 only), for callers
        that upsample each shot before averaging probabilities (the reference's evaluation order).
    """

    cls_logits: torch.Tensor
    mask_logits: torch.Tensor
    pseudo_support: torch.Tensor | None = None
    pseudo_query: torch.Tensor | None = None
    enhancer_support_logits: torch.Tensor | None = None
    enhancer_query_logits: torch.Tensor | None = None
    shot_mask_logits: torch.Tensor | None = None


@dataclass
class EpisodeFeatures:
    """Frozen features of a batch of B episodes (N ways, K shots), input size S x S.

    corr: [B*N*K, heads*L, Tq, 145] correlation tokens; support_q / support_k: [B*N*K, h, 1+T, dh]
    last-block query/key vectors of the supports; query_k: [B, h, 1+T, dh] of the queries.
    """

    batch: int
    way: int
    shot: int
    size: tuple[int, int]
    corr: torch.Tensor
    support_q: torch.Tensor
    support_k: torch.Tensor
    query_k: torch.Tensor


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
        enhancer: bool = False,
        enhancer_channels: int = 128,
    ) -> "FSCSModel":
        """Build from a registry name and an optional local weights file (None = random init).

        enhancer=True attaches a PseudoMaskEnhancer (needed by the mixed regime) inside the head.
        """
        if backbone not in BACKBONES:
            raise FSCSError(f"unknown backbone '{backbone}'; choose one of: {', '.join(sorted(BACKBONES))}")
        size = image_size or BACKBONES[backbone].default_image_size
        bb = FrozenBackbone(backbone, None if weights is None else str(weights), size)
        head = CSTHead(in_channels=bb.num_layers * bb.num_heads)
        model = cls(bb, head, PseudoMaskDistiller(rule=mask_rule, threshold=mask_threshold))
        if enhancer:
            model.attach_enhancer(enhancer_channels)
        return model

    def attach_enhancer(self, channels: int = 128) -> PseudoMaskEnhancer:
        """Register a PseudoMaskEnhancer as `head.enhancer` (idempotent for the same width).

        Living inside the head module tree, its parameters are trained, DDP-wrapped and checkpointed with
        the head (`head.state_dict()` gains `enhancer.*` keys). Call before building the training engine.
        """
        current = self.enhancer
        if current is not None:
            if current.channels != channels:
                raise FSCSError(f"the head already has an enhancer of width {current.channels}, "
                                f"not {channels}")
            return current
        device = next(self.head.parameters()).device
        enh = PseudoMaskEnhancer(self.backbone.num_heads, channels)
        enh = enh.to(device)
        self.head.add_module("enhancer", enh)
        return enh

    @property
    def enhancer(self) -> PseudoMaskEnhancer | None:
        """The head's pseudo-mask enhancer, or None (weak/full models)."""
        enh = getattr(self.head, "enhancer", None)
        return enh if isinstance(enh, PseudoMaskEnhancer) else None

    @property
    def image_size(self) -> int:
        return self.backbone.identity["image_size"]

    @property
    def mask_size(self) -> tuple[int, int]:
        """(2h, 2w) for the h x w token grid: the resolution of the head's own mask logits (100 x 100 for
        ViT-S/8 at 400 px), before any upsampling."""
        gh, gw = self.backbone.grid
        return 2 * gh, 2 * gw

    def features(self, images: torch.Tensor) -> BackboneOutput:
        """images [M, 3, S, S] -> frozen backbone output (tokens [M, L, 1+T, D], q/k [M, h, 1+T, dh])."""
        return self.backbone(images)

    @torch.no_grad()
    def encode_episode(self, query: torch.Tensor, support: torch.Tensor) -> EpisodeFeatures:
        """The frozen part of an episode batch, computed once and reusable by any head, regime or rule.

        query [B, 3, S, S]; support [B, N, K, 3, S, S]. Every distinct image passes the backbone once: the
        query's tokens are shared by all N*K (way, shot) pairs through a broadcast view, never recomputed.
        """
        size = self.image_size
        if query.dim() != 4 or tuple(query.shape[1:]) != (3, size, size):
            raise ValueError(f"query must be [B, 3, {size}, {size}] (this model's image_size), got "
                             f"{tuple(query.shape)}")
        if (support.dim() != 6 or support.shape[0] != query.shape[0]
                or tuple(support.shape[3:]) != (3, size, size)):
            raise ValueError(f"support must be [B={query.shape[0]}, N, K, 3, {size}, {size}] (way, shot), "
                             f"got {tuple(support.shape)}")
        b, n, k = support.shape[:3]
        feats = self.features(torch.cat([query, support.flatten(0, 2)], dim=0))
        grid = self.backbone.grid
        q_tok, s_tok = feats.tokens[:b], feats.tokens[b:]
        # support j is paired with query j // (N*K): the query's tokens are never copied per way or shot
        corr = correlation(q_tok, s_tok, self.backbone.num_heads, grid, grid)
        return EpisodeFeatures(b, n, k, tuple(query.shape[-2:]), corr, feats.q[b:], feats.k[b:], feats.k[:b])

    def pseudo_masks(
        self, feats: EpisodeFeatures, query_presence: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention pseudo-masks: support [B, N, K, S, S] (own CLS vs own keys) and query [B, N, S, S]
        (each shot's support CLS vs the query keys, strict majority over shots, zeroed where
        query_presence == 0)."""
        b, n, k, size, grid = feats.batch, feats.way, feats.shot, feats.size, self.backbone.grid
        support = self.distiller.support_masks(feats.support_q, feats.support_k, grid, size).view(b, n, k, *size)
        k_query = feats.query_k if n * k == 1 else feats.query_k.repeat_interleave(n * k, dim=0)
        present = None if query_presence is None else query_presence.repeat_interleave(k, dim=1).flatten()
        per_shot = self.distiller.query_masks(feats.support_q, k_query, grid, size, present)
        if k == 1:
            return support, per_shot.view(b, n, *size)
        # strict majority of the shots (as the mixed path): with K = 2 both shots must agree
        query = (per_shot.view(b, n, k, *size).mean(dim=2) > 0.5).to(per_shot.dtype)
        return support, query

    def enhancer_logits(self, q: torch.Tensor, k_img: torch.Tensor) -> torch.Tensor:
        """Enhancer grid logits [M, gh, gw] for CLS queries q [M, h, 1+T', dh] (or [M, h, dh]) against image
        keys k_img [M, h, 1+T, dh] (or [M, h, T, dh]) on the backbone grid; carries gradients when enabled."""
        enh = self.enhancer
        if enh is None:
            raise FSCSError("the mixed regime needs a pseudo-mask enhancer: build the model with "
                            "FSCSModel.build(..., enhancer=True) (train.regime=mixed does this)")
        grid = self.backbone.grid
        maps = cls_key_cosine_heads(q, k_img, grid)  # [M, h, gh, gw]
        rule = self.distiller.masks_from_cosine(maps.mean(dim=1), q, k_img, grid, grid)  # on the grid
        return enh(maps, rule)

    def enhanced_masks(
        self, feats: EpisodeFeatures, query_presence: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Enhanced pseudo-masks and the enhancer's grid logits (the logits carry gradients when enabled).

        Returns support masks [B, N, K, S, S] {0,1} (sigmoid > 0.5 of the enhancer on the support's own
        per-head CLS-key maps; a support image always shows its class, so an empty enhanced mask falls back
        to the rule's mask), query masks [B, N, S, S] {0,1} (mean over shots of the probabilities on the
        support-CLS-vs-query maps > 0.5, zeroed where query_presence == 0), and support / query logits
        [B, N, K, gh, gw].
        """
        b, n, k, size, grid = feats.batch, feats.way, feats.shot, feats.size, self.backbone.grid
        k_query = feats.query_k.repeat_interleave(n * k, dim=0)
        logits = self.enhancer_logits(torch.cat([feats.support_q, feats.support_q]),
                                      torch.cat([feats.support_k, k_query]))
        enh: PseudoMaskEnhancer = self.enhancer  # type: ignore[assignment]
        s_logits, q_logits = logits.view(2, b, n, k, *grid).unbind(0)
        support = (enh.probs(s_logits.flatten(0, 2), size) > 0.5).float()
        empty = support.flatten(1).amax(1) == 0
        if bool(empty.any()):
            rule = self.distiller.support_masks(feats.support_q[empty], feats.support_k[empty], grid, size)
            support[empty] = rule.to(support.dtype)
        support = support.view(b, n, k, *size)
        query = (enh.probs(q_logits.flatten(0, 2), size).view(b, n, k, *size).mean(2) > 0.5).float()
        if query_presence is not None:
            query = query * query_presence.to(query.device).bool()[..., None, None].to(query.dtype)
        return support, query, s_logits, q_logits

    def decode_episode(
        self,
        feats: EpisodeFeatures,
        support_masks: torch.Tensor | None = None,
        regime: str = "weak",
        query_presence: torch.Tensor | None = None,
        out_size: tuple[int, int] | None = None,
        head: Callable | None = None,
        support_has_gt: torch.Tensor | None = None,
    ) -> EpisodeOutput:
        """Head (and pseudo-masks) on encoded episodes; see forward_episode for the arguments."""
        if regime not in REGIMES:
            raise FSCSError(f"unknown regime '{regime}'; use one of: {', '.join(REGIMES)}")
        if regime == "weak" and (support_masks is not None or support_has_gt is not None):
            raise ValueError("the weak regime uses no pixel labels: support_masks/support_has_gt must be "
                             "None")
        if regime == "full" and support_masks is None:
            raise ValueError("the full regime needs support_masks [B, N, K, S, S]")
        if regime == "mixed" and (support_masks is None) != (support_has_gt is None):
            raise ValueError("the mixed regime takes support_masks [B, N, K, S, S] and support_has_gt "
                             "[B, N, K] together (or neither: enhanced pseudo-masks for every support)")
        b, n, k = feats.batch, feats.way, feats.shot
        want = (b, n, k, *feats.size)
        if support_masks is not None and tuple(support_masks.shape) != want:
            raise ValueError(f"support_masks must be [B, N, K, S, S] = {list(want)}, got "
                             f"{tuple(support_masks.shape)}")
        if query_presence is not None and tuple(query_presence.shape) != (b, n):
            raise ValueError(f"query_presence must be [B, N] = [{b}, {n}], got {tuple(query_presence.shape)}")
        out_size = tuple(out_size or feats.size)
        pseudo_support = pseudo_query = s_logits = q_logits = None
        if regime == "weak":
            pseudo_support, pseudo_query = self.pseudo_masks(feats, query_presence)
            masks = pseudo_support.flatten(0, 2)
        elif regime == "mixed":
            pseudo_support, pseudo_query, s_logits, q_logits = self.enhanced_masks(feats, query_presence)
            masks = pseudo_support
            if support_masks is not None:
                if tuple(support_has_gt.shape) != (b, n, k):  # type: ignore[union-attr]
                    raise ValueError(f"support_has_gt must be [{b}, {n}, {k}], "
                                     f"got {tuple(support_has_gt.shape)}")
                has_gt = support_has_gt.to(masks.device).bool()[..., None, None]  # type: ignore[union-attr]
                masks = torch.where(has_gt, support_masks.to(masks.dtype), masks)
            masks = masks.flatten(0, 2).to(feats.corr.dtype)
        else:
            masks = support_masks.flatten(0, 2).to(feats.corr.dtype)  # type: ignore[union-attr]
        cls_logits, seg_logits = (head or self.head)(feats.corr, masks, self.backbone.grid, out_size)
        cls_logits = cls_logits.view(b, n, k, 2)
        seg_logits = seg_logits.view(b, n, k, 2, *out_size)
        if k == 1:
            cls_out, seg_out = cls_logits[:, :, 0], seg_logits[:, :, 0]
        else:  # average per-shot probabilities, return their log so softmax gives the mean back
            cls_out = cls_logits.float().softmax(-1).mean(2).clamp_min(1e-12).log()
            seg_out = seg_logits.float().softmax(3).mean(2).clamp_min(1e-12).log()
        return EpisodeOutput(cls_out, seg_out, pseudo_support, pseudo_query, s_logits, q_logits,
                             seg_logits if k > 1 else None)

    def forward_episode(
        self,
        query: torch.Tensor,
        support: torch.Tensor,
        support_masks: torch.Tensor | None = None,
        regime: str = "weak",
        query_presence: torch.Tensor | None = None,
        out_size: tuple[int, int] | None = None,
        head: Callable | None = None,
        support_has_gt: torch.Tensor | None = None,
    ) -> EpisodeOutput:
        """Run a batch of N-way K-shot episodes.

        query [B, 3, S, S]; support [B, N, K, 3, S, S]; support_masks [B, N, K, S, S] {0,1} (full: required;
        mixed: optional, used where support_has_gt [B, N, K] is true, enhanced pseudo-masks elsewhere; weak
        refuses pixel labels); query_presence [B, N] image-level labels used to zero the query pseudo-masks
        of absent classes (weak/mixed training); out_size defaults to (S, S);
        head: the (possibly DDP-wrapped) head to call, default self.head (the enhancer is always called
        as self.head.enhancer: its gradients are still reduced by a DDP wrapper of the head).
        """
        feats = self.encode_episode(query, support)
        return self.decode_episode(feats, support_masks, regime, query_presence, out_size, head,
                                   support_has_gt)

    @torch.no_grad()
    def predict(self, out: EpisodeOutput, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """Decisions from an EpisodeOutput: presence [B, N] bool and label map [B, H, W] (0 bg, k = way k)."""
        presence_p = out.cls_logits.float().softmax(-1)[..., 1]
        fg = out.mask_logits.float().softmax(2)[:, :, 1]  # [B, N, H, W]
        return predict_from_probs(presence_p, fg, threshold, threshold)

    def load_reference_checkpoint(self, path: str | os.PathLike) -> None:
        """Load the authors' released Lightning checkpoint (head keys `learner.*`) without running its pickle code."""
        ckpt = load_untrusted(Path(path))
        if isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("fscs-"):
            raise FSCSError(f"'{path}' is an fscs checkpoint ({ckpt['format']}), not the authors' CST "
                            "release; evaluate an fscs train run with --run-dir RUN")
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(sd, dict):
            raise FSCSError(f"'{path}' holds no state_dict; pass a CST Lightning checkpoint (.ckpt)")
        head_sd = convert_reference_state_dict({k: v for k, v in sd.items() if not k.startswith("backbone.")})
        mine = self.head.state_dict()
        wrong = [k for k, v in head_sd.items() if tuple(v.shape) != tuple(mine[k].shape)]
        if wrong:
            k = wrong[0]
            raise FSCSError(f"'{path}': head tensor {k} is {tuple(head_sd[k].shape)} but this backbone's head "
                            f"needs {tuple(mine[k].shape)} (in_channels={self.head.in_channels} = layers x heads "
                            f"of {self.backbone.spec.name}); the reference heads take 72 channels: use "
                            "model.backbone=vit_small_patch8_224.dino (or another 12-layer 6-head ViT)")
        self.head.load_state_dict(head_sd, strict=True)
        logger.info("loaded reference head from %s (%d backbone keys left to the frozen backbone)",
                    path, len(sd) - len(head_sd))


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., C, h, w] -> [..., C, H, W], bilinear with align_corners=True (as the reference)."""
    lead = logits.shape[:-3]
    flat = logits.reshape(-1, *logits.shape[-3:])
    up = F.interpolate(flat.float(), size=size, mode="bilinear", align_corners=True)
    return up.view(*lead, *up.shape[-3:])

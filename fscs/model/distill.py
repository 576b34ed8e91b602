"""Attention pseudo-masks from the last block's support-CLS query and image keys (no N x N attention)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

Size = int | tuple[int, int]


@dataclass(frozen=True)
class RuleInputs:
    """What a pseudo-mask rule may look at.

    cos:   [B, gh, gw] head-mean cosine of the CLS query with the image keys, in [-1, 1].
    q_cls: [B, heads, dh] CLS query vectors (None when only `cos` was given).
    k:     [B, heads, T, dh] image keys, T = gh*gw (None when only `cos` was given).
    """

    cos: torch.Tensor
    q_cls: torch.Tensor | None = None
    k: torch.Tensor | None = None


# A rule maps (inputs, out_size (H, W), threshold) -> binary float mask [B, H, W].
RuleFn = Callable[[RuleInputs, tuple[int, int], float], torch.Tensor]


def _pair(size: Size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def upsample_map(cos: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear (align_corners=True) upsampling of maps [B, gh, gw] -> [B, H, W]."""
    return F.interpolate(cos[:, None], size=_pair(size), mode="bilinear", align_corners=True)[:, 0]


def otsu_threshold(values: torch.Tensor) -> torch.Tensor:
    """Exact per-row Otsu threshold of values [B, n] -> [B].

    Maximises the between-class variance over every split of the sorted values (the limit of the
    histogram version with infinitely fine bins); the threshold is the midpoint of the two values at
    the best split. Rows with a single distinct value get +inf (nothing is above it).
    """
    ordered, _ = values.float().sort(dim=1)
    n = ordered.shape[1]
    if n < 2:
        return torch.full(ordered.shape[:1], float("inf"), device=values.device)
    cumsum = ordered.cumsum(dim=1)[:, :-1]  # sum of the i lowest values, i = 1..n-1
    count = torch.arange(1, n, device=values.device, dtype=ordered.dtype)
    mean_low = cumsum / count
    mean_high = (ordered.sum(dim=1, keepdim=True) - cumsum) / (n - count)
    between = (count / n) * (1 - count / n) * (mean_low - mean_high) ** 2
    valid = ordered[:, 1:] > ordered[:, :-1]  # only splits between distinct values are thresholds
    between = torch.where(valid, between, torch.full_like(between, -1.0))
    best = between.argmax(dim=1, keepdim=True)
    threshold = (ordered.gather(1, best) + ordered.gather(1, best + 1)).squeeze(1) / 2
    return torch.where(valid.any(dim=1), threshold, torch.full_like(threshold, float("inf")))


def _rule_reference(inputs: RuleInputs, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """CST: upsample, map [-1, 1] -> [0, 1] by (x + 1) / 2, foreground where > threshold."""
    return ((upsample_map(inputs.cos, size) + 1) / 2 > threshold).float()


def _rule_otsu(inputs: RuleInputs, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Per-image Otsu threshold of the token-grid map, applied to the upsampled map (`threshold` unused)."""
    cut = otsu_threshold(inputs.cos.flatten(1))
    return (upsample_map(inputs.cos, size) > cut[:, None, None]).float()


def border_majority(grid_masks: torch.Tensor) -> torch.Tensor:
    """[B, gh, gw] {0,1} token masks -> [B] bool: True where more than half of the border tokens are foreground.

    Objects rarely fill most of the image border, backgrounds nearly always do: a mask that holds most of the
    border has the wrong polarity.
    """
    border = torch.ones_like(grid_masks[0], dtype=torch.bool)
    border[1:-1, 1:-1] = False
    return grid_masks[:, border].float().mean(dim=1) > 0.5


def _rule_otsu_border(inputs: RuleInputs, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Per-image Otsu split of the head-mean map; the side holding most of the image border is background.

    Polarity-aware: works whether the CLS query is aligned with the object keys (DINO) or with the
    background keys (the failure mode of small self-distilled ViTs). `threshold` unused.
    """
    cos = inputs.cos
    cut = otsu_threshold(cos.flatten(1))[:, None, None]
    flip = border_majority((cos > cut).float())
    return ((upsample_map(cos, size) > cut) ^ flip[:, None, None]).float()


def key_two_means(keys: torch.Tensor, cos: torch.Tensor, iters: int = 10) -> torch.Tensor:
    """Per-image 2-means (cosine) of the image keys, seeded by the CLS map: keys [B, h, T, dh], cos [B, gh, gw]
    -> [B, gh, gw] {0,1}, 1 = the cluster with the higher mean CLS cosine.

    Seeds: the keys of the tokens with the highest and the lowest cosine; heads are L2-normalised and
    concatenated, so every head counts equally.
    """
    b, h, t, d = keys.shape
    x = F.normalize(F.normalize(keys.float(), dim=-1).permute(0, 2, 1, 3).reshape(b, t, h * d), dim=-1)
    flat = cos.reshape(b, t)
    centres = torch.stack([x[torch.arange(b), flat.argmax(1)], x[torch.arange(b), flat.argmin(1)]], dim=1)
    for _ in range(iters):
        assign = (x @ centres.transpose(1, 2)).argmax(dim=-1)  # [B, T] 0 = CLS-like cluster
        onehot = F.one_hot(assign, 2).float()  # [B, T, 2]
        sums = onehot.transpose(1, 2) @ x  # [B, 2, D]
        empty = onehot.sum(1)[..., None] == 0
        centres = torch.where(empty, centres, F.normalize(sums, dim=-1))
    first = (assign == 0).float()
    n_first = first.sum(1).clamp_min(1)
    n_second = (1 - first).sum(1).clamp_min(1)
    first_is_higher = (flat * first).sum(1) / n_first >= (flat * (1 - first)).sum(1) / n_second
    return torch.where(first_is_higher[:, None], first, 1 - first).reshape(cos.shape)


def _rule_keys_border(inputs: RuleInputs, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Key clustering: 2-means of the image keys (CLS-seeded), border-majority cluster = background.

    Adaptive per image and independent of the CLS map's calibration; the token mask is upsampled
    bilinearly (align_corners=True) and cut at 0.5. Needs the keys (PseudoMaskDistiller passes them).
    """
    if inputs.k is None:
        raise FSCSError("pseudo-mask rule 'keys_border' needs the image keys; call it through "
                        "PseudoMaskDistiller or pass k= to pseudo_mask")
    grid = tuple(inputs.cos.shape[-2:])
    fg = key_two_means(_image_keys(inputs.k, grid), inputs.cos)
    fg = torch.where(border_majority(fg)[:, None, None], 1 - fg, fg)
    return (upsample_map(fg, size) > 0.5).float()


# Pseudo-mask rules by name; add a rule by adding a RuleFn here.
MASK_RULES: dict[str, RuleFn] = {
    "reference": _rule_reference,
    "otsu": _rule_otsu,
    "otsu_border": _rule_otsu_border,
    "keys_border": _rule_keys_border,
}


def _rule(name: str) -> RuleFn:
    if name not in MASK_RULES:
        raise FSCSError(f"unknown pseudo-mask rule '{name}'; choose one of: {', '.join(MASK_RULES)}")
    return MASK_RULES[name]


def _cls_query(q: torch.Tensor) -> torch.Tensor:
    """[B, h, 1+T, dh] (CLS first) or [B, h, dh] -> CLS query [B, h, dh]."""
    if q.ndim == 4:
        return q[:, :, 0]
    if q.ndim == 3:
        return q
    raise ValueError(f"expected CLS queries [B, h, dh] or [B, h, 1+T, dh], got {tuple(q.shape)}")


def _image_keys(k: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Keys [B, h, 1+T, dh] (CLS first) or [B, h, T, dh] -> image keys [B, h, T, dh], T = gh*gw."""
    tokens = grid[0] * grid[1]
    if k.ndim == 4 and k.shape[2] == tokens + 1:
        return k[:, :, 1:]
    if k.ndim == 4 and k.shape[2] == tokens:
        return k
    raise ValueError(f"expected keys [B, h, {tokens} or {tokens + 1}, dh] for grid {grid}, "
                     f"got {tuple(k.shape)}")


def cls_key_cosine_heads(q_cls: torch.Tensor, k: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-head cosine of CLS queries with image keys: q_cls [B, h, dh], k [B, h, T, dh] -> [B, h, gh, gw].

    Only the CLS row is computed (T dot products per head), never the N x N attention matrix.
    `q_cls` may also be the full queries [B, h, 1+T', dh] (CLS first) and `k` may carry the CLS key first
    ([B, h, 1+T, dh]); it is dropped. Computed in float32.
    """
    q_cls, keys = _cls_query(q_cls).float(), _image_keys(k, grid).float()
    if q_cls.shape[:2] != keys.shape[:2] or q_cls.shape[-1] != keys.shape[-1]:
        raise ValueError(f"CLS queries {tuple(q_cls.shape)} and keys {tuple(keys.shape)} do not match")
    # q_hat . (k / max(|k|, eps)) as F.normalize, without writing the normalised keys: one matvec per head,
    # then a division of the T dot products
    dots = torch.matmul(keys, F.normalize(q_cls, dim=-1).unsqueeze(-1)).squeeze(-1)  # [B, h, T]
    cos = dots / torch.linalg.vector_norm(keys, dim=-1).clamp_min(1e-12)
    return cos.reshape(cos.shape[0], cos.shape[1], grid[0], grid[1])


def cls_key_cosine(q_cls: torch.Tensor, k: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Head-mean cosine of CLS queries with image keys -> [B, gh, gw] (see cls_key_cosine_heads)."""
    return cls_key_cosine_heads(q_cls, k, grid).mean(dim=1)


def pseudo_mask(cos: torch.Tensor, out_size: Size, rule: str = "reference", threshold: float = 0.4, *,
                q_cls: torch.Tensor | None = None, k: torch.Tensor | None = None) -> torch.Tensor:
    """Binary pseudo-masks from cosine maps: cos [B, gh, gw] -> [B, H, W] float in {0, 1}.

    q_cls [B, h, dh] and image keys k [B, h, T, dh] are passed on to rules that need more than `cos`.
    """
    return _rule(rule)(RuleInputs(cos=cos.float(), q_cls=q_cls, k=k), _pair(out_size), float(threshold))


class PseudoMaskDistiller:
    """CST's attention pseudo-masks (cst.md "Attention pseudo-masks"), computed without gradients."""

    def __init__(self, rule: str = "reference", threshold: float = 0.4):
        _rule(rule)
        self.rule = rule
        self.threshold = float(threshold)

    def _masks(self, q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int], size: Size) -> torch.Tensor:
        return self.masks_from_cosine(cls_key_cosine(q, k, grid), q, k, grid, size)

    @torch.no_grad()
    def masks_from_cosine(self, cos: torch.Tensor, q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int],
                          size: Size) -> torch.Tensor:
        """The rule on an already computed head-mean cosine map cos [B, gh, gw] of CLS queries q vs keys k
        (layouts as in support_masks) -> [B, H, W] float {0, 1}."""
        return pseudo_mask(cos, size, self.rule, self.threshold, q_cls=_cls_query(q), k=_image_keys(k, grid))

    @torch.no_grad()
    def support_masks(self, q_s: torch.Tensor, k_s: torch.Tensor, grid: tuple[int, int],
                      size: Size) -> torch.Tensor:
        """Support CLS query vs the support's own image keys.

        q_s [Bs, h, 1+T, dh] (or CLS only [Bs, h, dh]), k_s [Bs, h, 1+T, dh] (or [Bs, h, T, dh]),
        grid (gh, gw) with T = gh*gw, size int or (H, W) -> [Bs, H, W] float {0, 1}.
        """
        return self._masks(q_s, k_s, grid, size)

    @torch.no_grad()
    def query_masks(self, q_s: torch.Tensor, k_q: torch.Tensor, grid: tuple[int, int], size: Size,
                    present: torch.Tensor | None) -> torch.Tensor:
        """Support CLS query vs the query's image keys, zeroed where the class is absent.

        q_s [B, h, 1+Ts, dh] (or [B, h, dh]) of the support paired with each query, k_q [B, h, 1+T, dh]
        (or [B, h, T, dh]) of the query on `grid`, size int or (H, W) (e.g. the original query size),
        present [B] bool/0-1 image-level label (None: labels unknown, nothing zeroed)
        -> [B, H, W] float {0, 1}.
        """
        masks = self._masks(q_s, k_q, grid, size)
        if present is None:
            return masks
        keep = present.to(device=masks.device).reshape(-1).bool()
        if keep.shape[0] != masks.shape[0]:
            raise ValueError(f"present has {keep.shape[0]} entries for {masks.shape[0]} query masks")
        return masks * keep[:, None, None].to(masks.dtype)

    def __call__(self, q_s: torch.Tensor, k_s: torch.Tensor, k_q: torch.Tensor, grid: tuple[int, int],
                 support_size: Size, query_size: Size, present: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(support_masks [B, Hs, Ws], query_masks [B, Hq, Wq]) for B (support, query) pairs on one grid."""
        return (self.support_masks(q_s, k_s, grid, support_size),
                self.query_masks(q_s, k_q, grid, query_size, present))

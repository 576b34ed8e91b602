"""A/B check before timing anything: the optimised head/correlation/backbone give the old numbers.

Random inputs, the same parameters through `fscs.model.cst.CSTHead.forward` (new) and
`reference_impl.old_head_forward` (old); float64 shows the algebra is identical (differences ~1e-15),
float32 shows the rounding-level differences users will see.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F

from fscs.model.backbone import FrozenBackbone
from fscs.model.correlation import correlation
from fscs.model.cst import CSTHead

from reference_impl import old_correlation, old_head_forward, reference_features

logger = logging.getLogger(__name__)

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
"""float64: accepted max |new - old| relative to each output's / gradient's max magnitude. float32: accepted
error of the new code against the float64 result, unless the old code's own float32 error is larger (then up
to 3x that): with random weights some inputs are badly conditioned (near-ties in the loss, near-constant
GroupNorm groups) and float32 gradients of either version can be ~1e-2 off there."""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30))


def _run_head(head: CSTHead, fwd: str, dtype: torch.dtype, corr: torch.Tensor, mask: torch.Tensor | None,
              target: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    h = copy.deepcopy(head).to(dtype)
    c_in, m_in = corr.to(dtype), None if mask is None else mask.to(dtype)
    size = (8 * grid, 8 * grid)
    cls, seg = (h(c_in, m_in, (grid, grid), size) if fwd == "new"
                else old_head_forward(h, c_in, m_in, (grid, grid), size))
    (F.cross_entropy(seg, target) + F.cross_entropy(cls, target[:, 0, 0])).backward()
    grads = {}
    for name, p in h.named_parameters():
        g = p.grad.detach()
        if name.endswith("attn.qkv.bias"):  # k's bias cannot change the output: true gradient 0, skip it
            hid = g.shape[0] // 3
            g = torch.cat([g[:hid], g[2 * hid:]])
        grads[name] = g
    return cls.detach(), seg.detach(), grads


def _worst(a: tuple, b: tuple) -> dict[str, float]:
    return {"cls": _rel(a[0], b[0]), "seg": _rel(a[1], b[1]),
            "grads": max(_rel(a[2][n], b[2][n]) for n in a[2])}


def _mask(kind: str, batch: int, size: int, device: torch.device) -> torch.Tensor | None:
    """none | dense (random pixels: nearly every support column kept, batched masked attention) | sparse
    (one box per image, of a different size each: the compacted per-episode attention)."""
    if kind == "none":
        return None
    if kind == "dense":
        return (torch.rand(batch, size, size, device=device) > 0.6).float()
    mask = torch.zeros(batch, size, size, device=device)
    for i in range(batch):
        side = max(2, size * (i + 1) // (2 * batch + 1))
        mask[i, i:i + side, size // 4:size // 4 + side] = 1
    return mask


def head_ab(dtype: torch.dtype, in_ch: int, grid: int, batch: int, masked: str, device: torch.device
            ) -> dict[str, Any]:
    """Max relative differences (cls, seg, every parameter's gradient after a CE loss) of the new forward
    against the float64 old forward, next to the old forward's own error in `dtype`."""
    torch.manual_seed(0)
    head = CSTHead(in_ch).to(device)
    corr = torch.randn(batch, in_ch, grid * grid, 145, device=device)
    mask = _mask(masked, batch, 4 * grid, device)
    target = torch.randint(0, 2, (batch, 8 * grid, 8 * grid), device=device)
    truth = _run_head(head, "old", torch.float64, corr, mask, target, grid)
    new = _worst(truth, _run_head(head, "new", dtype, corr, mask, target, grid))
    old = _worst(truth, _run_head(head, "old", dtype, corr, mask, target, grid)) if dtype != torch.float64 \
        else {k: 0.0 for k in new}
    ok = all(new[k] <= max(TOLERANCE[dtype], 3 * old[k]) for k in new)
    return {"dtype": str(dtype).replace("torch.", ""), "channels": in_ch, "query_grid": grid,
            "masked": masked,
            **new, "old_error": max(old.values()), "ok": ok}


def correlation_ab(device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    qt, st = torch.randn(2, 6, 1 + 256, 192, device=device), torch.randn(2, 6, 1 + 100, 192, device=device)
    d = _rel(old_correlation(qt, st, 3, (16, 16), (10, 10)), correlation(qt, st, 3, (16, 16), (10, 10)))
    return {"what": "correlation fp32", "max_rel_diff": d, "ok": d <= TOLERANCE[torch.float32]}


def backbone_ab(name: str, size: int, device: torch.device) -> dict[str, Any]:
    """Fused backbone (one qkv in the last block) vs the reference's non-fused pass (attention matrices)."""
    bb = FrozenBackbone(name, None, size).to(device)
    images = torch.randn(2, 3, size, size, device=device)
    new = bb(images)
    old, attn = reference_features(bb, images)
    diffs = {f: _rel(getattr(old, f), getattr(new, f)) for f in ("tokens", "q", "k")}
    return {"what": f"backbone {name} {size} px", **diffs, "attention_matrix": list(attn.shape),
            "ok": max(diffs.values()) <= TOLERANCE[torch.float32]}


def run_equivalence(device: torch.device, backbone: str, size: int) -> dict[str, Any]:
    heads = [head_ab(dt, ch, g, 2, m, device) for dt in (torch.float64, torch.float32)
             for ch, g in ((18, 16), (72, 12)) for m in ("dense", "sparse", "none")]
    others = [correlation_ab(device), backbone_ab(backbone, size, device)]
    return {"heads": heads, "others": others, "ok": all(r["ok"] for r in heads + others),
            "tolerance": {str(k).replace("torch.", ""): v for k, v in TOLERANCE.items()}}

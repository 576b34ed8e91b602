"""Baselines for the perf benchmarks: the pre-optimisation CST head and an emulation of the authors' code.

Nothing here is used by the package. `old_correlation` / `old_head_forward` are the head as it was before
the speed work (commit 3eb2f13: masked_fill logits, permuted bmm attention, NCHW 1x1 convs), written as
functions over a `fscs.model.cst.CSTHead`'s parameters so both versions run on the very same weights (A/B
equality and speed). `reference_features` / `reference_train_step` / `no_reuse_episode` emulate what the
authors' reference implementation documents (shared/reference/cst.md, issue 7): fp32, DINO-style
non-fused attention that forms every block's full N x N attention matrix (the last one kept to extract the
masks), and the query's features recomputed for every way, every shot (and, in evaluation, every head).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fscs.losses import fscs_loss
from fscs.model.backbone import BackboneOutput, FrozenBackbone
from fscs.model.cst import CSTHead

logger = logging.getLogger(__name__)

MASK_FILL = -1e9
ATTN_HEADS = 8


# ----------------------------------------------------------------------------- the pre-optimisation head
def old_correlation(query_tokens: Tensor, support_tokens: Tensor, num_heads: int, query_grid: tuple[int, int],
                    support_grid: tuple[int, int], support_out: int = 12) -> Tensor:
    """Correlation as before: [B, L, 1+Tq, D] x [B, L, 1+Ts, D] -> [B, heads*L, Tq, 1+so^2] (with copies)."""
    b, n_layers, tq1, d = query_tokens.shape
    tq, dh = tq1 - 1, d // num_heads
    hs, ws = support_grid
    q = query_tokens[:, :, 1:].reshape(b, n_layers, tq, num_heads, dh).permute(0, 3, 1, 2, 4)
    sp = support_tokens[:, :, 1:].reshape(b * n_layers, hs, ws, d).permute(0, 3, 1, 2)
    sp = F.interpolate(sp, size=(support_out, support_out), mode="bilinear", align_corners=True)
    sp = sp.flatten(2).transpose(1, 2).reshape(b, n_layers, support_out * support_out, d)
    s = torch.cat([support_tokens[:, :, :1], sp], dim=2)
    s = s.reshape(b, n_layers, s.shape[2], num_heads, dh).permute(0, 3, 1, 2, 4)
    q, s = F.normalize(q, p=2, dim=-1), F.normalize(s, p=2, dim=-1)
    corr = torch.matmul(q, s.transpose(-1, -2))
    return corr.reshape(b, num_heads * n_layers, tq, corr.shape[-1])


def _conv(m: nn.Conv2d, x: Tensor) -> Tensor:
    return F.conv2d(x, m.weight, m.bias, padding=m.padding)


def _old_pool(x: Tensor, grid: tuple[int, int], pool: int) -> Tensor:
    b, c, q, _ = x.shape
    img = F.avg_pool2d(x[..., 1:].reshape(b, c * q, *grid), kernel_size=pool, stride=pool)
    img = img.reshape(b, c, q, -1)
    return torch.cat([x[..., :1], img], dim=-1)


def _old_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, grid: tuple[int, int]) -> Tensor:
    b, c, nq, sq = q.shape
    s, heads = k.shape[-1], ATTN_HEADS
    dh = c // heads
    qh = q.reshape(b, heads, dh, nq, sq).permute(0, 1, 3, 4, 2)
    kh = k.reshape(b, heads, dh, nq, s).permute(0, 1, 3, 2, 4)
    vh = v.reshape(b, heads, dh, nq, s).permute(0, 1, 3, 4, 2)
    logits = torch.matmul(qh, kh)  # [B, g, Q, Sq, S]
    if mask is not None:
        small = F.interpolate(mask.float().unsqueeze(1), size=grid, mode="bilinear", align_corners=True)
        zero = small.flatten(1) == 0
        cols = torch.cat([zero.new_zeros(b, 1), zero], dim=1).view(b, 1, 1, 1, s)
        logits = logits.masked_fill(cols, max(MASK_FILL, torch.finfo(logits.dtype).min))
    out = torch.matmul(logits.softmax(dim=-1), vh)
    return out.permute(0, 1, 4, 2, 3).reshape(b, c, nq, sq)


def old_head_forward(head: CSTHead, corr: Tensor, support_mask: Tensor | None, query_grid: tuple[int, int],
                     out_size: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    """The CST head's forward before the speed work, on `head`'s parameters -> (cls [B,2], seg [B,2,H,W])."""
    b = corr.shape[0]
    h, w = query_grid
    x, grid = corr, head.support_grid
    for block in head.blocks:
        a = block.attn
        shortcut = F.relu(a.shortcut_norm(_old_pool(_conv(a.shortcut_conv, x), grid, a.pool)))
        q, k, v = _conv(a.qkv, x).split(a.hidden, dim=1)
        out = _old_attention(_old_pool(q, grid, a.pool), k, v, support_mask, grid)
        out = F.relu(a.proj_norm(_conv(a.proj, F.relu(a.attn_norm(out)))))
        x = a.out_norm(out + shortcut)
        f = block.ff
        x = f.out_norm(_conv(f.expand, F.relu(f.reduce_norm(_conv(f.reduce, x)))) + x)
        grid = (grid[0] // block.pool, grid[1] // block.pool)
    x = F.relu(head.mix_norm1(_conv(head.mix_conv1, x)))
    x = F.relu(head.mix_norm2(_conv(head.mix_conv2, x)))
    cls_map, img_map = x[..., 0].reshape(b, -1, h, w), x[..., 1].reshape(b, -1, h, w)
    y = F.relu(_conv(head.cls_conv2, F.relu(_conv(head.cls_conv1, cls_map))))
    y = F.avg_pool2d(y, kernel_size=3, stride=2, padding=1)
    cls_logits = _conv(head.cls_out, F.relu(_conv(head.cls_conv3, y))).mean(dim=(2, 3))
    z = F.relu(_conv(head.seg_conv2, F.relu(_conv(head.seg_conv1, img_map))))
    z = F.interpolate(z, size=(2 * h, 2 * w), mode="bilinear", align_corners=True)
    z = _conv(head.seg_out, F.relu(_conv(head.seg_conv3, z)))
    if out_size is not None and tuple(out_size) != tuple(z.shape[-2:]):
        z = F.interpolate(z, size=tuple(out_size), mode="bilinear", align_corners=True)
    return cls_logits, z


# ----------------------------------------------------------------------------- the authors' code, emulated
@torch.no_grad()
def reference_features(backbone: FrozenBackbone, images: Tensor) -> tuple[BackboneOutput, Tensor]:
    """Backbone pass the way the reference does it: non-fused attention in every block (DINO's Attention
    forms softmax(q k^T) [B, h, N, N]) and the last block's full attention matrix kept for the masks.

    Returns (BackboneOutput with tokens [B, L, 1+T, D], q/k [B, h, 1+T, dh]; attention [B, h, N, N]).
    """
    model = backbone.model
    fused = [blk.attn.fused_attn for blk in model.blocks]
    try:
        for blk in model.blocks:
            blk.attn.fused_attn = False
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        layers = []
        for i, blk in enumerate(model.blocks):
            if i == len(model.blocks) - 1:
                a = blk.attn
                n = x.shape[1]
                qkv = a.qkv(blk.norm1(x)).reshape(x.shape[0], n, 3, a.num_heads, a.head_dim)
                qkv = qkv.permute(2, 0, 3, 1, 4)
                q, k = qkv[0], qkv[1]
                attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # the full N x N matrix
            x = blk(x)
            layers.append(model.norm(x))
    finally:
        for blk, f in zip(model.blocks, fused):
            blk.attn.fused_attn = f
    return BackboneOutput(tokens=torch.stack(layers, dim=1), q=q, k=k), attn


def _reference_masks(q: Tensor, k: Tensor, grid: tuple[int, int], size: int) -> Tensor:
    """Support CLS query vs keys cosine -> (x+1)/2 > 0.4 at `size` (cst.md's rule): [B, size, size] {0,1}."""
    cos = torch.einsum("bhd,bhtd->bht", F.normalize(q[:, :, 0], dim=-1), F.normalize(k[:, :, 1:], dim=-1))
    cos = cos.mean(1).reshape(-1, 1, *grid)
    up = F.interpolate(cos, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
    return ((up + 1) / 2 > 0.4).float()


def reference_train_step(backbone: FrozenBackbone, head: CSTHead, optimizer: torch.optim.Optimizer,
                         batch: dict[str, Tensor], cls_weight: float = 0.1) -> float:
    """One weak-regime 1-way 1-shot training step as the reference runs it (fp32, non-fused backbone with
    full attention matrices, old correlation and head, Adam). Returns the loss."""
    query, support, presence = batch["query_img"], batch["support_img"], batch["presence"]
    b, n, k = support.shape[:3]
    if (n, k) != (1, 1):
        raise ValueError("the reference trains 1-way 1-shot episodes only")
    size, grid = query.shape[-1], backbone.grid
    feats, _ = reference_features(backbone, torch.cat([query, support[:, 0, 0]]))
    corr = old_correlation(feats.tokens[:b], feats.tokens[b:], backbone.num_heads, grid, grid)
    s_mask = _reference_masks(feats.q[b:], feats.k[b:], grid, size)
    q_cls_vs_query = torch.cat([feats.q[b:, :, :1], feats.q[:b, :, 1:]], dim=2)  # support CLS, query keys
    q_mask = _reference_masks(q_cls_vs_query, feats.k[:b], grid, size) * presence[:, 0, None, None]
    cls, seg = old_head_forward(head, corr, s_mask, grid, (size, size))
    loss, _ = fscs_loss(cls[:, None], seg[:, None], presence, q_mask[:, None].long(), cls_weight=cls_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def no_reuse_episode(model: Any, heads: dict[str, tuple[str, CSTHead]], query: Tensor, support: Tensor,
                     support_masks: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Evaluation without feature reuse (the reference's behaviour): for every head, way and shot the query
    and that support pass the backbone again and are decoded as a 1-way 1-shot episode; probabilities are
    averaged over shots. heads: {name: (regime, head)}; query [B,3,S,S], support [B,N,K,3,S,S],
    support_masks [B,N,K,S,S]. Returns {name: (presence prob [B,N], foreground prob [B,N,S,S])}."""
    b, n, k = support.shape[:3]
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, (regime, head) in heads.items():
        pres, fg = [], []
        for way in range(n):
            pc, ps = [], []
            for shot in range(k):
                feats = model.encode_episode(query, support[:, way:way + 1, shot:shot + 1])
                masks = support_masks[:, way:way + 1, shot:shot + 1] if regime == "full" else None
                o = model.decode_episode(feats, masks, regime, None, None, head=head)
                pc.append(o.cls_logits[:, 0].float().softmax(-1)[:, 1])
                ps.append(o.mask_logits[:, 0].float().softmax(1)[:, 1])
            pres.append(torch.stack(pc).mean(0))
            fg.append(torch.stack(ps).mean(0))
        out[name] = (torch.stack(pres, 1), torch.stack(fg, 1))
    return out

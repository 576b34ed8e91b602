"""The building blocks of the CST head's correlation transformer: 1x1 convs as GEMMs, support-grid pooling,
support-mask columns and the per-query-token multi-head attention.

Tensor layout: x [B, C, Q, S] is a Conv2d "image" of height Q (query patch tokens, row-major over the query
grid) and width S (support tokens: CLS first, then the h x w support grid row-major). Inside the head the
tensors are channels-last in memory (physically [B, Q, S, C]), so 1x1 convs are single GEMMs and channel
and head splits are views; the attention is one fused scaled_dot_product_attention (no Q x Sq x S logits
in memory). Multi-head split: channel c of a C-channel tensor belongs to head c // (C/heads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fscs.errors import FSCSError

MASK_FILL = -1e9
"""Logit the reference writes into masked attention columns. exp(MASK_FILL - max) is exactly 0 in float32
and bfloat16, so the fused attention's boolean mask (-inf) gives the same softmax: the CLS column is never
masked, hence no row is ever fully masked."""
ATTN_HEADS = 8


def conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution as one GEMM over channels.

    x [B, Cin, H, W] (any memory layout), weight [Cout, Cin(, 1, 1)], bias [Cout] | None
    -> [B, Cout, H, W] in channels-last memory (physically [B, H, W, Cout]).
    """
    w = weight.flatten(1)
    b, cin, height, width = x.shape
    t = x.permute(0, 2, 3, 1)
    if t.is_contiguous():  # channels-last input: a plain GEMM
        y = F.linear(t, w, bias)
    elif x.is_contiguous():  # NCHW input: GEMM on the transposed view, no layout copy
        xt = x.view(b, cin, height * width).transpose(1, 2)
        wt = w.t().unsqueeze(0).expand(b, cin, w.shape[0])
        if bias is None:
            y = torch.bmm(xt, wt)
        else:
            y = torch.baddbmm(bias.view(1, 1, -1).expand(b, height * width, w.shape[0]), xt, wt)
        y = y.view(b, height, width, w.shape[0])
    else:
        y = F.linear(t.contiguous(), w, bias)
    return y.permute(0, 3, 1, 2)


class Conv1x1(nn.Conv2d):
    """nn.Conv2d(cin, cout, 1) (same parameters and state-dict keys) computed by `conv1x1`."""

    def __init__(self, cin: int, cout: int, bias: bool):
        super().__init__(cin, cout, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, Cin, H, W] -> [B, Cout, H, W] (channels-last memory)."""
        return conv1x1(x, self.weight, self.bias)


def support_pool_matrix(grid: tuple[int, int], pool: int, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> Tensor:
    """[1+h*w, 1+h'*w'] averaging matrix: CLS -> CLS, each pool x pool cell of the h x w grid -> its mean.

    Like avg_pool2d without padding (h' = h // pool, w' = w // pool; uncovered rows/columns are dropped).
    """
    h, w = grid
    eye = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    cells = F.avg_pool2d(eye, kernel_size=pool, stride=pool).flatten(1)  # [h*w, h'*w']
    mat = torch.zeros(1 + h * w, 1 + cells.shape[1], dtype=torch.float64)
    mat[0, 0] = 1.0
    mat[1:, 1:] = cells
    return mat.to(device=device, dtype=dtype)


def pool_support(x: Tensor, grid: tuple[int, int], pool: int) -> Tensor:
    """Average-pool the support image tokens over their grid (kernel = stride = pool); CLS untouched.

    x: [B, C, Q, 1+h*w] -> [B, C, Q, 1+(h//pool)*(w//pool)], one GEMM with `support_pool_matrix`. The result
    keeps x's memory layout (contiguous NCHW in, NCHW out; otherwise channels-last out).
    """
    mat = support_pool_matrix(grid, pool, x.dtype, x.device)
    if x.is_contiguous():
        return torch.matmul(x, mat)
    t = x.permute(0, 2, 3, 1)  # [B, Q, S, C]
    return torch.matmul(mat.t(), t).permute(0, 3, 1, 2)


def resize_support_mask(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """mask [B, Hs, Ws] float {0,1} -> [B, h*w] bool, True where the bilinear (align_corners) resize is 0."""
    small = F.interpolate(mask.float().unsqueeze(1), size=grid, mode="bilinear", align_corners=True)
    return small.flatten(1) == 0


def kept_columns(support_mask: Tensor, grid: tuple[int, int], batch: int) -> Tensor:
    """support_mask [B, Hs, Ws] float {0,1} -> [B, 1+h*w] bool, True = the attention attends to that column.

    Image-token columns where the mask, resized bilinearly (align_corners=True) to grid, is exactly 0 are
    dropped (the reference's -1e9 logit); the CLS column (first) is always kept.
    """
    if support_mask.dim() != 3 or support_mask.shape[0] != batch:
        raise FSCSError(f"cst: support_mask must be [B={batch}, Hs, Ws], got {tuple(support_mask.shape)}")
    zero = resize_support_mask(support_mask, grid)  # [B, h*w]
    return torch.cat([zero.new_ones(batch, 1), ~zero], dim=1)


def attend(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, heads: int = ATTN_HEADS) -> Tensor:
    """Multi-head attention of every query token's pooled support tokens over its support tokens.

    q: [B, C, Q, Sq]; k, v: [B, C, Q, S] (any memory layout; channels-last makes every head split a view);
    keep: [B, S] bool (False = column left out of the softmax) or None; channel c -> head c // (C/heads).
    Returns [B, C, Q, Sq] (channels-last memory): softmax(q.k, no scaling) weighted sum of v.
    """
    b, c, nq, sq = q.shape
    s = k.shape[-1]
    dh = c // heads

    def split(t: Tensor, n: int) -> Tensor:  # [B, C, Q, n] -> [B*Q, heads, n, dh]
        return t.permute(0, 2, 3, 1).reshape(b * nq, n, heads, dh).transpose(1, 2)

    mask = None if keep is None else keep[:, None, None, :].expand(b, nq, 1, s).reshape(b * nq, 1, 1, s)
    dtype = q.dtype
    low = dtype in (torch.bfloat16, torch.float16)
    if q.device.type == "cpu" and (low or torch.is_autocast_enabled("cpu")):
        # the CPU flash kernel is several times slower in 16 bits for these tiny head dims: run it in fp32
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(split(q.float(), sq), split(k.float(), s),
                                                 split(v.float(), s), attn_mask=mask, scale=1.0)
    else:
        out = F.scaled_dot_product_attention(split(q, sq), split(k, s), split(v, s), attn_mask=mask, scale=1.0)
    return out.transpose(1, 2).reshape(b, nq, sq, c).permute(0, 3, 1, 2).to(dtype)


def support_attention(q: Tensor, k: Tensor, v: Tensor, support_mask: Tensor | None, grid: tuple[int, int],
                      heads: int = ATTN_HEADS) -> Tensor:
    """Per-query-token multi-head attention from pooled support tokens to all support tokens.

    Args:
        q: [B, C, Q, Sq] pooled queries (Sq = 1 + pooled grid); k, v: [B, C, Q, S] with S = 1 + h*w.
        support_mask: [B, Hs, Ws] float {0,1} or None (no masking); see `kept_columns`.
        grid: (h, w) support grid of k/v. heads: channel c belongs to head c // (C/heads).
    Returns:
        [B, C, Q, Sq] (channels-last memory), as `attend`.
    """
    keep = None if support_mask is None else kept_columns(support_mask, grid, q.shape[0])
    return attend(q, k, v, keep, heads)

"""Correlation tokens: head-wise multi-layer cosine similarities between query and support tokens (CST).

No learnable parameters; the frozen part of an episode that the CST head (`fscs.model.cst`) reads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fscs.errors import FSCSError


def _grid_of(n: int, what: str) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise FSCSError(f"cst: {what} has {n} patch tokens, not a square grid; pass its grid (h, w)")
    return side, side


def _matmul_dtype(t: Tensor) -> torch.dtype:
    """The dtype a matmul on float32 `t` computes in: autocast's dtype when autocast is on for its device."""
    dev = t.device.type
    if t.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def correlation(query_tokens: Tensor, support_tokens: Tensor, num_heads: int,
                query_grid: tuple[int, int] | None = None, support_grid: tuple[int, int] | None = None,
                support_out: int = 12) -> Tensor:
    """Head-wise multi-layer cosine correlation tokens (no learnable parameters).

    Args:
        query_tokens: [B, L, 1+Tq, D] backbone tokens of the query (CLS first; CLS is dropped).
        support_tokens: [B*R, L, 1+Ts, D] backbone tokens of the supports (CLS first); R >= 1 supports per
            query, support j paired with query j // R (pass each query once instead of repeating it R times).
        num_heads: backbone heads; D is split into num_heads chunks of D/num_heads dims (chunk n = dims
            [n*D/heads, (n+1)*D/heads)).
        query_grid: (hq, wq) with hq*wq = Tq (default: square).
        support_grid: (hs, ws) with hs*ws = Ts (default: square); the patch grid is bilinearly resized
            (align_corners=True) to support_out x support_out and the support CLS is prepended.
        support_out: side of the resized support grid (12 in the reference).
    Returns:
        [B*R, num_heads*L, Tq, 1+support_out**2] cosine similarities (contiguous); channel = head*L + layer.
        Under autocast the products run (and the result is stored) in autocast's dtype, like a matmul.
    """
    if query_tokens.dim() != 4 or support_tokens.dim() != 4:
        raise FSCSError("cst.correlation: tokens must be [B, L, 1+T, D]; stack every layer's tokens on dim 1")
    b, n_layers, tq1, d = query_tokens.shape
    m = support_tokens.shape[0]
    if b == 0 or m % b or support_tokens.shape[1] != n_layers or support_tokens.shape[3] != d:
        raise FSCSError(f"cst.correlation: support tokens {tuple(support_tokens.shape)} do not match query "
                        f"tokens {tuple(query_tokens.shape)} in B (a multiple of the query batch), L or D")
    repeat = m // b
    if d % num_heads:
        raise FSCSError(f"cst.correlation: token dim {d} is not divisible by num_heads={num_heads}")
    tq, ts = tq1 - 1, support_tokens.shape[2] - 1
    hq, wq = query_grid if query_grid is not None else _grid_of(tq, "query")
    hs, ws = support_grid if support_grid is not None else _grid_of(ts, "support")
    if hq * wq != tq or hs * ws != ts:
        raise FSCSError(f"cst.correlation: grids {(hq, wq)}/{(hs, ws)} do not match {tq}/{ts} patch tokens")
    dh = d // num_heads
    # Unit-norm head chunks in the tokens' own layout [B, L, T, heads, dh]: no transposed copy of the query.
    q = F.normalize(query_tokens[:, :, 1:].unflatten(3, (num_heads, dh)), p=2, dim=-1)
    sp = support_tokens[:, :, 1:].reshape(m * n_layers, hs, ws, d).permute(0, 3, 1, 2)
    sp = F.interpolate(sp, size=(support_out, support_out), mode="bilinear", align_corners=True)
    sp = sp.flatten(2).transpose(1, 2).reshape(m, n_layers, support_out * support_out, d)
    s = torch.cat([support_tokens[:, :, :1], sp], dim=2).unflatten(3, (num_heads, dh))
    s = F.normalize(s, p=2, dim=-1)  # [B*R, L, S, heads, dh]
    dtype = _matmul_dtype(q)
    q, s = q.to(dtype), s.to(dtype)
    ns = s.shape[2]
    corr = q.new_empty(m, num_heads, n_layers, tq, ns)
    # one strided GEMM per (pair, head) straight into its channel block of the output
    with torch.autocast(q.device.type, enabled=False):
        for i in range(m):
            for h in range(num_heads):
                torch.bmm(q[i // repeat, :, :, h], s[i, :, :, h].transpose(1, 2), out=corr[i, h])
    return corr.view(m, num_heads * n_layers, tq, ns)

"""Correlation tokens and the CST correlation-transformer head (classification + segmentation)."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

MASK_FILL = -1e9
"""Logit written into masked attention columns (the reference's value)."""
REFERENCE_NUM_PARAMS = 366_004
"""Learnable parameters of the reference head at in_channels=72."""
BLOCK_SPECS: tuple[tuple[int, int], ...] = ((32, 4), (128, 3))
"""(out_channels, support pool size) of the two correlation-transformer blocks."""
ATTN_HEADS = 8
NORM_GROUPS = 4

# Tensor layout used throughout the head: x [B, C, Q, S] is a Conv2d "image" of height Q (query patch
# tokens, row-major over the query grid) and width S (support tokens: CLS first, then the h x w support
# grid row-major). 1x1 convs and GroupNorm are therefore per-(q, s) / over all (q, s) as in the reference.
# Multi-head split: a C-channel tensor is viewed as [B, 8, C/8, Q, S], i.e. channel c -> head c // (C/8);
# the qkv conv's 3*C' output channels are ordered (q|k|v, head, dim):
# q = [0, C'), k = [C', 2C'), v = [2C', 3C'), as in the reference checkpoints.


def _grid_of(n: int, what: str) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise FSCSError(f"cst: {what} has {n} patch tokens, not a square grid; pass its grid (h, w)")
    return side, side


def correlation(query_tokens: Tensor, support_tokens: Tensor, num_heads: int,
                query_grid: tuple[int, int] | None = None, support_grid: tuple[int, int] | None = None,
                support_out: int = 12) -> Tensor:
    """Head-wise multi-layer cosine correlation tokens (no learnable parameters).

    Args:
        query_tokens: [B, L, 1+Tq, D] backbone tokens of the query (CLS first; CLS is dropped).
        support_tokens: [B, L, 1+Ts, D] backbone tokens of the support (CLS first).
        num_heads: backbone heads; D is split into num_heads chunks of D/num_heads dims (chunk n = dims
            [n*D/heads, (n+1)*D/heads)).
        query_grid: (hq, wq) with hq*wq = Tq (default: square).
        support_grid: (hs, ws) with hs*ws = Ts (default: square); the patch grid is bilinearly resized
            (align_corners=True) to support_out x support_out and the support CLS is prepended.
        support_out: side of the resized support grid (12 in the reference).
    Returns:
        [B, num_heads*L, Tq, 1+support_out**2] cosine similarities; channel index = head*L + layer.
    """
    if query_tokens.dim() != 4 or support_tokens.dim() != 4:
        raise FSCSError("cst.correlation: tokens must be [B, L, 1+T, D]; stack every layer's tokens on dim 1")
    b, n_layers, tq1, d = query_tokens.shape
    if support_tokens.shape[0] != b or support_tokens.shape[1] != n_layers or support_tokens.shape[3] != d:
        raise FSCSError(f"cst.correlation: support tokens {tuple(support_tokens.shape)} do not match query "
                        f"tokens {tuple(query_tokens.shape)} in B, L or D")
    if d % num_heads:
        raise FSCSError(f"cst.correlation: token dim {d} is not divisible by num_heads={num_heads}")
    tq, ts = tq1 - 1, support_tokens.shape[2] - 1
    hq, wq = query_grid if query_grid is not None else _grid_of(tq, "query")
    hs, ws = support_grid if support_grid is not None else _grid_of(ts, "support")
    if hq * wq != tq or hs * ws != ts:
        raise FSCSError(f"cst.correlation: grids {(hq, wq)}/{(hs, ws)} do not match {tq}/{ts} patch tokens")
    dh = d // num_heads
    # query: [B, L, Tq, heads, dh] -> [B, heads, L, Tq, dh]
    q = query_tokens[:, :, 1:].reshape(b, n_layers, tq, num_heads, dh).permute(0, 3, 1, 2, 4)
    # support patches: [B*L, D, hs, ws] -> resized [B*L, D, so, so] -> [B, L, so*so, D]
    sp = support_tokens[:, :, 1:].reshape(b * n_layers, hs, ws, d).permute(0, 3, 1, 2)
    sp = F.interpolate(sp, size=(support_out, support_out), mode="bilinear", align_corners=True)
    sp = sp.flatten(2).transpose(1, 2).reshape(b, n_layers, support_out * support_out, d)
    s = torch.cat([support_tokens[:, :, :1], sp], dim=2)  # [B, L, S, D]
    s = s.reshape(b, n_layers, s.shape[2], num_heads, dh).permute(0, 3, 1, 2, 4)  # [B, heads, L, S, dh]
    q = F.normalize(q, p=2, dim=-1)
    s = F.normalize(s, p=2, dim=-1)
    corr = torch.matmul(q, s.transpose(-1, -2))  # [B, heads, L, Tq, S]
    return corr.reshape(b, num_heads * n_layers, tq, corr.shape[-1])


def pool_support(x: Tensor, grid: tuple[int, int], pool: int) -> Tensor:
    """Average-pool the support image tokens over their grid (kernel = stride = pool); CLS untouched.

    x: [B, C, Q, 1+h*w] -> [B, C, Q, 1+(h//pool)*(w//pool)].
    """
    b, c, q, _ = x.shape
    h, w = grid
    img = x[..., 1:].reshape(b, c * q, h, w)
    img = F.avg_pool2d(img, kernel_size=pool, stride=pool).reshape(b, c, q, -1)
    return torch.cat([x[..., :1], img], dim=-1)


def resize_support_mask(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """mask [B, Hs, Ws] float {0,1} -> [B, h*w] bool, True where the bilinear (align_corners) resize is 0."""
    small = F.interpolate(mask.float().unsqueeze(1), size=grid, mode="bilinear", align_corners=True)
    return small.flatten(1) == 0


def support_attention(q: Tensor, k: Tensor, v: Tensor, support_mask: Tensor | None, grid: tuple[int, int],
                      heads: int = ATTN_HEADS) -> Tensor:
    """Per-query-token multi-head attention from pooled support tokens to all support tokens.

    Args:
        q: [B, C, Q, Sq] pooled queries (Sq = 1 + pooled grid); k, v: [B, C, Q, S] with S = 1 + h*w.
        support_mask: [B, Hs, Ws] float {0,1} or None (no masking). Image-token columns where the mask,
            resized bilinearly (align_corners=True) to grid, is exactly 0 get logit -1e9; CLS never masked.
        grid: (h, w) support grid of k/v. heads: channel c belongs to head c // (C/heads).
    Returns:
        [B, C, Q, Sq]: softmax(q.k, no scaling) weighted sum of v.
    """
    b, c, nq, sq = q.shape
    s = k.shape[-1]
    dh = c // heads
    qh = q.reshape(b, heads, dh, nq, sq).permute(0, 1, 3, 4, 2)  # [B, g, Q, Sq, dh]
    kh = k.reshape(b, heads, dh, nq, s).permute(0, 1, 3, 2, 4)  # [B, g, Q, dh, S]
    vh = v.reshape(b, heads, dh, nq, s).permute(0, 1, 3, 4, 2)  # [B, g, Q, S, dh]
    logits = torch.matmul(qh, kh)  # [B, g, Q, Sq, S]
    if support_mask is not None:
        if support_mask.dim() != 3 or support_mask.shape[0] != b:
            raise FSCSError(f"cst: support_mask must be [B={b}, Hs, Ws], got {tuple(support_mask.shape)}")
        zero = resize_support_mask(support_mask, grid)  # [B, h*w]
        cols = torch.cat([zero.new_zeros(b, 1), zero], dim=1).view(b, 1, 1, 1, s)
        fill = max(MASK_FILL, torch.finfo(logits.dtype).min)
        logits = logits.masked_fill(cols, fill)
    attn = logits.softmax(dim=-1)
    out = torch.matmul(attn, vh)  # [B, g, Q, Sq, dh]
    return out.permute(0, 1, 4, 2, 3).reshape(b, c, nq, sq)


def _conv1x1(cin: int, cout: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=bias)


class CorrAttention(nn.Module):
    """Attention of a correlation-transformer block: [B, Cin, Q, 1+h*w] -> [B, Cout, Q, 1+(h/p)*(w/p)]."""

    def __init__(self, cin: int, cout: int, pool: int, heads: int = ATTN_HEADS, groups: int = NORM_GROUPS):
        super().__init__()
        hidden = cout // 2
        if hidden % heads:
            raise FSCSError(f"cst: hidden channels {hidden} not divisible by {heads} heads")
        self.pool, self.heads, self.hidden = pool, heads, hidden
        self.shortcut_conv = _conv1x1(cin, cout, bias=False)
        self.shortcut_norm = nn.GroupNorm(groups, cout)
        self.qkv = _conv1x1(cin, 3 * hidden, bias=True)
        self.attn_norm = nn.GroupNorm(groups, hidden)
        self.proj = _conv1x1(hidden, cout, bias=False)
        self.proj_norm = nn.GroupNorm(groups, cout)
        self.out_norm = nn.GroupNorm(groups, cout)

    def forward(self, x: Tensor, support_mask: Tensor | None, grid: tuple[int, int]) -> Tensor:
        """x: [B, Cin, Q, 1+h*w], support_mask: [B, Hs, Ws] | None, grid (h, w) -> [B, Cout, Q, 1+h'*w']."""
        shortcut = F.relu(self.shortcut_norm(pool_support(self.shortcut_conv(x), grid, self.pool)))
        q, k, v = self.qkv(x).split(self.hidden, dim=1)  # each [B, C', Q, S]
        q = pool_support(q, grid, self.pool)
        out = support_attention(q, k, v, support_mask, grid, self.heads)
        out = F.relu(self.proj_norm(self.proj(F.relu(self.attn_norm(out)))))
        return self.out_norm(out + shortcut)


class CorrFeedForward(nn.Module):
    """Feed-forward of a block with residual GroupNorm: [B, C, Q, S] -> [B, C, Q, S]."""

    def __init__(self, channels: int, groups: int = NORM_GROUPS):
        super().__init__()
        self.reduce = _conv1x1(channels, channels // 2, bias=False)
        self.reduce_norm = nn.GroupNorm(groups, channels // 2)
        self.expand = _conv1x1(channels // 2, channels, bias=False)
        self.out_norm = nn.GroupNorm(groups, channels)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, Q, S] -> [B, C, Q, S]."""
        return self.out_norm(self.expand(F.relu(self.reduce_norm(self.reduce(x)))) + x)


class CorrBlock(nn.Module):
    """Correlation-transformer block = CorrAttention (pools the support grid by `pool`) + CorrFeedForward."""

    def __init__(self, cin: int, cout: int, pool: int):
        super().__init__()
        self.pool = pool
        self.attn = CorrAttention(cin, cout, pool)
        self.ff = CorrFeedForward(cout)

    def forward(self, x: Tensor, support_mask: Tensor | None, grid: tuple[int, int]) -> Tensor:
        """x: [B, Cin, Q, 1+h*w] -> [B, Cout, Q, 1+(h//pool)*(w//pool)]."""
        return self.ff(self.attn(x, support_mask, grid))


class CSTHead(nn.Module):
    """The learnable CST head: correlation tokens -> (presence logits, 2-class mask logits).

    Two CorrBlocks (in_channels -> 32, pool 4; 32 -> 128, pool 3) reduce the support tokens to
    [cls | img], then 2 x (1x1 conv, GN, ReLU); the CLS- and image-derived maps on the query grid feed
    the classification and segmentation branches. 366,004 parameters at in_channels=72.
    """

    def __init__(self, in_channels: int = 72, support_grid: int | tuple[int, int] = 12):
        super().__init__()
        grid = (support_grid, support_grid) if isinstance(support_grid, int) else tuple(support_grid)
        h, w = grid
        for _, pool in BLOCK_SPECS:
            h, w = h // pool, w // pool
        if (h, w) != (1, 1):
            pools = [p for _, p in BLOCK_SPECS]
            raise FSCSError(f"cst: support_grid {grid} does not pool to 1x1 with pools {pools}; "
                            "use support_grid=12 (= support_out of correlation)")
        self.in_channels = in_channels
        self.support_grid: tuple[int, int] = (int(grid[0]), int(grid[1]))
        chans = [in_channels] + [c for c, _ in BLOCK_SPECS]
        self.blocks = nn.ModuleList(
            CorrBlock(chans[i], chans[i + 1], p) for i, (_, p) in enumerate(BLOCK_SPECS))
        c = chans[-1]
        self.mix_conv1, self.mix_norm1 = _conv1x1(c, c, bias=True), nn.GroupNorm(NORM_GROUPS, c)
        self.mix_conv2, self.mix_norm2 = _conv1x1(c, c, bias=True), nn.GroupNorm(NORM_GROUPS, c)
        self.cls_conv1 = _conv1x1(c, 128, bias=True)
        self.cls_conv2 = _conv1x1(128, 64, bias=True)
        self.cls_conv3 = _conv1x1(64, 64, bias=True)
        self.cls_out = _conv1x1(64, 2, bias=True)
        self.seg_conv1 = nn.Conv2d(c, 128, kernel_size=3, padding=1)
        self.seg_conv2 = nn.Conv2d(128, 64, kernel_size=3, padding=1)
        self.seg_conv3 = nn.Conv2d(64, 64, kernel_size=3, padding=1)
        self.seg_out = nn.Conv2d(64, 2, kernel_size=3, padding=1)

    def forward(self, corr: Tensor, support_mask: Tensor | None, query_grid: tuple[int, int],
                out_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Run the head.

        Args:
            corr: [B, C, Tq, 1+hs*ws] correlation tokens from `correlation` (C = in_channels).
            support_mask: [B, Hs, Ws] float {0,1} (GT or pseudo support mask), or None for no masking.
            query_grid: (h, w) with h*w = Tq (query tokens are row-major).
            out_size: (H, W) of the returned mask logits (bilinear, align_corners=True); None keeps 2h x 2w.
        Returns:
            cls_logits [B, 2] (absent, present) and seg_logits [B, 2, H, W] (background, foreground).
        """
        b, c, tq, s = corr.shape
        h, w = query_grid
        if c != self.in_channels or s != 1 + self.support_grid[0] * self.support_grid[1] or h * w != tq:
            raise FSCSError(f"cst: correlation {tuple(corr.shape)} does not fit the head (in_channels="
                            f"{self.in_channels}, support_grid={self.support_grid}, query_grid={query_grid})")
        x, grid = corr, self.support_grid
        for block in self.blocks:
            x = block(x, support_mask, grid)  # [B, C', Tq, 1 + pooled grid]
            grid = (grid[0] // block.pool, grid[1] // block.pool)
        x = F.relu(self.mix_norm1(self.mix_conv1(x)))
        x = F.relu(self.mix_norm2(self.mix_conv2(x)))  # [B, 128, Tq, 2]
        cls_map = x[..., 0].reshape(b, -1, h, w)  # [B, 128, h, w]
        img_map = x[..., 1].reshape(b, -1, h, w)  # [B, 128, h, w]

        y = F.relu(self.cls_conv2(F.relu(self.cls_conv1(cls_map))))
        y = F.avg_pool2d(y, kernel_size=3, stride=2, padding=1)
        y = self.cls_out(F.relu(self.cls_conv3(y)))  # [B, 2, ~h/2, ~w/2]
        cls_logits = y.mean(dim=(2, 3))  # [B, 2]

        z = F.relu(self.seg_conv2(F.relu(self.seg_conv1(img_map))))  # [B, 64, h, w]
        z = F.interpolate(z, size=(2 * h, 2 * w), mode="bilinear", align_corners=True)
        z = self.seg_out(F.relu(self.seg_conv3(z)))  # [B, 2, 2h, 2w]
        if out_size is not None and tuple(out_size) != tuple(z.shape[-2:]):
            z = F.interpolate(z, size=tuple(out_size), mode="bilinear", align_corners=True)
        return cls_logits, z


def _reference_module_map() -> dict[str, str]:
    """Reference module path (without "learner.") -> our module path."""
    table = {"linear.0": "mix_conv1", "linear.1": "mix_norm1",
             "linear.3": "mix_conv2", "linear.4": "mix_norm2",
             "decoder1_cls.0": "cls_conv1", "decoder1_cls.2": "cls_conv2",
             "decoder2_cls.0": "cls_conv3", "decoder2_cls.2": "cls_out",
             "decoder1_seg.0": "seg_conv1", "decoder1_seg.2": "seg_conv2",
             "decoder2_seg.0": "seg_conv3", "decoder2_seg.2": "seg_out"}
    block = {"attn.short_cut.0": "attn.shortcut_conv", "attn.short_cut.2": "attn.shortcut_norm",
             "attn.qkv": "attn.qkv", "attn.agg.0": "attn.attn_norm", "attn.agg.2": "attn.proj",
             "attn.agg.3": "attn.proj_norm", "attn.out_norm": "attn.out_norm", "ff.ff.0": "ff.reduce",
             "ff.ff.1": "ff.reduce_norm", "ff.ff.3": "ff.expand", "ff.out_norm": "ff.out_norm"}
    for i in range(len(BLOCK_SPECS)):
        table.update({f"corrtransformer.{i}.{k}": f"blocks.{i}.{v}" for k, v in block.items()})
    return table


def _expected_reference_keys() -> set[str]:
    """Every reference head key (no prefix): convs carry .weight (+ .bias when biased), GroupNorms both."""
    no_bias = {"attn.short_cut.0", "attn.agg.2", "ff.ff.0", "ff.ff.3"}
    keys = set()
    for mod in _reference_module_map():
        keys.add(f"{mod}.weight")
        if not any(mod.endswith(nb) for nb in no_bias):
            keys.add(f"{mod}.bias")
    return keys


def convert_reference_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map the reference head's state dict (cst_head_state_dict.tsv keys) onto CSTHead's names.

    Accepts keys with or without the "learner." prefix (a Lightning checkpoint's {"state_dict": ...} is
    unwrapped); "backbone.*" keys are ignored. Raises FSCSError naming unexpected or missing keys.
    Returns {our_key: tensor} for `CSTHead.load_state_dict(..., strict=True)`.
    """
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    mod_map = _reference_module_map()
    expected = _expected_reference_keys()
    out: dict[str, Tensor] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    for key, value in sd.items():
        if key.startswith(("backbone.", "learner.backbone.")):
            continue
        bare = key[len("learner."):] if key.startswith("learner.") else key
        if bare not in expected:
            unexpected.append(key)
            continue
        mod, _, leaf = bare.rpartition(".")
        seen.add(bare)
        out[f"{mod_map[mod]}.{leaf}"] = value
    missing = sorted(expected - seen)
    if unexpected or missing:
        raise FSCSError(f"cst: reference state dict does not match cst_head_state_dict.tsv: unexpected keys "
                        f"{sorted(unexpected)[:10]}, missing keys {missing[:10]}; pass the checkpoint's "
                        f"'state_dict' (keys 'learner.*')")
    logger.debug("converted %d reference head tensors", len(out))
    return out

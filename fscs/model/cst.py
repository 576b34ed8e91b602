"""The CST head: a two-block correlation transformer over correlation tokens (`fscs.model.correlation`) with
classification and segmentation branches, and the conversion of the reference implementation's state dict."""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fscs.errors import FSCSError
from fscs.model.attention import ATTN_HEADS, Conv1x1, attend, conv1x1, kept_columns, pool_support

logger = logging.getLogger(__name__)

REFERENCE_NUM_PARAMS = 366_004
"""Learnable parameters of the reference head at in_channels=72."""
BLOCK_SPECS: tuple[tuple[int, int], ...] = ((32, 4), (128, 3))
"""(out_channels, support pool size) of the two correlation-transformer blocks."""
NORM_GROUPS = 4

# The qkv conv's 3*C' output channels are ordered (q|k|v, head, dim): q = [0, C'), k = [C', 2C'),
# v = [2C', 3C'), as in the reference checkpoints. Layout and attention: `fscs.model.attention`. Average
# pooling commutes with the (linear) 1x1 convs, so the shortcut and q convs run on the pooled tokens.
# Masked support columns get softmax weight exactly 0, so with sparse masks k, v and the attention are
# computed on the kept columns only (`COMPACT_MAX_SHARE`).

COMPACT_MAX_SHARE = 0.75
"""`CorrAttention` computes k, v and the attention on the kept support columns only (one pass per episode)
when at most this share of the batch's columns is kept; denser masks use the batched masked attention."""



def _conv1x1(cin: int, cout: int, bias: bool) -> nn.Conv2d:
    return Conv1x1(cin, cout, bias)


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
        """x: [B, Cin, Q, 1+h*w], support_mask: [B, Hs, Ws] | None, grid (h, w) -> [B, Cout, Q, 1+h'*w'].

        The reference pools the shortcut conv's and the q conv's outputs; pooling the input first is the
        same linear map (1x1 conv and average pooling commute, bias included) on 1+h'*w' instead of 1+h*w
        tokens. k and v need every support token the mask keeps: with a sparse mask (an object's pseudo- or
        GT mask typically keeps 10-25 % of the 144 columns) they and the attention run on those columns only.
        """
        hid = self.hidden
        bias = self.qkv.bias
        pooled = pool_support(x, grid, self.pool)  # [B, Cin, Q, 1+h'*w']
        shortcut = F.relu(self.shortcut_norm(self.shortcut_conv(pooled)))
        q = conv1x1(pooled, self.qkv.weight.flatten(1)[:hid], bias[:hid])
        keep = None if support_mask is None else kept_columns(support_mask, grid, x.shape[0])
        counts = None if keep is None else keep.sum(dim=1).tolist()  # one host sync (on GPU) per block
        if counts is not None and sum(counts) <= COMPACT_MAX_SHARE * keep.numel():
            # Masked columns get softmax weight exactly 0: drop them before the k/v convs, one episode at a time
            # (episodes keep different columns). Same numbers up to float rounding, a fraction of the work.
            cols = keep.nonzero()[:, 1].split(counts)
            out = torch.cat([attend(q[i:i + 1], *self._kv(x[i:i + 1].index_select(3, cols[i])), None,
                                    self.heads) for i in range(x.shape[0])])
        else:
            out = attend(q, *self._kv(x), keep, self.heads)
        # v's bias passes through the row-stochastic attention unchanged, so it is added to the pooled output
        out = out + bias[2 * hid:].view(1, hid, 1, 1)
        out = F.relu(self.proj_norm(self.proj(F.relu(self.attn_norm(out)))))
        return self.out_norm(out + shortcut)

    def _kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, Cin, Q, S] -> k, v [B, C', Q, S] without their biases.

        k's bias adds the same q.b_k to every logit of a softmax row (no effect); v's is added after the
        attention (see forward).
        """
        hid, weight = self.hidden, self.qkv.weight.flatten(1)
        if x.shape[1] < 2 * hid:  # reading x twice costs less than concatenating the k and v gradients
            return conv1x1(x, weight[hid:2 * hid], None), conv1x1(x, weight[2 * hid:], None)
        k, v = conv1x1(x, weight[hid:], None).split(hid, dim=1)
        return k, v


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
        return cls_logits, z.contiguous()


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

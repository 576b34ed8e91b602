"""Unit tests for fscs.model.cst: correlation tokens, the CST head, reference state-dict conversion."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fscs.errors import FSCSError
from fscs.model.attention import pool_support, support_attention
from fscs.model.correlation import correlation
from fscs.model.cst import REFERENCE_NUM_PARAMS, CSTHead, convert_reference_state_dict

logger = logging.getLogger(__name__)

# Keys and shapes of the reference head (copy of shared/reference/cst_head_state_dict.tsv).
REFERENCE_TSV = """\
corrtransformer.0.attn.short_cut.0.weight	32x72x1x1
corrtransformer.0.attn.short_cut.2.weight	32
corrtransformer.0.attn.short_cut.2.bias	32
corrtransformer.0.attn.qkv.weight	48x72x1x1
corrtransformer.0.attn.qkv.bias	48
corrtransformer.0.attn.agg.0.weight	16
corrtransformer.0.attn.agg.0.bias	16
corrtransformer.0.attn.agg.2.weight	32x16x1x1
corrtransformer.0.attn.agg.3.weight	32
corrtransformer.0.attn.agg.3.bias	32
corrtransformer.0.attn.out_norm.weight	32
corrtransformer.0.attn.out_norm.bias	32
corrtransformer.0.ff.ff.0.weight	16x32x1x1
corrtransformer.0.ff.ff.1.weight	16
corrtransformer.0.ff.ff.1.bias	16
corrtransformer.0.ff.ff.3.weight	32x16x1x1
corrtransformer.0.ff.out_norm.weight	32
corrtransformer.0.ff.out_norm.bias	32
corrtransformer.1.attn.short_cut.0.weight	128x32x1x1
corrtransformer.1.attn.short_cut.2.weight	128
corrtransformer.1.attn.short_cut.2.bias	128
corrtransformer.1.attn.qkv.weight	192x32x1x1
corrtransformer.1.attn.qkv.bias	192
corrtransformer.1.attn.agg.0.weight	64
corrtransformer.1.attn.agg.0.bias	64
corrtransformer.1.attn.agg.2.weight	128x64x1x1
corrtransformer.1.attn.agg.3.weight	128
corrtransformer.1.attn.agg.3.bias	128
corrtransformer.1.attn.out_norm.weight	128
corrtransformer.1.attn.out_norm.bias	128
corrtransformer.1.ff.ff.0.weight	64x128x1x1
corrtransformer.1.ff.ff.1.weight	64
corrtransformer.1.ff.ff.1.bias	64
corrtransformer.1.ff.ff.3.weight	128x64x1x1
corrtransformer.1.ff.out_norm.weight	128
corrtransformer.1.ff.out_norm.bias	128
linear.0.weight	128x128x1x1
linear.0.bias	128
linear.1.weight	128
linear.1.bias	128
linear.3.weight	128x128x1x1
linear.3.bias	128
linear.4.weight	128
linear.4.bias	128
decoder1_cls.0.weight	128x128x1x1
decoder1_cls.0.bias	128
decoder1_cls.2.weight	64x128x1x1
decoder1_cls.2.bias	64
decoder1_seg.0.weight	128x128x3x3
decoder1_seg.0.bias	128
decoder1_seg.2.weight	64x128x3x3
decoder1_seg.2.bias	64
decoder2_cls.0.weight	64x64x1x1
decoder2_cls.0.bias	64
decoder2_cls.2.weight	2x64x1x1
decoder2_cls.2.bias	2
decoder2_seg.0.weight	64x64x3x3
decoder2_seg.0.bias	64
decoder2_seg.2.weight	2x64x3x3
decoder2_seg.2.bias	2
"""
SHARED_TSV = Path(__file__).resolve().parents[3] / "shared" / "reference" / "cst_head_state_dict.tsv"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    torch.set_num_threads(1)


def _reference_shapes() -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in REFERENCE_TSV.strip().splitlines()]
    return {k: tuple(int(x) for x in s.split("x")) for k, s in rows}


def _random_reference_sd(prefix: str = "learner.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {prefix + k: torch.randn(s, generator=g) for k, s in _reference_shapes().items()}


# ---------------------------------------------------------------- parameters and reference layout

def test_parameter_count_matches_reference():
    head = CSTHead(in_channels=72)
    n = sum(p.numel() for p in head.parameters() if p.requires_grad)
    assert n == REFERENCE_NUM_PARAMS == 366_004
    # in_channels only enters block 1's shortcut (32) and qkv (48) 1x1 convs
    assert sum(p.numel() for p in CSTHead(in_channels=18).parameters()) == 366_004 - 54 * (32 + 48)


def test_embedded_tsv_equals_shared_copy():
    if not SHARED_TSV.exists():
        pytest.skip("shared reference tsv not present")
    lines = SHARED_TSV.read_text().strip().splitlines()[1:]  # drop the header
    assert lines == REFERENCE_TSV.strip().splitlines()


def test_shapes_correspond_one_to_one_with_reference():
    ref = _reference_shapes()
    ours = {k: tuple(v.shape) for k, v in CSTHead().state_dict().items()}
    converted = convert_reference_state_dict({k: torch.zeros(s) for k, s in ref.items()})
    assert len(converted) == len(ref) == len(ours) == 60
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours


def test_convert_load_strict_lands_in_right_modules():
    sd = _random_reference_sd("learner.")
    sd["backbone.blocks.0.attn.qkv.weight"] = torch.zeros(3)  # ignored
    head = CSTHead()
    head.load_state_dict(convert_reference_state_dict(sd), strict=True)
    assert head.cls_out.weight.shape == (2, 64, 1, 1)
    assert torch.equal(head.cls_out.weight, sd["learner.decoder2_cls.2.weight"])
    assert torch.equal(head.seg_out.weight, sd["learner.decoder2_seg.2.weight"])
    assert torch.equal(head.seg_conv1.bias, sd["learner.decoder1_seg.0.bias"])
    assert torch.equal(head.blocks[1].attn.qkv.weight, sd["learner.corrtransformer.1.attn.qkv.weight"])
    assert torch.equal(head.blocks[0].attn.proj_norm.bias, sd["learner.corrtransformer.0.attn.agg.3.bias"])
    assert torch.equal(head.blocks[0].ff.reduce_norm.weight, sd["learner.corrtransformer.0.ff.ff.1.weight"])
    assert torch.equal(head.mix_norm2.weight, sd["learner.linear.4.weight"])
    # without prefix, and wrapped in a Lightning checkpoint
    bare = _random_reference_sd("")
    head.load_state_dict(convert_reference_state_dict(bare), strict=True)
    assert torch.equal(head.cls_conv3.weight, bare["decoder2_cls.0.weight"])
    head.load_state_dict(convert_reference_state_dict({"state_dict": sd}), strict=True)
    assert torch.equal(head.cls_out.weight, sd["learner.decoder2_cls.2.weight"])


def test_convert_reports_missing_and_unexpected_keys():
    sd = _random_reference_sd("learner.")
    del sd["learner.linear.3.weight"]
    with pytest.raises(FSCSError, match=r"linear\.3\.weight"):
        convert_reference_state_dict(sd)
    sd = _random_reference_sd("learner.")
    sd["learner.decoder3.weight"] = torch.zeros(1)
    with pytest.raises(FSCSError, match=r"decoder3\.weight"):
        convert_reference_state_dict(sd)
    sd = _random_reference_sd("learner.")
    sd["learner.corrtransformer.0.ff.ff.0.bias"] = torch.zeros(16)  # that conv has no bias
    with pytest.raises(FSCSError, match=r"ff\.ff\.0\.bias"):
        convert_reference_state_dict(sd)


# ---------------------------------------------------------------- correlation

def _bilinear_ac(img: torch.Tensor, out: int) -> torch.Tensor:
    """Naive bilinear align_corners=True resize of [h, w, D] to [out, out, D]."""
    h, w, _ = img.shape

    def taps(n_in: int, i: int) -> tuple[int, int, float]:
        src = i * (n_in - 1) / (out - 1) if out > 1 else 0.0
        i0 = min(int(math.floor(src)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), src - i0

    res = torch.zeros(out, out, img.shape[2], dtype=img.dtype)
    for y in range(out):
        y0, y1, fy = taps(h, y)
        for x in range(out):
            x0, x1, fx = taps(w, x)
            res[y, x] = ((1 - fy) * (1 - fx) * img[y0, x0] + (1 - fy) * fx * img[y0, x1]
                         + fy * (1 - fx) * img[y1, x0] + fy * fx * img[y1, x1])
    return res


def _naive_correlation(qt, st, heads, sgrid, so):
    b, n_layers, tq1, d = qt.shape
    dh = d // heads
    out = torch.zeros(b, heads * n_layers, tq1 - 1, 1 + so * so, dtype=qt.dtype)
    for bi in range(b):
        for li in range(n_layers):
            sup = _bilinear_ac(st[bi, li, 1:].reshape(*sgrid, d), so).reshape(so * so, d)
            sup = torch.cat([st[bi, li, :1], sup], dim=0)
            for hi in range(heads):
                for qi in range(tq1 - 1):
                    qv = qt[bi, li, 1 + qi, hi * dh:(hi + 1) * dh]
                    for si in range(sup.shape[0]):
                        sv = sup[si, hi * dh:(hi + 1) * dh]
                        out[bi, hi * n_layers + li, qi, si] = torch.dot(qv, sv) / (qv.norm() * sv.norm())
    return out


def test_correlation_matches_naive_loop():
    qt = torch.randn(2, 3, 1 + 3 * 4, 8, dtype=torch.float64)
    st = torch.randn(2, 3, 1 + 4 * 5, 8, dtype=torch.float64)
    got = correlation(qt, st, num_heads=2, query_grid=(3, 4), support_grid=(4, 5), support_out=3)
    want = _naive_correlation(qt, st, 2, (4, 5), 3)
    assert got.shape == (2, 6, 12, 10)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_correlation_under_cpu_autocast_is_stored_in_autocast_dtype():
    """Like a matmul, correlation under autocast computes and stores in autocast's dtype (halving the largest
    frozen tensor of an episode); the values stay the float32 cosines up to bf16 rounding."""
    qt, st = torch.randn(2, 3, 1 + 3 * 4, 8), torch.randn(2, 3, 1 + 4 * 5, 8)
    want = correlation(qt, st, num_heads=2, query_grid=(3, 4), support_grid=(4, 5), support_out=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = correlation(qt, st, num_heads=2, query_grid=(3, 4), support_grid=(4, 5), support_out=3)
    assert want.dtype == torch.float32 and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_correlation_default_size_and_range():
    qt, st = torch.randn(2, 6, 1 + 256, 192), torch.randn(2, 6, 1 + 100, 192)  # 16x16 query, 10x10 support
    corr = correlation(qt, st, num_heads=3)
    assert corr.shape == (2, 18, 256, 145)
    assert corr.abs().max() <= 1 + 1e-5
    # support CLS is column 0 and is not resized
    cls_cos = F.cosine_similarity(qt[0, 4, 1 + 17, 64:128], st[0, 4, 0, 64:128], dim=0)
    torch.testing.assert_close(corr[0, 1 * 6 + 4, 17, 0], cls_cos)


def test_correlation_channel_order_is_head_major():
    n_layers, heads, dh = 4, 3, 4
    qt, st = torch.randn(1, n_layers, 1 + 9, heads * dh), torch.randn(1, n_layers, 1 + 16, heads * dh)
    base = correlation(qt, st, heads)
    layer, head = 2, 1
    qt2 = qt.clone()
    qt2[:, layer, :, head * dh:(head + 1) * dh] += torch.randn(1, 1 + 9, dh)
    changed = (correlation(qt2, st, heads) - base).abs().flatten(2).amax(-1)[0]  # [heads*L]
    assert changed.argmax().item() == head * n_layers + layer
    assert (changed > 1e-6).sum().item() == 1


def test_correlation_bad_inputs():
    with pytest.raises(FSCSError):
        correlation(torch.randn(1, 2, 1 + 10, 8), torch.randn(1, 2, 1 + 16, 8), 2)  # 10 not square
    with pytest.raises(FSCSError):
        correlation(torch.randn(1, 2, 1 + 9, 8), torch.randn(1, 2, 1 + 16, 8), 3)  # 8 % 3
    with pytest.raises(FSCSError):
        correlation(torch.randn(1, 2, 1 + 9, 8), torch.randn(1, 3, 1 + 16, 8), 2)  # L mismatch


# ---------------------------------------------------------------- attention

def _qkv(b=2, c=16, q=5, sq=1 + 4, h=4, w=4):
    return torch.randn(b, c, q, sq), torch.randn(b, c, q, 1 + h * w), torch.randn(b, c, q, 1 + h * w)


def test_attention_masks_zero_columns_only():
    q, k, v = _qkv()
    mask = torch.zeros(2, 16, 16)
    mask[:, :, 8:] = 1.0  # right half foreground
    out = support_attention(q, k, v, mask, (4, 4))
    zero_cols = (F.interpolate(mask[:, None], (4, 4), mode="bilinear", align_corners=True).flatten(1) == 0)
    assert zero_cols[0].sum() == 8  # left two columns of the 4x4 grid
    cols = 1 + torch.nonzero(zero_cols[0]).flatten()
    k2, v2 = k.clone(), v.clone()
    k2[..., cols] += 5 * torch.randn_like(k2[..., cols])
    v2[..., cols] += 5 * torch.randn_like(v2[..., cols])
    torch.testing.assert_close(support_attention(q, k2, v2, mask, (4, 4)), out)
    # an unmasked column, or the CLS column, does matter
    for col in (0, 1 + 3):
        v3 = v.clone()
        v3[..., col] += 1.0
        assert not torch.allclose(support_attention(q, k, v3, mask, (4, 4)), out)
    # without the mask, the zero-mask columns matter too
    unmasked = support_attention(q, k, v, None, (4, 4))
    assert not torch.allclose(support_attention(q, k2, v2, None, (4, 4)), unmasked)


def test_attention_all_zero_mask_keeps_cls_and_ones_mask_is_no_mask():
    q, k, v = _qkv()
    out = support_attention(q, k, v, torch.zeros(2, 8, 8), (4, 4))
    torch.testing.assert_close(out, v[..., :1].expand_as(out))  # only the CLS column survives
    torch.testing.assert_close(support_attention(q, k, v, torch.ones(2, 8, 8), (4, 4)),
                               support_attention(q, k, v, None, (4, 4)))


def test_attention_head_split_is_contiguous_channel_blocks():
    q, k, v = _qkv(c=16)  # 8 heads of 2 channels: channel c -> head c // 2
    base = support_attention(q, k, v, None, (4, 4), heads=8)
    k2 = k.clone()
    k2[:, 6:8] += torch.randn_like(k2[:, 6:8])  # head 3
    diff = (support_attention(q, k2, v, None, (4, 4), heads=8) - base).abs().amax(dim=(0, 2, 3))
    assert (diff[6:8] > 1e-6).all() and (torch.cat([diff[:6], diff[8:]]) == 0).all()


def test_attention_matches_unscaled_softmax_formula():
    q, k, v = _qkv(b=1, c=16, q=2)
    out = support_attention(q, k, v, None, (4, 4), heads=8)  # 2 channels per head, no 1/sqrt(2) scaling
    qh, kh, vh = (t[0].reshape(8, 2, *t.shape[2:]) for t in (q, k, v))
    logits = torch.einsum("gctl,gctm->gtlm", qh, kh)
    want = torch.einsum("gtlm,gctm->gctl", logits.softmax(-1), vh).reshape(16, *q.shape[2:])
    torch.testing.assert_close(out[0], want)


def test_attention_masks_exact_zeros_of_bilinear_align_corners_resize():
    # 8x8 -> 4x4 with align_corners samples rows/cols 0, 7/3, 14/3, 7: a single 1 at pixel (3, 3) gives
    # grid cell (1, 1) the value (1/3)^2 > 0 (kept) and exactly 0 elsewhere (masked); nearest or a 0.5
    # threshold would mask everything.
    q, k, v = _qkv(b=1, c=8, q=3)
    mask = torch.zeros(1, 8, 8)
    mask[0, 3, 3] = 1.0
    out = support_attention(q, k, v, mask, (4, 4), heads=8)
    keep = torch.tensor([0, 1 + 1 * 4 + 1])  # CLS and grid cell (1, 1)
    logits = torch.einsum("ctl,ctm->ctlm", q[0], k[0, ..., keep])
    want = torch.einsum("ctlm,ctm->ctl", logits.softmax(-1), v[0, ..., keep])
    torch.testing.assert_close(out[0], want)


def test_attention_mask_resize_samples_the_corner_aligned_grid():
    """align_corners=True samples rows/cols 0, 7/3, 14/3, 7 of an 8x8 mask: a 1 at pixel (1, 1) falls between
    samples and keeps no cell (a pixel-centred resize would sample 0.5 and keep cell (0, 0)); a 1 at (3, 3)
    keeps cell (1, 1)."""
    q, k, v = _qkv(b=1, c=8, q=3)
    mask = torch.zeros(1, 8, 8)
    mask[0, 1, 1] = mask[0, 3, 3] = 1.0
    out = support_attention(q, k, v, mask, (4, 4), heads=8)
    keep = torch.tensor([0, 1 + 1 * 4 + 1])  # CLS and grid cell (1, 1) only
    logits = torch.einsum("ctl,ctm->ctlm", q[0], k[0, ..., keep])
    want = torch.einsum("ctlm,ctm->ctl", logits.softmax(-1), v[0, ..., keep])
    torch.testing.assert_close(out[0], want)


@pytest.mark.parametrize("mode", ["bf16", "autocast"])
def test_attention_low_precision_cpu_path_is_the_same_unscaled_formula(mode):
    """On CPU, bf16 inputs (or CPU autocast) run the attention in fp32: still softmax(q.k), no 1/sqrt(d)."""
    q, k, v = _qkv(b=1, c=16, q=2)
    q, k, v = (3 * t for t in (q, k, v))
    qh, kh, vh = (t[0].bfloat16().float().reshape(8, 2, *t.shape[2:]) for t in (q, k, v))
    logits = torch.einsum("gctl,gctm->gtlm", qh, kh)
    want = torch.einsum("gtlm,gctm->gctl", logits.softmax(-1), vh).reshape(16, *q.shape[2:])
    if mode == "bf16":
        out = support_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, (4, 4), heads=8)
        assert out.dtype == torch.bfloat16
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = support_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), None,
                                    (4, 4), heads=8)
    torch.testing.assert_close(out[0].float(), want, atol=0.05, rtol=0.02)


def test_pool_support_averages_grid_and_keeps_cls():
    x = torch.randn(2, 3, 4, 1 + 5 * 5)
    out = pool_support(x, (5, 5), 2)  # 5x5 -> 2x2 (floor, like AvgPool with padding 0)
    assert out.shape == (2, 3, 4, 1 + 4)
    assert torch.equal(out[..., 0], x[..., 0])
    grid = x[..., 1:].reshape(2, 3, 4, 5, 5)
    torch.testing.assert_close(out[..., 1 + 1 * 2 + 0], grid[..., 2:4, 0:2].mean(dim=(-1, -2)))


# ---------------------------------------------------------------- head

def test_head_splits_cls_and_image_maps_row_major():
    head = CSTHead(in_channels=8).eval()
    seen: dict[str, torch.Tensor] = {}
    head.mix_norm2.register_forward_hook(lambda m, i, o: seen.__setitem__("mix", o))
    head.cls_conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("cls", i[0]))
    head.seg_conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("seg", i[0]))
    with torch.no_grad():
        head(torch.randn(2, 8, 4 * 6, 145), None, (4, 6), None)
    mix = F.relu(seen["mix"])  # [B, 128, Tq, 2]
    assert mix.shape == (2, 128, 24, 2)
    torch.testing.assert_close(seen["cls"], mix[..., 0].reshape(2, 128, 4, 6))
    torch.testing.assert_close(seen["seg"], mix[..., 1].reshape(2, 128, 4, 6))

@pytest.mark.parametrize("in_ch,grid,out_size",
                         [(18, (16, 16), (128, 128)), (8, (8, 8), (40, 48)), (8, (6, 10), None)])
def test_head_output_shapes(in_ch, grid, out_size):
    head = CSTHead(in_channels=in_ch)
    corr = torch.randn(2, in_ch, grid[0] * grid[1], 145)
    cls, seg = head(corr, torch.ones(2, 32, 32), grid, out_size)
    assert cls.shape == (2, 2)
    assert seg.shape == (2, 2, *(out_size or (2 * grid[0], 2 * grid[1])))
    assert torch.isfinite(cls).all() and torch.isfinite(seg).all()


def test_head_mask_changes_output_and_none_equals_all_ones():
    head = CSTHead(in_channels=8).eval()
    corr = torch.randn(2, 8, 64, 145)
    mask = torch.zeros(2, 24, 24)
    mask[:, 4:14, 6:20] = 1
    with torch.no_grad():
        a = head(corr, mask, (8, 8), (16, 16))
        b = head(corr, torch.ones(2, 24, 24), (8, 8), (16, 16))
        c = head(corr, None, (8, 8), (16, 16))
    assert not torch.allclose(a[1], b[1])
    torch.testing.assert_close(b[1], c[1])
    torch.testing.assert_close(b[0], c[0])


def _head_step(head, corr, mask):
    """Outputs and every parameter's gradient after one loss."""
    head.zero_grad()
    cls, seg = head(corr, mask, (8, 8), (16, 16))
    (cls.logsumexp(-1).sum() + (seg**2).mean()).backward()
    return [cls.detach(), seg.detach()] + [p.grad.clone() for p in head.parameters()]


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_compacted_attention_equals_masked_attention(monkeypatch, kind):
    """Sparse support masks take the compacted path (k, v and the attention on the kept columns only, one
    episode at a time); it must give the batched masked attention's numbers and gradients."""
    import fscs.model.cst as cst

    torch.manual_seed(0)
    head = CSTHead(in_channels=8).double()
    corr = torch.randn(4, 8, 64, 145, dtype=torch.float64)
    if kind == "sparse":  # objects of different sizes, one empty mask (only CLS kept): different column counts
        mask = torch.zeros(4, 48, 48, dtype=torch.float64)
        mask[0, 10:20, 5:30], mask[1, 40:, 40:], mask[3, 0:30, 0:30] = 1, 1, 1
    else:  # a zero corner: most columns kept in both blocks -> the batched masked path
        mask = torch.ones(4, 48, 48, dtype=torch.float64)
        mask[:, :10, :10] = 0
    calls: list[int] = []
    real_attend = cst.attend
    monkeypatch.setattr(cst, "attend", lambda q, *a, **k: calls.append(q.shape[0]) or real_attend(q, *a, **k))
    got = _head_step(head, corr, mask)
    assert calls == ([1] * 8 if kind == "sparse" else [4, 4])  # 2 blocks x (4 episodes | one batch)
    monkeypatch.setattr(cst, "COMPACT_MAX_SHARE", -1.0)  # force the batched masked attention
    want = _head_step(head, corr, mask)
    assert calls[-2:] == [4, 4]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradient_reaches_every_parameter():
    head = CSTHead(in_channels=12)
    corr = torch.randn(2, 12, 100, 145)
    mask = (torch.rand(2, 20, 20) > 0.4).float()
    cls, seg = head(corr, mask, (10, 10), (20, 20))
    loss = F.cross_entropy(cls, torch.tensor([0, 1])) + F.cross_entropy(seg, torch.randint(0, 2, (2, 20, 20)))
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_deterministic():
    corr, mask = torch.randn(2, 8, 64, 145), (torch.rand(2, 16, 16) > 0.5).float()
    torch.manual_seed(3)
    h1 = CSTHead(in_channels=8)
    torch.manual_seed(3)
    h2 = CSTHead(in_channels=8)
    o1, o2, o3 = (h(corr, mask, (8, 8), (32, 32)) for h in (h1, h1, h2))
    for a, b in ((o1, o2), (o1, o3)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_head_bad_inputs():
    head = CSTHead(in_channels=8)
    with pytest.raises(FSCSError):
        head(torch.randn(1, 9, 64, 145), None, (8, 8), None)  # channels
    with pytest.raises(FSCSError):
        head(torch.randn(1, 8, 64, 101), None, (8, 8), None)  # support tokens
    with pytest.raises(FSCSError):
        head(torch.randn(1, 8, 64, 145), None, (8, 9), None)  # query grid
    with pytest.raises(FSCSError):
        CSTHead(in_channels=8, support_grid=8)  # does not pool to 1x1
    with pytest.raises(FSCSError):
        head(torch.randn(1, 8, 64, 145), torch.ones(1, 1, 16, 16), (8, 8), None)  # mask [B, 1, H, W]


def test_real_size_forward_shapes():
    """The paper's size: ViT-S/8 at 400 px (72 channels, 50x50 query grid) to 400x400 logits."""
    head = CSTHead(in_channels=72).eval()
    corr = torch.randn(1, 72, 2500, 145)
    with torch.no_grad():
        cls, seg = head(corr, torch.ones(1, 400, 400), (50, 50), (400, 400))
    assert cls.shape == (1, 2) and seg.shape == (1, 2, 400, 400)
    assert torch.isfinite(seg).all()


def test_correlation_pairs_each_query_with_r_supports():
    """Passing each query once with R supports equals repeating the query R times."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 1 + 16, 12, generator=g)
    s = torch.randn(2 * 3, 3, 1 + 16, 12, generator=g)
    once = correlation(q, s, 2, (4, 4), (4, 4))
    repeated = correlation(q.repeat_interleave(3, 0), s, 2, (4, 4), (4, 4))
    assert once.shape == (6, 6, 16, 145)
    assert torch.equal(once, repeated)


# ---------------------------------------------------------------- head vs a plain transcription of cst.md

def _naive_block(sd, pre, x, mask, grid, pool, cout):
    """One correlation-transformer block written straight from cst.md with the reference's key names."""
    def conv(t, name, bias=True):
        return F.conv2d(t, sd[f"{pre}{name}.weight"], sd.get(f"{pre}{name}.bias") if bias else None)

    def gn(t, name):
        return F.group_norm(t, 4, sd[f"{pre}{name}.weight"], sd[f"{pre}{name}.bias"])

    def pool_grid(t):  # average-pool the support image tokens over their h x w grid, CLS kept
        b, c, q, _ = t.shape
        img = t[..., 1:].reshape(b, c * q, *grid)
        pooled = F.avg_pool2d(img, pool, pool).reshape(b, c, q, -1)
        return torch.cat([t[..., :1], pooled], dim=-1)

    hid = cout // 2
    shortcut = F.relu(gn(pool_grid(conv(x, "attn.short_cut.0", bias=False)), "attn.short_cut.2"))
    q, k, v = conv(x, "attn.qkv").split(hid, dim=1)
    q = pool_grid(q)
    b, _, nq, sq = q.shape
    dh = hid // 8
    qh, kh, vh = (t.reshape(b, 8, dh, nq, t.shape[-1]) for t in (q, k, v))
    logits = torch.einsum("bhdql,bhdqm->bhqlm", qh, kh)  # no 1/sqrt(d)
    if mask is not None:
        small = F.interpolate(mask[:, None].to(x.dtype), size=grid, mode="bilinear", align_corners=True)
        drop = torch.cat([torch.zeros(b, 1, dtype=torch.bool), small.flatten(1) == 0], dim=1)
        logits = logits.masked_fill(drop[:, None, None, None, :], -1e9)
    out = torch.einsum("bhqlm,bhdqm->bhdql", logits.softmax(-1), vh).reshape(b, hid, nq, sq)
    out = F.relu(gn(conv(F.relu(gn(out, "attn.agg.0")), "attn.agg.2", bias=False), "attn.agg.3"))
    x = gn(out + shortcut, "attn.out_norm")
    ff = conv(F.relu(gn(conv(x, "ff.ff.0", bias=False), "ff.ff.1")), "ff.ff.3", bias=False)
    return gn(ff + x, "ff.out_norm")


def _naive_head(sd, corr, mask, query_grid, out_size):
    x, grid = corr, (12, 12)
    for i, (cout, pool) in enumerate(((32, 4), (128, 3))):
        x = _naive_block(sd, f"corrtransformer.{i}.", x, mask, grid, pool, cout)
        grid = (grid[0] // pool, grid[1] // pool)
    x = F.relu(F.group_norm(F.conv2d(x, sd["linear.0.weight"], sd["linear.0.bias"]), 4,
                            sd["linear.1.weight"], sd["linear.1.bias"]))
    x = F.relu(F.group_norm(F.conv2d(x, sd["linear.3.weight"], sd["linear.3.bias"]), 4,
                            sd["linear.4.weight"], sd["linear.4.bias"]))
    b, h, w = x.shape[0], *query_grid
    cls_map, img_map = x[..., 0].reshape(b, 128, h, w), x[..., 1].reshape(b, 128, h, w)

    def c(t, name, pad=0):
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=pad)

    y = F.relu(c(F.relu(c(cls_map, "decoder1_cls.0")), "decoder1_cls.2"))
    y = F.avg_pool2d(y, 3, stride=2, padding=1)
    cls = c(F.relu(c(y, "decoder2_cls.0")), "decoder2_cls.2").mean(dim=(2, 3))
    z = F.relu(c(F.relu(c(img_map, "decoder1_seg.0", 1)), "decoder1_seg.2", 1))
    z = F.interpolate(z, size=(2 * h, 2 * w), mode="bilinear", align_corners=True)
    z = c(F.relu(c(z, "decoder2_seg.0", 1)), "decoder2_seg.2", 1)
    return cls, F.interpolate(z, size=out_size, mode="bilinear", align_corners=True)


@pytest.mark.parametrize("masked", ["sparse", "dense", "none"])
def test_head_with_reference_weights_equals_a_plain_transcription_of_the_method(masked):
    """Loaded with a reference state dict, the head computes what cst.md describes (convs, pooling, masked
    unscaled attention, residuals, norms, ReLUs, branches, upsampling), on every attention path."""
    ref = {k: 0.5 * v.double() for k, v in _random_reference_sd("").items()}
    head = CSTHead().double().eval()
    head.load_state_dict(convert_reference_state_dict(ref), strict=True)
    g = torch.Generator().manual_seed(11)
    corr = torch.randn(2, 72, 4 * 5, 145, generator=g, dtype=torch.float64)
    mask = None
    if masked != "none":
        fill = torch.zeros if masked == "sparse" else torch.ones
        mask = fill(2, 24, 24, dtype=torch.float64)
        mask[0, 3:9, 2:12], mask[1, 12:, 14:] = 1, (1 if masked == "sparse" else 0)
    with torch.no_grad():
        cls, seg = head(corr, mask, (4, 5), (9, 13))
    want_cls, want_seg = _naive_head(ref, corr, mask, (4, 5), (9, 13))
    torch.testing.assert_close(cls, want_cls, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(seg, want_seg, rtol=1e-9, atol=1e-9)

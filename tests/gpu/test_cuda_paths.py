"""CUDA paths: bf16 forward/backward of the model, the head on CUDA vs CPU, fused attention vs unfused q/k."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from fscs.losses import fscs_loss
from fscs.model.backbone import FrozenBackbone
from fscs.model.correlation import correlation
from fscs.model.cst import CSTHead
from fscs.model.fscs_model import FSCSModel

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _setup():
    torch.set_num_threads(1)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # exact fp32 comparisons
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _unfused_reference(backbone: FrozenBackbone, images: torch.Tensor):
    """Plain timm forward, non-fused attention: every block's normed tokens, the last block's q/k by hook."""
    model = backbone.model
    saved = [blk.attn.fused_attn for blk in model.blocks]
    seen: list[torch.Tensor] = []
    attn = model.blocks[-1].attn
    handle = attn.qkv.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        for blk in model.blocks:
            blk.attn.fused_attn = False
        with torch.no_grad():
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
            tokens = []
            for blk in model.blocks:
                x = blk(x)
                tokens.append(model.norm(x))
    finally:
        handle.remove()
        for blk, f in zip(model.blocks, saved):
            blk.attn.fused_attn = f
    b, n, _ = seen[0].shape
    qkv = seen[0].reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return torch.stack(tokens, dim=1), qkv[0], qkv[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backbone_equals_unfused_qk_extraction(dtype: torch.dtype) -> None:
    backbone = FrozenBackbone("vit_small_patch8_224.dino", None, 64).cuda()
    assert all(blk.attn.fused_attn for blk in backbone.model.blocks)
    images = torch.randn(3, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = backbone(images)
        tokens, q, k = _unfused_reference(backbone, images)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    assert out.tokens.shape == (3, 12, 1 + 64, 384) and out.q.shape == (3, 6, 65, 64)
    torch.testing.assert_close(out.q.float(), q.float(), **tol)
    torch.testing.assert_close(out.k.float(), k.float(), **tol)
    torch.testing.assert_close(out.tokens.float(), tokens.float(), **tol)


@pytest.mark.parametrize("mask_kind", ["dense", "sparse"])
def test_head_on_cuda_matches_cpu(mask_kind: str) -> None:
    """dense: the batched masked attention; sparse (one box per image): k, v and the attention on the kept
    support columns only, one episode at a time."""
    torch.manual_seed(0)
    head = CSTHead(in_channels=18)
    corr = torch.randn(2, 18, 64, 145)
    mask = (torch.rand(2, 32, 32) > 0.5).float()
    if mask_kind == "sparse":
        mask = torch.zeros(2, 32, 32)
        mask[0, 4:12, 6:14], mask[1, 20:30, 2:20] = 1, 1
    target = torch.randint(0, 2, (2, 32, 32))
    results = []
    for device in ("cpu", "cuda"):
        h = CSTHead(in_channels=18).to(device)
        h.load_state_dict(head.state_dict())
        cls, seg = h(corr.to(device), mask.to(device), (8, 8), (32, 32))
        tgt = target.to(device)
        (F.cross_entropy(seg, tgt) + F.cross_entropy(cls, tgt[:, 0, 0])).backward()
        grads = {n: p.grad.cpu() for n, p in h.named_parameters()}
        results.append((cls.detach().cpu(), seg.detach().cpu(), grads))
    (c0, s0, g0), (c1, s1, g1) = results
    torch.testing.assert_close(c1, c0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s1, s0, rtol=1e-4, atol=1e-5)
    for name in g0:
        if name.endswith("attn.qkv.bias"):
            continue  # k's bias: true gradient 0, both sides are rounding noise
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-3, atol=1e-6, msg=name)


def test_correlation_under_cuda_autocast_is_bf16_and_close() -> None:
    qt, st = torch.randn(2, 6, 1 + 64, 192, device="cuda"), torch.randn(2, 6, 1 + 64, 192, device="cuda")
    ref = correlation(qt, st, 3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = correlation(qt, st, 3)
    assert low.dtype == torch.bfloat16 and low.shape == ref.shape == (2, 18, 64, 145)
    torch.testing.assert_close(low.float(), ref, rtol=0, atol=2e-2)


@pytest.mark.parametrize("regime", ["weak", "full"])
def test_bf16_forward_backward_of_the_model(regime: str) -> None:
    torch.manual_seed(0)
    model = FSCSModel.build("fscs_vit_tiny_patch8", image_size=64).cuda()
    query = torch.randn(2, 3, 64, 64, device="cuda")
    support = torch.randn(2, 2, 1, 3, 64, 64, device="cuda")
    presence = torch.tensor([[1.0, 0.0], [1.0, 1.0]], device="cuda")
    masks = (torch.rand(2, 2, 1, 64, 64, device="cuda") > 0.5).float() if regime == "full" else None
    target = torch.randint(0, 2, (2, 2, 64, 64), device="cuda")
    outs = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model.head.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = model.forward_episode(query, support, masks, regime=regime, query_presence=presence)
            seg_target = target if regime == "full" else out.pseudo_query.long()
            loss, _ = fscs_loss(out.cls_logits.float(), out.mask_logits.float(), presence, seg_target)
        loss.backward()
        grads = [p.grad for p in model.head.parameters()]
        assert torch.isfinite(loss)
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        outs[name] = (out.cls_logits.detach().float().softmax(-1),
                      out.mask_logits.detach().float().softmax(2), float(loss.detach()))
    assert outs["bf16"][0].shape == (2, 2, 2) and outs["bf16"][1].shape == (2, 2, 2, 64, 64)
    torch.testing.assert_close(outs["bf16"][0], outs["fp32"][0], rtol=0, atol=0.1)
    assert (outs["bf16"][1] - outs["fp32"][1]).abs().mean() < 0.05
    assert abs(outs["bf16"][2] - outs["fp32"][2]) < 0.1 * max(1.0, abs(outs["fp32"][2]))


def test_precision_auto_is_bf16_on_cuda():
    from fscs.runtime import resolve_precision

    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


def test_ddp_nccl_bf16_step_of_the_head(tmp_path):
    """A 1-GPU machine runs one rank, and the trainer wraps the head in DDP only for several: here a 1-rank
    NCCL group wraps it anyway, so DistributedDataParallel, NCCL's gradient all-reduce and bf16 autocast are
    exercised together on CUDA; the gradients must match the unwrapped head's."""
    import copy

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = FSCSModel.build("fscs_vit_tiny_patch8", image_size=64).cuda()
        plain = copy.deepcopy(model.head)
        wrapped = DistributedDataParallel(model.head, device_ids=[torch.cuda.current_device()])
        query = torch.randn(2, 3, 64, 64, device="cuda")
        support = torch.randn(2, 2, 1, 3, 64, 64, device="cuda")
        masks = (torch.rand(2, 2, 1, 64, 64, device="cuda") > 0.5).float()
        presence = torch.tensor([[1.0, 0.0], [1.0, 1.0]], device="cuda")
        target = torch.randint(0, 2, (2, 2, 64, 64), device="cuda")
        grads = {}
        for name, head in (("ddp", wrapped), ("plain", plain)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = model.encode_episode(query, support)
                out = model.decode_episode(feats, masks, "full", head=head)
                loss, _ = fscs_loss(out.cls_logits.float(), out.mask_logits.float(), presence, target)
            loss.backward()
            module = head.module if isinstance(head, DistributedDataParallel) else head
            grads[name] = [p.grad.float() for p in module.parameters()]
        assert all(torch.isfinite(g).all() for g in grads["ddp"])
        assert sum(float(g.abs().sum()) for g in grads["ddp"]) > 0
        for a, b in zip(grads["ddp"], grads["plain"]):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)
    finally:
        dist.destroy_process_group()

"""Tests for the frozen timm backbone: shapes, q/k, frozen behaviour, weights files, pos-embed resampling."""
from __future__ import annotations

import argparse
import hashlib
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from fscs.errors import FSCSError
from fscs.model.backbone import BackboneOutput, FrozenBackbone
from fscs.model.backbone_specs import BACKBONES, build_timm_model
from fscs.model.backbone_weights import resample_pos_embed


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _drop_regs(x: torch.Tensor, num_prefix: int, dim: int = 1) -> torch.Tensor:
    """Keep CLS (index 0) and the patch tokens (after the prefix) along `dim`."""
    return torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, num_prefix, x.shape[dim] - num_prefix)], dim=dim)


def _qk_by_hook(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, heads, N, dh] of the last block, captured from its qkv linear during a plain timm forward."""
    seen: list[torch.Tensor] = []
    attn = model.blocks[-1].attn
    handle = attn.qkv.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model.forward_features(images)
    handle.remove()
    b, n, _ = seen[0].shape
    qkv = seen[0].reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(qkv[0]), attn.k_norm(qkv[1])


# (name, test image size): small sizes keep CPU forwards fast.
CONFIGS = [
    ("vit_small_patch8_224.dino", 64),
    ("vit_small_patch16_224.dino", 64),
    ("fscs_vit_tiny_patch8", 64),
    ("vit_base_patch16_224.dino", 32),
    ("vit_small_patch14_reg4_dinov2.lvd142m", 42),
]


@pytest.mark.parametrize("name,size", CONFIGS)
def test_named_config_shapes_and_values(name: str, size: int) -> None:
    backbone = FrozenBackbone(name, None, size)
    spec = backbone.spec
    g = size // spec.patch_size
    images = torch.randn(2, 3, size, size)
    out = backbone(images)
    assert isinstance(out, BackboneOutput)
    assert backbone.grid == (g, g)
    assert (backbone.num_layers, backbone.num_heads) == (spec.depth, spec.num_heads)
    assert out.tokens.shape == (2, spec.depth, 1 + g * g, spec.embed_dim)
    assert out.q.shape == out.k.shape == (2, spec.num_heads, 1 + g * g, spec.embed_dim // spec.num_heads)
    assert backbone.identity == {"name": name, "weights_sha256": "random-init-seed0", "image_size": size,
                                 "pos_resample": "none"}

    model, prefix = backbone.model, backbone.model.num_prefix_tokens
    assert prefix == 1 + spec.num_reg_tokens
    with torch.no_grad():
        final = model.forward_features(images)
        inter = model.forward_intermediates(images, norm=True, output_fmt="NLC", intermediates_only=True,
                                            return_prefix_tokens=True)
    torch.testing.assert_close(out.tokens[:, -1], _drop_regs(final, prefix), rtol=1e-5, atol=1e-5)
    for layer, (patches, prefix_tokens) in enumerate(inter):
        torch.testing.assert_close(out.tokens[:, layer, 1:], patches, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.tokens[:, layer, 0], prefix_tokens[:, 0], rtol=1e-5, atol=1e-5)
    q, k = _qk_by_hook(model, images)
    torch.testing.assert_close(out.q, _drop_regs(q, prefix, dim=2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.k, _drop_regs(k, prefix, dim=2), rtol=1e-5, atol=1e-5)


def test_registry_defaults() -> None:
    assert BACKBONES["vit_small_patch8_224.dino"].default_image_size == 400
    assert BACKBONES["vit_small_patch16_224.dino"].default_image_size == 400
    tiny = BACKBONES["fscs_vit_tiny_patch8"]
    assert (tiny.embed_dim, tiny.depth, tiny.num_heads, tiny.patch_size, tiny.default_image_size) == (
        192, 6, 3, 8, 128)
    assert BACKBONES["vit_small_patch14_reg4_dinov2.lvd142m"].num_reg_tokens == 4
    for name in ("vit_base_patch8_224.dino", "vit_base_patch14_reg4_dinov2.lvd142m"):
        spec = BACKBONES[name]
        model = build_timm_model(spec, spec.patch_size * 2)  # checks spec against the built model
        assert len(model.blocks) == spec.depth


def test_vit_s8_matches_reference_parameter_count() -> None:
    backbone = FrozenBackbone("vit_small_patch8_224.dino", None, 224)
    assert sum(p.numel() for p in backbone.parameters()) == 21_670_272
    assert backbone.grid == (28, 28)


def test_bad_image_size_and_name() -> None:
    with pytest.raises(FSCSError, match="multiple of the patch size 8"):
        FrozenBackbone("fscs_vit_tiny_patch8", None, 60)
    with pytest.raises(FSCSError, match="unknown backbone"):
        FrozenBackbone("resnet50", None, 64)
    backbone = FrozenBackbone("fscs_vit_tiny_patch8", None, 32)
    with pytest.raises(ValueError, match="expects images"):
        backbone(torch.randn(1, 3, 64, 64))


def test_frozen_no_grad_and_always_eval() -> None:
    backbone = FrozenBackbone("fscs_vit_tiny_patch8", None, 32)
    backbone.model.pos_drop = nn.Dropout(0.5)  # would randomise outputs if training mode leaked through
    assert all(not p.requires_grad for p in backbone.parameters())
    returned = backbone.train(True)
    assert returned is backbone
    assert not backbone.training and all(not m.training for m in backbone.modules())
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    first, second = backbone(images), backbone(images)
    assert not first.tokens.requires_grad and not first.q.requires_grad
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.k, second.k)


def _dino_reference_resample(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Independent re-implementation of DINO's interpolate_pos_encoding for a square grid."""
    cls, patch = pos[:, :1], pos[:, 1:]
    old = int(math.sqrt(patch.shape[1]))
    patch = patch.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / old
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)


@pytest.mark.parametrize("old,new", [(28, 50), (28, 8), (14, 25)])
def test_dino_resample_matches_reference_and_differs_from_timm(old: int, new: int) -> None:
    pos = torch.randn(1, 1 + old * old, 16)
    dino = resample_pos_embed(pos, (new, new), 1, "dino")
    assert dino.shape == (1, 1 + new * new, 16)
    torch.testing.assert_close(dino, _dino_reference_resample(pos, new), rtol=0, atol=1e-6)
    assert torch.equal(dino[:, 0], pos[:, 0])
    timm_way = resample_pos_embed(pos, (new, new), 1, "timm")
    expected_timm = resample_abs_pos_embed(pos, new_size=[new, new], num_prefix_tokens=1)
    torch.testing.assert_close(timm_way, expected_timm)
    gap = (dino - timm_way).abs().max().item()
    assert 1e-4 < gap < pos.abs().max().item()  # a real but bounded difference
    assert resample_pos_embed(pos, (old, old), 1, "dino") is pos
    no_prefix = resample_pos_embed(pos[:, 1:], (new, new), 0, "dino")
    torch.testing.assert_close(no_prefix, dino[:, 1:])


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_dino_pth_with_teacher_wrapper(tmp_path) -> None:
    source = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).eval()
    assert source.pos_embed.shape == (1, 1 + 28 * 28, 384)
    with torch.no_grad():
        source.pos_embed.normal_(0, 1.0)  # strong pos_embed so the resampling rule shows in the outputs
    teacher = {f"module.backbone.{k}": v.clone() for k, v in source.state_dict().items()}
    teacher["module.head.mlp.0.weight"] = torch.randn(32, 384)
    teacher["module.head.last_layer.weight_g"] = torch.ones(64, 1)
    path = tmp_path / "dino_deitsmall8_pretrain_fake.pth"
    torch.save({"teacher": teacher, "student": {"module.backbone.cls_token": torch.zeros(1, 1, 384)},
                "epoch": 3, "args": argparse.Namespace(arch="vit_small", patch_size=8)}, path)

    backbone = FrozenBackbone("vit_small_patch8_224.dino", str(path), 64)
    assert backbone.identity == {"name": "vit_small_patch8_224.dino", "weights_sha256": _sha(path),
                                 "image_size": 64, "pos_resample": "dino"}
    images = torch.randn(1, 3, 64, 64)
    tokens = backbone(images).tokens[:, -1]

    def reference(pos: torch.Tensor) -> torch.Tensor:
        target = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0, img_size=64)
        target.eval()
        state = dict(source.state_dict(), pos_embed=pos)
        target.load_state_dict(state, strict=True)
        with torch.no_grad():
            return target.forward_features(images)

    torch.testing.assert_close(tokens, reference(_dino_reference_resample(source.pos_embed, 8)),
                               rtol=1e-4, atol=1e-4)
    timm_tokens = reference(resample_abs_pos_embed(source.pos_embed.detach(), [8, 8], num_prefix_tokens=1))
    assert (tokens - timm_tokens).abs().max() > 1e-3  # the test can tell the two resampling rules apart


def test_load_timm_safetensors_and_pth(tmp_path) -> None:
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=15, img_size=64,
                              patch_size=8, depth=6).eval()
    state = {k: v.contiguous() for k, v in small.state_dict().items()}
    st_path, pth_path = tmp_path / "tiny.safetensors", tmp_path / "tiny.pth"
    save_file(state, str(st_path))
    torch.save(state, pth_path)
    images = torch.randn(2, 3, 128, 128)

    backbone = FrozenBackbone("fscs_vit_tiny_patch8", str(st_path), 128)  # 8x8 -> 16x16 grid, timm rule
    assert backbone.identity["weights_sha256"] == _sha(st_path)
    target = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=15, img_size=128,
                               patch_size=8, depth=6).eval()
    target.load_state_dict(checkpoint_filter_fn(dict(state), target), strict=True)
    with torch.no_grad():
        expected = target.forward_features(images)
    torch.testing.assert_close(backbone(images).tokens[:, -1], expected, rtol=1e-5, atol=1e-5)

    same_size = FrozenBackbone("fscs_vit_tiny_patch8", str(pth_path), 64)  # classifier head dropped
    with torch.no_grad():
        expected64 = small.forward_features(images[:, :, :64, :64])
    torch.testing.assert_close(same_size(images[:, :, :64, :64]).tokens[:, -1], expected64)


def _save_dinov2_hub_file(source, path):
    """Save a timm register ViT's weights in DINOv2's hub layout: `register_tokens`, the CLS position folded
    into `pos_embed` (and taken out of `cls_token`), a `mask_token`. Returns the path."""
    state = dict(source.state_dict())
    cls_pos = torch.randn(1, 1, state["cls_token"].shape[-1])
    hub = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    hub.update(register_tokens=state["reg_token"], cls_token=state["cls_token"] - cls_pos,
               pos_embed=torch.cat([cls_pos, state["pos_embed"]], dim=1),
               mask_token=torch.zeros(1, state["cls_token"].shape[-1]))
    torch.save(hub, path)
    return path


def test_load_dinov2_register_layout(tmp_path) -> None:
    source = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                               img_size=28).eval()
    with torch.no_grad():
        source.cls_token.normal_()  # timm inits it near 0, where LayerNorm would amplify rounding
    path = _save_dinov2_hub_file(source, tmp_path / "dinov2_vits14_reg4_fake.pth")
    backbone = FrozenBackbone("vit_small_patch14_reg4_dinov2.lvd142m", str(path), 28)
    images = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = source.forward_features(images)
    out = backbone(images)
    assert out.tokens.shape == (1, 12, 5, 384)
    torch.testing.assert_close(out.tokens[:, -1], _drop_regs(expected, 5), rtol=1e-5, atol=1e-5)


def test_weights_errors_are_one_line(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FSCSError) as err:
        FrozenBackbone("fscs_vit_tiny_patch8", str(missing), 64)
    assert str(missing) in str(err.value) and "not found" in str(err.value) and "\n" not in str(err.value)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(FSCSError, match="could not be read") as err:
        FrozenBackbone("fscs_vit_tiny_patch8", str(garbage), 64)
    assert "\n" not in str(err.value)

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": nn.Linear(2, 2)}, unsafe)  # a pickled module, rejected by weights_only
    with pytest.raises(FSCSError, match="could not be read"):
        FrozenBackbone("fscs_vit_tiny_patch8", str(unsafe), 64)

    tiny = tmp_path / "tiny.pth"
    torch.save(FrozenBackbone("fscs_vit_tiny_patch8", None, 64).model.state_dict(), tiny)
    with pytest.raises(FSCSError, match=r"tiny\.pth: missing keys .* fit backbone 'fscs_vit_tiny_patch8'") as err:
        FrozenBackbone("vit_small_patch16_224.dino", str(tiny), 64)
    assert "\n" not in str(err.value)

    partial = tmp_path / "partial.pth"
    state = FrozenBackbone("fscs_vit_tiny_patch8", None, 64).model.state_dict()
    state.pop("norm.weight")
    torch.save(state, partial)
    with pytest.raises(FSCSError, match=r"missing keys \['norm.weight'\]"):
        FrozenBackbone("fscs_vit_tiny_patch8", str(partial), 64)


def test_random_init_is_reproducible_whatever_the_global_rng():
    """Processes that claim the same random-init identity must hold the same weights."""
    torch.manual_seed(1)
    a = FrozenBackbone("fscs_vit_tiny_patch8", None, 32)
    torch.manual_seed(2)
    b = FrozenBackbone("fscs_vit_tiny_patch8", None, 32)
    c = FrozenBackbone("fscs_vit_tiny_patch8", None, 32, init_seed=1)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert c.identity["weights_sha256"] != a.identity["weights_sha256"]
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


def _dinov2_reg_reference_resample(patch_pos: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's interpolate_pos_encoding as its register models are built (dinov2_vit*14_reg:
    interpolate_offset=0.0, interpolate_antialias=True): bicubic to size (g, g), antialiased."""
    old = math.isqrt(patch_pos.shape[1])
    grid_pos = patch_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=(grid, grid), mode="bicubic", antialias=True)
    return grid_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


@pytest.mark.parametrize("size", [42, 112])  # grid 3 (down from 5) and 8 (up from 5)
def test_dinov2_register_file_resampled_as_dinov2_reg_does(tmp_path, size: int) -> None:
    source = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                               img_size=70).eval()
    with torch.no_grad():
        source.pos_embed.normal_(0, 1.0)  # strong pos_embed so the resampling rule shows in the outputs
        source.cls_token.normal_()
    path = _save_dinov2_hub_file(source, tmp_path / "dinov2_vits14_reg4_pretrain_fake.pth")
    state = dict(source.state_dict())

    backbone = FrozenBackbone("vit_small_patch14_reg4_dinov2.lvd142m", str(path), size)
    grid = size // 14
    target = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                               img_size=size).eval()
    target.load_state_dict(dict(state, pos_embed=_dinov2_reg_reference_resample(state["pos_embed"], grid)))
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = _drop_regs(target.forward_features(images), 5)
    torch.testing.assert_close(backbone(images).tokens[:, -1], expected, rtol=1e-4, atol=1e-4)


def test_weights_of_another_token_layout_name_the_real_misfit(tmp_path) -> None:
    """A file with (or without) register tokens is refused for what it is, not for its pos_embed layout."""
    plain = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28)
    no_regs = tmp_path / "dinov2_vits14_pretrain.pth"  # DINOv2 without registers (hub keys)
    torch.save(dict(plain.state_dict(), mask_token=torch.zeros(1, 384)), no_regs)
    with pytest.raises(FSCSError) as err:
        FrozenBackbone("vit_small_patch14_reg4_dinov2.lvd142m", str(no_regs), 28)
    msg = str(err.value)
    assert "missing keys ['reg_token']" in msg and "no register tokens in the file" in msg
    assert "square grid" not in msg and "\n" not in msg

    regs = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=28)
    reg_file = tmp_path / "reg4.safetensors"
    save_file({k: v.contiguous() for k, v in regs.state_dict().items()}, str(reg_file))
    with pytest.raises(FSCSError) as err:
        FrozenBackbone("vit_small_patch16_224.dino", str(reg_file), 32)
    msg = str(err.value)
    assert "unexpected keys ['blocks.0.ls1.gamma'" in msg and "square grid" not in msg
    assert "fit backbone 'vit_small_patch14_reg4_dinov2.lvd142m'" in msg

    mini = tmp_path / "mini.safetensors"
    save_file(FrozenBackbone("fscs_vit_mini_patch8", None, 32).model.state_dict(), str(mini))
    with pytest.raises(FSCSError, match="fit backbone 'fscs_vit_mini_patch8'.*model.weights=PATH, or null"):
        FrozenBackbone("vit_small_patch14_reg4_dinov2.lvd142m", str(mini), 28)


@pytest.mark.parametrize("fmt,hint", [("fscs-pretrain-checkpoint/1", "backbone.safetensors"),
                                      ("fscs-checkpoint/1", "head only"), ("fscs-train-state/1", "head only")])
def test_harness_checkpoints_are_not_backbone_weights(tmp_path, fmt: str, hint: str) -> None:
    """fscs's own checkpoints (whose tensors sit beside a 'format' key) are named, not read as a misfit ViT."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": fmt, "dino_center": torch.zeros(1, 8), "step": 3,
                "teacher_vit": FrozenBackbone("fscs_vit_mini_patch8", None, 32).model.state_dict()}, path)
    with pytest.raises(FSCSError, match=hint) as err:
        FrozenBackbone("fscs_vit_mini_patch8", str(path), 32)
    assert str(path) in str(err.value) and "missing keys" not in str(err.value)


def test_dinov2_file_without_pos_embed_is_one_line_error(tmp_path) -> None:
    regs = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=28)
    state = {k: v for k, v in regs.state_dict().items() if k not in ("reg_token", "pos_embed")}
    path = tmp_path / "partial_dinov2.pth"
    torch.save(dict(state, register_tokens=regs.reg_token.detach()), path)
    with pytest.raises(FSCSError, match=r"partial_dinov2\.pth has DINOv2 register_tokens but no pos_embed"):
        FrozenBackbone("vit_small_patch14_reg4_dinov2.lvd142m", str(path), 28)


def test_pretrain_export_of_a_dino_architecture_is_resampled_by_timms_rule(tmp_path) -> None:
    """fscs pretrain trains timm ViTs with dynamic_img_size (timm's resampling): its export of a DINO-named
    architecture must not be read with DINO's +0.1 rule; the identity records the rule used."""
    from fscs.model.backbone_weights import PRETRAIN_FORMAT
    from fscs.model.student import build_student_vit
    from fscs.pretrain_export import export_backbone

    vit = build_student_vit("vit_small_patch16_224.dino", 64)  # grid 4
    with torch.no_grad():
        vit.pos_embed.normal_(0, 1.0)
    path = export_backbone(vit, tmp_path / "pretrained.safetensors",
                           {"format": PRETRAIN_FORMAT, "novel_folds": "[0]", "dataset": "x"})
    backbone = FrozenBackbone("vit_small_patch16_224.dino", str(path), 32)  # grid 2
    want = resample_pos_embed(vit.pos_embed.detach(), (2, 2), 1, "timm")
    torch.testing.assert_close(backbone.model.pos_embed, want)
    assert (want - resample_pos_embed(vit.pos_embed.detach(), (2, 2), 1, "dino")).abs().max() > 1e-3
    assert backbone.identity["pos_resample"] == "timm"
    assert FrozenBackbone("vit_small_patch16_224.dino", str(path), 64).identity["pos_resample"] == "none"
    assert FrozenBackbone("fscs_vit_tiny_patch8", None, 32).identity["pos_resample"] == "none"


def _model_with(identity: dict, num_reg_tokens: int = 0, pretraining=None, rule: str = "dino"):
    from types import SimpleNamespace

    spec = SimpleNamespace(num_reg_tokens=num_reg_tokens, pos_resample=rule)
    return SimpleNamespace(backbone=SimpleNamespace(identity=identity, spec=spec, pretraining=pretraining))


def test_head_trained_with_another_resampling_rule_is_refused_and_legacy_heads_warned(tmp_path, caplog):
    from fscs.run_dir import check_backbone_identity

    base = {"name": "b", "weights_sha256": "s", "image_size": 42}
    now = dict(base, pos_resample="timm")
    with pytest.raises(FSCSError, match="rule 'dino'.*'timm'.*retrain"):
        check_backbone_identity(dict(base, pos_resample="dino"), _model_with(now, 4, rule="timm"), tmp_path)
    check_backbone_identity(now, _model_with(now, 4, rule="timm"), tmp_path)
    assert "predates" not in caplog.text
    check_backbone_identity(base, _model_with(now, 0, rule="timm"), tmp_path)  # rule never changed: quiet
    assert "predates" not in caplog.text
    check_backbone_identity(base, _model_with(now, 4, rule="timm"), tmp_path)  # DINOv2-reg, resampled
    assert "predates" in caplog.text and "DINOv2-register" in caplog.text
    caplog.clear()
    check_backbone_identity(base, _model_with(now, 0, {"dataset": "x"}, rule="dino"), tmp_path)
    assert "fscs pretrain" in caplog.text
    caplog.clear()
    check_backbone_identity(base, _model_with(dict(base, pos_resample="none"), 4, rule="timm"), tmp_path)
    assert "predates" not in caplog.text

"""Registry of frozen ViT backbones: a BackboneSpec per name and the timm model each one builds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from fscs.errors import FSCSError

PosResample = Literal["dino", "timm"]


@dataclass(frozen=True)
class BackboneSpec:
    """A named frozen backbone: the timm architecture plus what the harness needs to know about it."""

    name: str
    timm_name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    num_reg_tokens: int = 0
    pos_resample: PosResample = "dino"
    default_image_size: int = 400
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def _dino(name: str, timm_name: str, patch: int, dim: int, heads: int) -> BackboneSpec:
    return BackboneSpec(name, timm_name, patch, dim, 12, heads, pos_resample="dino", default_image_size=400)


def _dinov2_reg(name: str, timm_name: str, dim: int, heads: int) -> BackboneSpec:
    # DINOv2's register models are built with interpolate_offset=0.0, interpolate_antialias=True (hub
    # dinov2_vit*14_reg): bicubic to the new grid size, antialiased, i.e. timm's resample_abs_pos_embed.
    # The +0.1 offset of DINO (and of DINOv2 without registers) would give them different features.
    return BackboneSpec(name, timm_name, 14, dim, 12, heads, num_reg_tokens=4, pos_resample="timm",
                        default_image_size=518)


# Add a backbone by adding a spec here; build_timm_model checks the spec against the built model.
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _dino("vit_small_patch8_224.dino", "vit_small_patch8_224", 8, 384, 6),
        _dino("vit_small_patch16_224.dino", "vit_small_patch16_224", 16, 384, 6),
        _dino("vit_base_patch8_224.dino", "vit_base_patch8_224", 8, 768, 12),
        _dino("vit_base_patch16_224.dino", "vit_base_patch16_224", 16, 768, 12),
        _dinov2_reg("vit_small_patch14_reg4_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2", 384, 6),
        _dinov2_reg("vit_base_patch14_reg4_dinov2.lvd142m", "vit_base_patch14_reg4_dinov2", 768, 12),
        BackboneSpec("fscs_vit_tiny_patch8", "vit_tiny_patch16_224", 8, 192, 6, 3,
                     timm_kwargs={"patch_size": 8, "depth": 6}, pos_resample="timm", default_image_size=128),
        # offline default shipped in fscs/assets (fscs pretrain): 4 blocks x 4 heads of 32 dims
        BackboneSpec("fscs_vit_mini_patch8", "vit_tiny_patch16_224", 8, 128, 4, 4,
                     timm_kwargs={"patch_size": 8, "depth": 4, "embed_dim": 128, "num_heads": 4},
                     pos_resample="timm", default_image_size=96),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """The registered spec called `name`; unknown names raise FSCSError listing the known ones."""
    if name not in BACKBONES:
        raise FSCSError(f"unknown backbone '{name}'; choose one of: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def build_timm_model(spec: BackboneSpec, image_size: int) -> nn.Module:
    """A randomly initialised timm VisionTransformer for `spec` at `image_size` px, no classifier head."""
    if image_size <= 0 or image_size % spec.patch_size:
        raise FSCSError(f"image size {image_size} is not a positive multiple of the patch size "
                        f"{spec.patch_size} of backbone '{spec.name}'; pick e.g. "
                        f"{max(1, round(image_size / spec.patch_size)) * spec.patch_size}")
    model = timm.create_model(spec.timm_name, pretrained=False, img_size=image_size, num_classes=0,
                              **spec.timm_kwargs)
    got = (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads,
           model.patch_embed.patch_size[0], getattr(model, "num_reg_tokens", 0))
    want = (spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size, spec.num_reg_tokens)
    if got != want or model.cls_token is None or not isinstance(getattr(model.blocks[-1].attn, "qkv", None),
                                                                 nn.Linear):
        raise RuntimeError(f"backbone spec {spec.name} does not match timm model {spec.timm_name}: "
                           f"(dim, depth, heads, patch, regs) {got} != {want}, or no CLS token / fused qkv")
    return model


"""Frozen timm ViT backbone: every block's normed tokens and the last block's q/k; local weight files."""
from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from torch import nn

from fscs.assets import resolve_weights
from fscs.digest import file_sha256
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

PosResample = Literal["dino", "timm"]
_WRAPPER_KEYS = ("teacher", "student", "model", "state_dict", "module")
_DROPPED_PREFIXES = ("head.", "fc_norm.", "mask_token", "pre_logits.")


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


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int,
                       method: PosResample) -> torch.Tensor:
    """Resample absolute position embeddings [1, P + M*M, D] to [1, P + gh*gw, D] (P prefix entries kept).

    "dino": as DINO/DINOv2's interpolate_pos_encoding: bicubic, align_corners=False, with
    scale_factor=(g + 0.1) / M (the scale, not the output size, sets the sampling positions).
    "timm": timm's resample_abs_pos_embed (bicubic to size=(gh, gw), antialias on), as timm's loader does and
    as DINOv2's register models do (interpolate_offset=0.0, interpolate_antialias=True).
    """
    num_old = pos_embed.shape[1] - num_prefix_tokens
    old = math.isqrt(num_old)
    if old * old != num_old:
        raise ValueError(f"pos_embed has {num_old} patch entries, not a square grid")
    gh, gw = new_grid
    if (old, old) == (gh, gw):
        return pos_embed
    if method == "timm":
        return resample_abs_pos_embed(pos_embed, new_size=[gh, gw], old_size=[old, old],
                                      num_prefix_tokens=num_prefix_tokens)
    if method != "dino":
        raise ValueError(f"unknown pos_embed resampling method {method!r}")
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = patch.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / old, (gw + 0.1) / old), mode="bicubic",
                         align_corners=False)
    if tuple(grid.shape[-2:]) != (gh, gw):
        raise RuntimeError(f"DINO pos_embed interpolation gave {tuple(grid.shape[-2:])}, wanted {(gh, gw)}")
    patch = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


PRETRAIN_FORMAT = "fscs-backbone/1"
"""safetensors metadata 'format' of the files `fscs pretrain` exports."""


def pretraining_scope(path: str | os.PathLike) -> dict[str, Any] | None:
    """What a backbone file made by `fscs pretrain` never saw: {"dataset": shard-set name or None, "novel_folds":
    sorted folds none of whose classes reached pretraining (images or labels)}. None for any other file.

    Read from the safetensors metadata ("dataset", "novel_folds"; older files: data.exclude_folds and
    labels.fold of the recorded "config"). The shipped asset predates "dataset": it is fscs.assets'.
    """
    import json

    from fscs import assets

    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != PRETRAIN_FORMAT:
            return None
        if "novel_folds" in meta:
            folds = {int(f) for f in json.loads(meta["novel_folds"])}
        else:
            cfg = json.loads(meta.get("config", "{}"))
            folds = {int(f) for f in cfg.get("data", {}).get("exclude_folds", [])}
            if cfg.get("labels", {}).get("fold") is not None:
                folds.add(int(cfg["labels"]["fold"]))
    except Exception as exc:  # noqa: BLE001 - an unreadable record is a one-line error, not a traceback
        raise FSCSError(f"backbone weights file {path}: unreadable fscs pretrain metadata ({exc}); re-export it "
                        "with fscs pretrain") from exc
    dataset = meta.get("dataset")
    if dataset is None and path.resolve() == assets.DEFAULT_BACKBONE_WEIGHTS.resolve():
        dataset = assets.DEFAULT_BACKBONE_DATASET
    return {"dataset": dataset, "novel_folds": sorted(folds)}


def _strip(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix):]
    return key


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a backbone state dict (DINO/DINOv2 .pth, timm .pth or .safetensors) into timm key layout.

    Unwraps {"teacher"/"student"/"model"/"state_dict": ...}, strips "module." prefixes, keeps only the
    "backbone."-prefixed tensors when there are any (prefix stripped), drops projection/classifier heads
    and DINOv2's mask_token, and converts the DINOv2 register layout to timm's.
    """
    path = Path(path)
    fix = "pass a DINO .pth or timm .pth/.safetensors backbone file, or no weights for random init"
    if not path.is_file():
        raise FSCSError(f"backbone weights file {path} {'is a directory' if path.is_dir() else 'not found'}; "
                        f"{fix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path), device="cpu")
        else:
            # DINO training checkpoints also hold the run's argparse.Namespace.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure becomes one user-facing line
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise FSCSError(f"backbone weights file {path} could not be read safely ({reason}); {fix}") from exc
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if isinstance(fmt, str) and fmt.startswith("fscs-"):  # one of the harness's own checkpoints
        what = ("a `fscs pretrain` training state; pass the backbone.safetensors that run exported"
                if fmt.startswith("fscs-pretrain") else
                "a `fscs train` checkpoint (the head only, no backbone weights); pass the backbone weights "
                "file that run was trained with (its model.weights)")
        raise FSCSError(f"backbone weights file {path} is {what}")
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise FSCSError(f"backbone weights file {path} holds no tensors under {list(obj)[:6]}; {fix}")
        obj = inner
    if not isinstance(obj, dict):
        raise FSCSError(f"backbone weights file {path} is not a state dict ({type(obj).__name__}); {fix}")
    tensors = {_strip(key, "module."): v for key, v in obj.items() if torch.is_tensor(v)}
    if any(key.startswith("backbone.") for key in tensors):  # DINO teacher/student, Lightning checkpoints
        tensors = {key[len("backbone."):]: v for key, v in tensors.items() if key.startswith("backbone.")}
    state = {key: v for key, v in tensors.items() if not key.startswith(_DROPPED_PREFIXES)}
    if len(state) < len(tensors):
        logger.info("backbone weights %s: ignored %d head/extra tensors", path, len(tensors) - len(state))
    if "register_tokens" in state:  # DINOv2 layout -> timm no_embed_class layout (CLS pos folded into CLS)
        lacking = [key for key in ("cls_token", "pos_embed") if key not in state]
        if lacking:
            raise FSCSError(f"backbone weights file {path} has DINOv2 register_tokens but no {lacking[0]}; "
                            f"{fix}")
        state["reg_token"] = state.pop("register_tokens")
        pos = state.pop("pos_embed")
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
    return state


def _architecture(state: dict[str, torch.Tensor]) -> tuple[int, int, int, int, bool] | None:
    """(embed_dim, patch, depth, register tokens, LayerScale) of a timm-layout ViT state dict, or None."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    regs = state["reg_token"].shape[1] if "reg_token" in state and state["reg_token"].ndim == 3 else 0
    return proj.shape[0], proj.shape[-1], depth, regs, "blocks.0.ls1.gamma" in state


def _fitting_backbones(state: dict[str, torch.Tensor]) -> list[str]:
    """Registered backbones whose shape (width, patch, depth, registers, LayerScale) a state dict has.

    LayerScale is read off the registers: the registered DINOv2 models have both, the others neither.
    """
    arch = _architecture(state)
    return [] if arch is None else [
        s.name for s in BACKBONES.values()
        if (s.embed_dim, s.patch_size, s.depth, s.num_reg_tokens, s.num_reg_tokens > 0) == arch]


def fit_state_dict(state: dict[str, torch.Tensor], model: nn.Module, spec: BackboneSpec,
                   source: str, pos_resample: PosResample | None = None) -> dict[str, torch.Tensor]:
    """Check every key and shape, then resample pos_embed to `model`'s grid (by `pos_resample`, default the
    spec's rule); misfits raise FSCSError.

    Keys and the other shapes are checked first, so weights of another architecture (registers or not,
    other width, patch or depth) are named as such instead of failing on the pos_embed layout; the error
    names the registered backbone the weights fit, when one does.
    """
    state = dict(state)
    fits = [name for name in _fitting_backbones(state) if name != spec.name]
    made_for = f"weights made for '{spec.name}' (model.weights=PATH, or null for random init)"
    fix = (f"these weights fit backbone '{fits[0]}': pick it (model.backbone={fits[0]}) or use {made_for}"
           if fits else f"use {made_for} or pick the backbone name these weights belong to")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        regs = (f" (no register tokens in the file: '{spec.name}' needs a release with "
                f"{spec.num_reg_tokens} registers)" if missing == ["reg_token"] else "")
        raise FSCSError(f"backbone weights file {source}: missing keys {missing[:4]}, unexpected keys "
                        f"{unexpected[:4]} ({len(missing)}/{len(unexpected)} in all){regs}; {fix}")
    for key, value in state.items():
        if key != "pos_embed" and value.shape != expected[key].shape:
            raise FSCSError(f"backbone weights file {source}: key {key} has shape {tuple(value.shape)}, "
                            f"model wants {tuple(expected[key].shape)}; {fix}")
    if "pos_embed" in state and model.pos_embed is not None:
        num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        try:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], tuple(model.patch_embed.grid_size),
                                                    num_prefix, pos_resample or spec.pos_resample)
        except (ValueError, RuntimeError) as exc:
            shape = tuple(state["pos_embed"].shape)
            raise FSCSError(f"backbone weights file {source}: key pos_embed {shape} does not fit "
                            f"({exc}); {fix}") from exc
        if state["pos_embed"].shape != expected["pos_embed"].shape:
            raise FSCSError(f"backbone weights file {source}: key pos_embed has shape "
                            f"{tuple(state['pos_embed'].shape)} after resampling, model wants "
                            f"{tuple(expected['pos_embed'].shape)}; {fix}")
    return state


def _pos_grid(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[int, int] | None:
    """The (M, M) patch grid of `state`'s pos_embed for `model`'s prefix layout (None: no square grid)."""
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3 or model.pos_embed is None:
        return None
    side = math.isqrt(max(0, pos.shape[1] - (0 if model.no_embed_class else model.num_prefix_tokens)))
    return (side, side)


@dataclass(frozen=True)
class BackboneOutput:
    """Frozen-backbone features of a batch.

    tokens: [B, L, 1+T, D] every block's output through the final norm (CLS first, T = gh*gw patches).
    q, k:   [B, heads, 1+T, dh] last block's query/key (from norm1(x) via its qkv, q_norm/k_norm applied).
    """

    tokens: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor


def _is_plain_timm_block(block: nn.Module) -> bool:
    """True when `block` is timm's standard ViT Block with its standard Attention (no gate), i.e. its forward
    is exactly what FrozenBackbone._last_block replays."""
    from timm.models.vision_transformer import Attention, Block

    attn = getattr(block, "attn", None)
    return (type(block).forward is Block.forward and attn is not None
            and type(attn).forward is Attention.forward and getattr(attn, "gate", None) is None
            and hasattr(attn, "scale") and hasattr(attn, "norm"))


class FrozenBackbone(nn.Module):
    """A frozen (no-grad, always-eval) timm ViT; see BackboneOutput for what forward returns."""

    def __init__(self, name: str, weights: str | os.PathLike | None = None, image_size: int | None = None,
                 init_seed: int = 0):
        super().__init__()
        self.spec = get_spec(name)
        self.image_size = int(image_size or self.spec.default_image_size)
        # a random-init backbone must be the same in every process and run that claims the same identity
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.model = build_timm_model(self.spec, self.image_size)
        sha = f"random-init-seed{init_seed}"
        self.pretraining: dict[str, Any] | None = None
        """pretraining_scope of the weights file (None: random init, or weights not made by fscs pretrain)."""
        resampled = "none"
        weights = resolve_weights(None if weights is None else str(weights))  # 'asset:NAME' = a shipped file
        if weights is not None:
            self.pretraining = pretraining_scope(weights)
            # fscs pretrain trains timm ViTs with dynamic_img_size, i.e. timm's rule, whatever the spec's name
            rule: PosResample = "timm" if self.pretraining is not None else self.spec.pos_resample
            state = read_state_dict(weights)
            grid_before = _pos_grid(state, self.model)
            state = fit_state_dict(state, self.model, self.spec, str(weights), rule)
            self.model.load_state_dict(state, strict=True)
            sha = file_sha256(weights)
            if grid_before != tuple(self.model.patch_embed.grid_size):
                resampled = rule
            logger.info("loaded backbone %s weights from %s (sha256 %s)", name, weights, sha[:12])
        else:
            logger.info("backbone %s is randomly initialised (no weights file)", name)
        self.grid: tuple[int, int] = tuple(self.model.patch_embed.grid_size)
        self.num_layers = self.spec.depth
        self.num_heads = self.spec.num_heads
        self.embed_dim = self.spec.embed_dim
        self.identity: dict[str, Any] = {"name": name, "weights_sha256": sha, "image_size": self.image_size,
                                         "pos_resample": resampled}
        """What the features depend on. pos_resample: the rule that fitted the weights' pos_embed grid to
        image_size ("dino" / "timm"), or "none" when it already fitted (or random init)."""
        for param in self.parameters():
            param.requires_grad_(False)
        # Fused attention (scaled_dot_product_attention: flash / memory-efficient kernels, no N x N matrix in
        # memory) in every block, whatever TIMM_FUSED_ATTN says; the last block's q/k are still exported.
        for block in self.model.blocks:
            if hasattr(block.attn, "fused_attn"):
                block.attn.fused_attn = True
        self._fast_last_block = _is_plain_timm_block(self.model.blocks[-1])
        super().train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Always stays in eval mode, whatever `mode` says."""
        return super().train(False)

    def _keep_cls_and_patches(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Drop register tokens along `dim` (CLS is index 0, patches follow the prefix tokens)."""
        if self.spec.num_reg_tokens == 0:
            return x
        prefix = self.model.num_prefix_tokens
        return torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, prefix, x.shape[dim] - prefix)], dim=dim)

    def _last_block_qk(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [B, heads, N, dh] of `block` for its input x [B, N, D], using only the q/k rows of its qkv."""
        attn = block.attn
        width = attn.num_heads * attn.head_dim
        bias = attn.qkv.bias[: 2 * width] if attn.qkv.bias is not None else None
        qk = F.linear(block.norm1(x), attn.qkv.weight[: 2 * width], bias)
        qk = qk.reshape(x.shape[0], x.shape[1], 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return attn.q_norm(qk[0]), attn.k_norm(qk[1])

    def _last_block(self, block: nn.Module, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block output [B, N, D], q, k [B, heads, N, dh]) of the last block for its input x [B, N, D].

        A plain timm Block is run step by step (same operations as its forward, fused attention) so that its
        one qkv projection also yields the exported q/k; any other block type runs as is and its q/k are
        recomputed from the q/k rows of its qkv.
        """
        if not self._fast_last_block:
            q, k = self._last_block_qk(block, x)
            return block(x), q, k
        attn = block.attn
        b, n, _ = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = attn.proj(attn.norm(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)))
        x = x + block.drop_path1(block.ls1(attn.proj_drop(out)))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x, q, k

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """images [B, 3, S, S] (S = image_size, normalised with spec.mean/std) -> BackboneOutput."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"backbone expects images [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {tuple(images.shape)}")
        model = self.model
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        last = len(model.blocks) - 1
        tokens: torch.Tensor | None = None  # [B, L, 1+T, D], filled block by block (no list + stack copy)
        q = k = x
        for index, block in enumerate(model.blocks):
            if index == last:
                x, q, k = self._last_block(block, x)
            else:
                x = block(x)
            normed = model.norm(self._keep_cls_and_patches(x, dim=1))
            if tokens is None:
                tokens = normed.new_empty(normed.shape[0], len(model.blocks), *normed.shape[1:])
            tokens[:, index] = normed
        assert tokens is not None
        return BackboneOutput(tokens=tokens, q=self._keep_cls_and_patches(q, dim=2),
                              k=self._keep_cls_and_patches(k, dim=2))

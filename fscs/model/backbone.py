"""Frozen timm ViT backbone: every block's normed tokens and the last block's q/k (weight files: backbone_weights)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fscs.assets import resolve_weights
from fscs.digest import file_sha256
from fscs.model.backbone_specs import BACKBONES  # noqa: F401 - re-export: fscs/model/fscs_model.py imports it from here
from fscs.model.backbone_specs import PosResample, build_timm_model, get_spec
from fscs.model.backbone_weights import fit_state_dict, pretraining_scope, read_state_dict

logger = logging.getLogger(__name__)


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
            pos = state.get("pos_embed")  # fit_state_dict resamples it exactly when its shape differs
            if pos is not None and self.model.pos_embed is not None and pos.shape != self.model.pos_embed.shape:
                resampled = rule
            state = fit_state_dict(state, self.model, self.spec, str(weights), rule)
            self.model.load_state_dict(state, strict=True)
            sha = file_sha256(weights)
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

"""The pretraining student: a random-init timm ViT with the DINO head and the label evidence net."""
from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn

from fscs.errors import FSCSError
from fscs.model.backbone_specs import get_spec
from fscs.model.dino_head import DINOHead, EvidenceNet, vit_forward
from fscs.model.distill import cls_key_cosine


def build_student_vit(name: str, image_size: int, drop_path: float = 0.0) -> nn.Module:
    """A random-init timm ViT of registry backbone `name` accepting any multiple of the patch size."""
    spec = get_spec(name)
    if spec.num_reg_tokens:
        raise FSCSError(f"pretraining backbone '{name}' has register tokens; pick one without")
    return timm.create_model(spec.timm_name, pretrained=False, img_size=image_size, num_classes=0,
                             dynamic_img_size=True, drop_path_rate=drop_path, **spec.timm_kwargs)


class Student(nn.Module):
    """ViT + (DINO head) + (evidence net): one forward over every view (what DDP wraps).

    forward(views) -> {"dino": [V x [B, K]] (full, crop, locals...), "cos": [B, gh, gw] of the full view,
    "evidence": [B, C, gh, gw]}.
    """

    def __init__(self, vit: nn.Module, head: DINOHead | None, evidence: EvidenceNet | None, local_crops: int):
        super().__init__()
        self.vit, self.head, self.evidence, self.local_crops = vit, head, evidence, local_crops

    def forward(self, views: dict[str, torch.Tensor]) -> dict[str, Any]:
        full = views["full"]
        b = full.shape[0]
        globs = torch.cat([full, views["crop"]]) if "crop" in views else full
        cls, q_cls, keys = vit_forward(self.vit, globs)
        grid = (full.shape[-2] // self.vit.patch_embed.patch_size[0], full.shape[-1] // self.vit.patch_embed.patch_size[1])
        out: dict[str, Any] = {"cos": cls_key_cosine(q_cls[:b], keys[:b], grid)}
        if self.head is not None:
            dino = list(self.head(cls).chunk(globs.shape[0] // b))
            if "locals" in views:
                local_cls = vit_forward(self.vit, views["locals"])[0]
                dino += list(self.head(local_cls).chunk(self.local_crops))
            out["dino"] = dino
        if self.evidence is not None:
            out["evidence"] = self.evidence(full)
        return out

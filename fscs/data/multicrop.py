"""Multi-crop views for self-supervised pretraining, batched on the CPU from a seeded torch.Generator."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fscs.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fscs.pretrain_config import PretrainConfig


class MultiCropAugment:
    """Batched views of uint8 images [B, 3, H, W], ImageNet-normalised, drawn from a torch.Generator.

    full: the whole image resized to `size` (antialiased, as at evaluation), flipped and colour-jittered;
    crops: `n_global - 1` random resized crops at `size`; locals: `n_local` crops at `local_size`.
    """

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def _crop(self, x: torch.Tensor, size: int, scale: list[float], gen: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
        ratio = torch.exp(torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)
        cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
        grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _colour(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        a, b = self.cfg.augment, x.shape[0]

        def factor(strength: float) -> torch.Tensor:
            return (1 + (torch.rand(b, generator=gen) * 2 - 1) * strength).view(b, 1, 1, 1)

        gray_w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = x * factor(a.brightness)
        mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = (x - mean) * factor(a.contrast) + mean
        gray = (x * gray_w).sum(1, keepdim=True)
        x = (x - gray) * factor(a.saturation) + gray
        # hue: rotate the chroma plane of YIQ
        angle = (torch.rand(b, generator=gen) * 2 - 1) * a.hue * 2 * math.pi
        angle = torch.where(torch.rand(b, generator=gen) < a.hue_prob, angle, torch.zeros_like(angle))
        to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.zeros(b, 3, 3)
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
        mat = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # [B, 3, 3]
        x = torch.einsum("bij,bjhw->bihw", mat, x)
        gray = (x * gray_w).sum(1, keepdim=True).expand_as(x)
        x = torch.where((torch.rand(b, generator=gen) < a.grayscale_prob).view(b, 1, 1, 1), gray, x)
        return (x.clamp(0, 1) - self.mean) / self.std

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        size, dino = self.cfg.model.image_size, self.cfg.dino
        x = images.float() / 255.0
        full = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        full = torch.where(flip.view(-1, 1, 1, 1), full.flip(-1), full)
        views = {"full": self._colour(full, gen)}
        if dino.weight > 0:
            views["crop"] = self._colour(self._crop(x, size, dino.global_scale, gen), gen)
            if dino.local_crops:
                local = [self._colour(self._crop(x, dino.local_size, dino.local_scale, gen), gen)
                         for _ in range(dino.local_crops)]
                views["locals"] = torch.cat(local)
        return views

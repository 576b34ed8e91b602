"""Pretraining heads and losses: DINO projection head + centred/sharpened distillation, and the label objective.

The label objective (image-level labels of the training classes only) shapes the very quantity the
pseudo-masks read: the head-mean cosine of the last block's CLS query with the patch keys. A small local
evidence CNN (receptive field of a few patches, so it cannot see the whole image) learns per-token class
logits from the image labels by multiple-instance (top-k) pooling; the soft mask
sigmoid((cos - offset) / temperature) is then fitted per token to the evidence of the image's own classes.
With offset = -0.2 the reference rule's threshold ((cos + 1) / 2 > 0.4) is where the soft mask is 0.5.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from fscs import distributed

logger = logging.getLogger(__name__)


class DINOHead(nn.Module):
    """MLP projection (in_dim -> hidden -> ... -> bottleneck), L2 norm, then cosine logits to `out_dim` prototypes.

    forward: [B, in_dim] -> [B, out_dim]. The prototypes are always L2-normalised (DINO's weight-normalised
    last layer with its norm fixed to 1).
    """

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.normal_(self.prototypes, std=0.02)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).t()


class DINOLoss(nn.Module):
    """Cross-entropy of student crops against the centred, sharpened teacher on the other global crops.

    The centre (buffer [1, out_dim]) is an EMA of the teacher's batch mean, averaged over all ranks.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor], teacher_temp: float
                ) -> torch.Tensor:
        """student: V crops of [B, out_dim] (the first len(teacher) are the global crops); teacher: G x [B, out_dim]."""
        targets = [F.softmax((t.float() - self.center) / teacher_temp, dim=-1).detach() for t in teacher]
        total, pairs = 0.0, 0
        for ti, target in enumerate(targets):
            for si, s in enumerate(student):
                if si == ti:
                    continue
                logp = F.log_softmax(s.float() / self.student_temp, dim=-1)
                total = total + (-target * logp).sum(dim=-1).mean()
                pairs += 1
        return total / max(pairs, 1)

    @torch.no_grad()
    def update_center(self, teacher: list[torch.Tensor]) -> None:
        """EMA of the teacher's mean output over every rank's global crops."""
        out = torch.cat(teacher).float()
        stats = torch.cat([out.sum(dim=0), out.new_tensor([out.shape[0]])])
        distributed.all_reduce_sum(stats)
        mean = (stats[:-1] / stats[-1])[None]
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)


class EvidenceNet(nn.Module):
    """Local class evidence per token: a small CNN with stride = patch size and a receptive field of about
    four patches (31 px at patch 8), so it sees texture and edges but never the whole image.

    forward: images [B, 3, S, S] -> logits [B, C, S/p, S/p], softly bounded to (-bound, bound) (tanh), which
    keeps the multiple-instance loss from driving single tokens to extreme logits.
    """

    def __init__(self, num_classes: int, patch_size: int = 8, width: int = 64, bound: float = 6.0):
        super().__init__()
        downs = patch_size.bit_length() - 1
        if 1 << downs != patch_size:
            raise ValueError(f"EvidenceNet needs a power-of-two patch size, got {patch_size}")
        layers: list[nn.Module] = []
        chans = 3
        for i in range(downs):
            out = min(width, 32 * 2 ** i)
            layers += [nn.Conv2d(chans, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            chans = out
        layers += [nn.Conv2d(chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                   nn.Conv2d(width, num_classes, 1)]
        self.net = nn.Sequential(*layers)
        self.bound = bound

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.bound * torch.tanh(self.net(images) / self.bound)


def topk_mean(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """[B, C, gh, gw] -> [B, C]: mean of each class map's top max(1, fraction * T) token logits (MIL pooling)."""
    flat = logits.flatten(2)
    k = max(1, int(round(fraction * flat.shape[-1])))
    return flat.topk(k, dim=-1).values.mean(dim=-1)


def evidence_target(evidence: torch.Tensor, labels: torch.Tensor, normalize: str = "none") -> torch.Tensor:
    """Per-token objectness from class evidence: max over the image's present classes of sigmoid(logit).

    evidence [B, C, gh, gw], labels [B, C] multi-hot -> [B, gh, gw] in [0, 1] (0 for images without labels).
    normalize: "none"; "max" divides each class map by its image maximum (as CAMs are); "minmax" maps each
    class map's image minimum to 0 and maximum to 1.
    """
    prob = torch.sigmoid(evidence.float())
    if normalize != "none":
        flat = prob.flatten(2)
        high = flat.amax(dim=-1)[:, :, None, None]
        low = flat.amin(dim=-1)[:, :, None, None] if normalize == "minmax" else torch.zeros_like(high)
        prob = (prob - low) / (high - low).clamp_min(1e-6)
    return (prob * labels.float()[:, :, None, None]).amax(dim=1)


def label_losses(evidence: torch.Tensor, cos: torch.Tensor, labels: torch.Tensor, offset: float = -0.2,
                 temperature: float = 0.1, topk: float = 0.1, normalize: str = "none") -> dict[str, torch.Tensor]:
    """The label objective's two terms.

    evidence [B, C, gh, gw] per-token class logits of the local evidence net, cos [B, gh, gw] the student's
    CLS-query/key cosine, labels [B, C] multi-hot over the training classes.
    mil:  top-k pooled evidence vs the labels (trains the evidence net; background tokens, which look the
          same in every image, end up with low evidence for every class);
    mask: BCE of the soft mask sigmoid((cos - offset) / temperature) against the detached evidence of the
          present classes (normalised per image as `normalize` says), per token (trains the backbone:
          the CLS query must align with the object keys).
    """
    mil = F.binary_cross_entropy_with_logits(topk_mean(evidence.float(), topk), labels.float())
    target = evidence_target(evidence.detach(), labels, normalize)
    logits = (cos.float() - offset) / temperature
    return {"mil": mil, "mask": F.binary_cross_entropy_with_logits(logits, target)}


def vit_forward(vit: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A timm ViT pass that also returns the last block's q/k (as FrozenBackbone computes them), with grads.

    images [B, 3, H, W] -> (CLS output after the final norm [B, D], CLS query [B, h, dh],
    patch keys [B, h, T, dh]). The ViT must have no register tokens.
    """
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for block in vit.blocks[:-1]:
        x = block(x)
    last = vit.blocks[-1]
    attn = last.attn
    width = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias[: 2 * width] if attn.qkv.bias is not None else None
    qk = F.linear(last.norm1(x), attn.qkv.weight[: 2 * width], bias)
    qk = qk.reshape(x.shape[0], x.shape[1], 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qk[0]), attn.k_norm(qk[1])
    x = vit.norm(last(x))
    return x[:, 0], q[:, :, 0], k[:, :, 1:]

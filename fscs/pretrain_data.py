"""`fscs pretrain`'s data: the configured images read once into memory (uint8), and the data order, a pure
function of (seed, step, rank)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fscs.data.shards import ShardIndex, iter_shard_samples, read_index
from fscs.errors import FSCSError
from fscs.pretrain_config import PretrainConfig


def load_images(cfg: PretrainConfig, index: ShardIndex | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Images uint8 [N, 3, H, W] of the configured split, multi-hot labels [N, C] over the label classes, classes.

    Images holding a class of an excluded fold (or of labels.fold) are dropped; all images must share one size
    unless data.load_size resizes them as they are read. `index`: data.shards' index, when already read.
    """
    index = index if index is not None else read_index(cfg.data.shards)
    excluded = set(novel_folds(cfg))
    for fold in excluded:
        if fold not in index.folds:
            raise FSCSError(f"{cfg.data.shards}/index.json has no fold {fold} (folds {sorted(index.folds)}); "
                            "fix data.exclude_folds / labels.fold")
    novel = {c for f in excluded for c in index.folds[f]}
    classes = [c for c in range(1, index.num_classes + 1) if c not in novel]
    column = {c: i for i, c in enumerate(classes)}
    paths = index.shard_paths(cfg.data.split)
    if not paths:
        raise FSCSError(f"{cfg.data.shards} has no '{cfg.data.split}' shards; fix data.split")
    images, labels = [], []
    for sample in iter_shard_samples(paths, decode_masks=False):
        if novel & set(sample.labels):
            continue
        image = sample.image
        if cfg.data.load_size:
            image = resize_uint8(image, cfg.data.load_size)
        elif images and image.shape != images[0].shape:
            raise FSCSError(f"{cfg.data.shards}: image {sample.key} is {image.shape[:2]}, others "
                            f"{images[0].shape[:2]}; pretraining needs one image size: set data.load_size=N "
                            f"(every image resized to N x N when read, e.g. N={2 * cfg.model.image_size})")
        images.append(image)
        row = np.zeros(len(classes), dtype=np.float32)
        row[[column[c] for c in sample.labels]] = 1.0
        labels.append(row)
        if cfg.data.max_images and len(images) >= cfg.data.max_images:
            break
    if not images:
        raise FSCSError(f"{cfg.data.shards}: no '{cfg.data.split}' images left after excluding folds "
                        f"{sorted(excluded)}")
    data = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return data, torch.from_numpy(np.stack(labels)), classes


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: the evaluation resize (bilinear, antialiased), rounded."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def novel_folds(cfg: PretrainConfig) -> list[int]:
    """Folds whose classes never reach pretraining (no image holding one, no label): exclude_folds + labels.fold."""
    return sorted(set(cfg.data.exclude_folds) | ({cfg.labels.fold} if cfg.labels.fold is not None else set()))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of every random draw of `step` on `rank` (a pure function: resumes are exact)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def batch_indices(num: int, step: int, batch: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """This rank's image indices for `step`: consecutive slices of per-epoch permutations (seeded by epoch)."""
    pos, end = (step * world + rank) * batch, (step * world + rank + 1) * batch
    out = []
    while pos < end:
        epoch, offset = divmod(pos, num)
        perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(end - pos, num - offset)
        out.append(perm[offset:offset + take])
        pos += take
    return torch.cat(out)


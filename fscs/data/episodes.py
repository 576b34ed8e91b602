"""Episodes of the evaluation protocol: the index-seeded sampler, hashed manifests and episode tensors.

The webdataset training stream that assembles episodes on the fly lives in `fscs.data.stream`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fscs.data.shards import ShardIndex
from fscs.data.transforms import resize_mask, to_tensor_image
from fscs.data.types import Sample
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

IGNORE = 255
_MANIFEST_FIELDS = ("dataset", "role", "fold", "way", "shot", "seed", "count", "episodes")


@dataclass(frozen=True)
class EpisodeSpec:
    """One N-way K-shot episode: query key + its list entry's class, N support classes, N x K support keys."""

    index: int
    query: str
    query_class: int
    classes: tuple[int, ...]
    support: tuple[tuple[str, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "query": self.query, "query_class": self.query_class,
                "classes": list(self.classes), "support": [list(s) for s in self.support]}


def support_class_probs(classes: Sequence[int], query_class: int) -> np.ndarray:
    """Protocol weights over `classes` [C]: 0.5 for the query's class, 0.5 / (C - 1) for each other."""
    if len(classes) == 1:
        return np.ones(1)
    p = np.array([0.5 if c == query_class else 0.5 / (len(classes) - 1) for c in classes])
    return p / p.sum()


def _images_per_class(entries: Sequence[tuple[str, int]], classes: Sequence[int], shot: int, where: str
                      ) -> dict[int, list[str]]:
    """Sorted distinct image keys per class; every class needs shot + 1 images (supports never the query)."""
    images: dict[int, set[str]] = {c: set() for c in classes}
    for key, c in entries:
        if c not in images:
            raise FSCSError(f"{where}: entry ({key}, {c}) has a class outside {list(classes)}; "
                            "rebuild the index")
        images[c].add(key)
    for c, keys in images.items():
        if len(keys) < shot + 1:
            raise FSCSError(f"{where}: class {c} has {len(keys)} images, {shot}-shot episodes need "
                            f"{shot + 1}; use more images (e.g. a larger --num-images) or fewer shots")
    return {c: sorted(keys) for c, keys in images.items()}


QUERY_MODES = ("entry", "class")


class EpisodeSampler:
    """Evaluation episodes per protocol.md: episode i depends only on (seed, i) and the role's lists.

    `query_mode` (default: index.json params["query_mode"], else "entry"): "entry" = the query of episode i is
    entry i mod len (PASCAL-5i); "class" = a class uniformly from the role's classes, then an image uniformly
    among that class's images (COCO-20i).
    """

    def __init__(self, index: ShardIndex, role: str, fold: int, way: int, shot: int, seed: int,
                 query_mode: str | None = None) -> None:
        self.query_mode = str(query_mode or index.params.get("query_mode", "entry"))
        if self.query_mode not in QUERY_MODES:
            raise FSCSError(f"{index.root}/index.json: query_mode {self.query_mode!r} is not one of "
                            f"{QUERY_MODES}; rebuild the shards with this version of fscs")
        if role not in ("test", "select"):
            raise FSCSError(f"episode role {role!r}: use 'test' (test fold) or 'select' (model selection)")
        self.index, self.role, self.fold, self.way, self.shot, self.seed = index, role, fold, way, shot, seed
        where = f"{index.root}/index.json lists[{'test' if role == 'test' else 'select'}] fold {fold}"
        self.entries = index.fold_entries(role, fold)
        self.classes = index.fold_classes(role, fold)
        if not self.entries:
            raise FSCSError(f"{where}: no entries; rebuild the shards with {role} images")
        if not 1 <= way <= len(self.classes) or shot < 1:
            raise FSCSError(f"{where}: {way}-way {shot}-shot episodes need 1 <= way <= {len(self.classes)} (the "
                            "fold's classes) and shot >= 1; fix bench.settings (or data.way / data.shot)")
        self.images_of = _images_per_class(self.entries, self.classes, shot, where)

    def episode(self, i: int) -> EpisodeSpec:
        """Episode `i`: query (by entry or by class, see `query_mode`); N classes by the 0.5 rule; K supports
        each, never the query."""
        rng = np.random.default_rng([self.seed, i])
        if self.query_mode == "class":
            query_class = self.classes[int(rng.integers(len(self.classes)))]
            pool = self.images_of[query_class]
            query = pool[int(rng.integers(len(pool)))]
        else:
            query, query_class = self.entries[i % len(self.entries)]
        picks = rng.choice(len(self.classes), size=self.way, replace=False,
                           p=support_class_probs(self.classes, query_class))
        classes = tuple(int(self.classes[j]) for j in picks)
        support = []
        for c in classes:
            cands = [k for k in self.images_of[c] if k != query]
            support.append(tuple(cands[j] for j in rng.choice(len(cands), size=self.shot, replace=False)))
        return EpisodeSpec(i, query, int(query_class), classes, tuple(support))


def build_manifest(sampler: EpisodeSampler, count: int) -> dict[str, Any]:
    """Frozen manifest of episodes 0..count-1 with the settings that produced them."""
    return {"dataset": sampler.index.dataset, "role": sampler.role, "fold": sampler.fold, "way": sampler.way,
            "shot": sampler.shot, "seed": sampler.seed, "count": count, "query_mode": sampler.query_mode,
            "episodes": [sampler.episode(i).to_dict() for i in range(count)]}


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON (sorted keys, no spaces) of the settings and episodes."""
    body = {k: manifest[k] for k in _MANIFEST_FIELDS if k in manifest}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _way_targets(mask: np.ndarray, classes: Sequence[int], size: int) -> torch.Tensor:
    """uint8 mask [H, W] -> int64 [N, size, size]: 1 where == classes[n], 255 on the ignore band, else 0."""
    m = resize_mask(mask, size)
    return torch.stack([torch.where(m == IGNORE, IGNORE, (m == c).long()) for c in classes])


def _support_masks(rows: Sequence[Sequence[Sample]], classes: Sequence[int], size: int) -> torch.Tensor:
    """float [N, K, size, size]: 1 where the support pixel is its way's class (ignore 255 -> 0)."""
    return torch.stack([torch.stack([(resize_mask(s.mask, size) == c).float() for s in row])
                        for c, row in zip(classes, rows)])


def make_episode_tensors(spec: EpisodeSpec, samples: Mapping[str, Sample], image_size: int
                         ) -> dict[str, torch.Tensor]:
    """Tensors of one evaluation episode (S = image_size, N way, K shot).

    query_img [3,S,S] float; support_img [N,K,3,S,S] float; support_mask [N,K,S,S] float {0,1} (1 where the
    pixel is the way's class, ignore -> 0; only when all support masks exist); query_mask_abs uint8 [H,W]
    (original size; only when the query has a mask); classes [N] int64; presence [N] float {0,1} (from the
    query mask, else its labels).
    """
    q, size = samples[spec.query], image_size
    rows = [[samples[k] for k in keys] for keys in spec.support]
    out = {"query_img": to_tensor_image(q.image, size),
           "support_img": torch.stack([torch.stack([to_tensor_image(s.image, size) for s in row])
                                       for row in rows]),
           "classes": torch.tensor(spec.classes, dtype=torch.long)}
    if all(s.mask is not None for row in rows for s in row):
        out["support_mask"] = _support_masks(rows, spec.classes, size)
    present = set(q.labels)
    if q.mask is not None:
        out["query_mask_abs"] = torch.from_numpy(q.mask.copy())
        present = {int(v) for v in np.unique(q.mask)} - {0, IGNORE}
    out["presence"] = torch.tensor([float(c in present) for c in spec.classes])
    return out

"""The webdataset training stream: resampled shards split by rank and worker, episodes assembled from
per-class buffers, mixed-regime GT subsets, and the loader with a fixed number of steps per epoch."""
from __future__ import annotations

import functools
import hashlib
import logging
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from fscs.data.balance import balance_presence
from fscs.data.episodes import IGNORE, _images_per_class, _support_masks, _way_targets, support_class_probs
from fscs.data.shards import CorruptShardLog, decode_sample, read_index
from fscs.data.transforms import resize_mask, to_tensor_image
from fscs.data.types import Sample
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

_FULL_NEEDS_MASKS = ("train.regime=full trains on pixel masks: rebuild the shards with masks (e.g. fscs shards "
                     "folder --masks DIR), or train with image-level labels (train.regime=weak, or mixed with "
                     "train.gt_fraction)")


class _StreamGuard(CorruptShardLog):
    """Stream error handler: warns once per bad shard, then skips that shard for good (see `drop_bad`).

    Raises FSCSError when every shard is bad or after `limit` failures in a row (never spins forever).
    """

    def __init__(self, urls: Sequence[str], where: str) -> None:
        super().__init__()
        self.urls, self.where, self.bad = list(urls), where, set()
        self.limit, self.in_a_row = max(20, 4 * len(self.urls)), 0

    def __call__(self, exn: BaseException) -> bool:
        text = str(exn) + " ".join(map(str, getattr(exn, "args", ())))
        url = next((u for u in self.urls if u in text), None)
        if url is None or url not in self.bad:
            super().__call__(exn)
        else:
            self.count += 1
        if url is not None:
            self.bad.add(url)
        self._failed_in_a_row(str(exn))
        return True

    def _failed_in_a_row(self, last: str) -> None:
        """Count one more failed read in a row; too many (every shard bad) is an FSCSError, not a spin."""
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise FSCSError(f"{self.where}: {self.in_a_row} shard reads failed in a row (last: {last}); "
                            "regenerate the shards")

    def bad_sample(self, url: str, key: str, exn: BaseException) -> None:
        """One image of an otherwise readable shard failed to decode: warn naming it and skip it alone (the
        shard's other images stay in the stream); many failures in a row still raise."""
        self.count += 1
        self.errors.append(f"{url} {key}: {exn}")
        logger.warning("%s: skipping training image %r of %s that cannot be decoded (%s)", self.where, key, url,
                       exn)
        self._failed_in_a_row(f"{key} in {url}: {exn}")

    def drop_bad(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage over {"url"} dicts: skip shards that failed before."""
        for item in src:
            if len(self.bad) >= len(self.urls):
                raise FSCSError(f"{self.where}: all {len(self.urls)} shards are unreadable "
                                f"(e.g. {sorted(self.bad)[0]}); regenerate the shards")
            if item["url"] not in self.bad:
                yield item


def _split_by_rank(src: Iterator[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Node splitter with an explicit rank (webdataset's own reads env vars / torch.distributed)."""
    return islice(src, rank, None, world_size)


def _same_seed_everywhere() -> int:
    return 0  # one resampled shard sequence for all ranks/workers; the splitters then partition it


def _without_masks(fname: str) -> bool:
    return not fname.endswith(".mask.png")


def gt_subset_member(key: str, seed: int, fraction: float) -> bool:
    """Whether training image `key` has its ground-truth mask in the mixed regime.

    u = first 8 bytes of sha256("fscs-gt/<seed>/<key>") / 2**64 is uniform in [0, 1); the image is in the
    subset iff u < fraction. Depends only on (seed, key): the same on every rank, worker and epoch, and
    nested across fractions (the 5 % subset lies inside the 20 % subset of the same seed).
    """
    digest = hashlib.sha256(f"fscs-gt/{int(seed)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def gt_subset(keys: Iterable[str], seed: int, fraction: float) -> set[str]:
    """The keys of `keys` whose ground-truth masks the mixed regime may use (see gt_subset_member)."""
    return {k for k in keys if gt_subset_member(k, seed, fraction)}


class _SubsetMasks:
    """tar member filter: every file except the mask.png of images outside the GT subset (never read)."""

    def __init__(self, subset: set[str]) -> None:
        self.subset = subset

    def __call__(self, fname: str) -> bool:
        if not fname.endswith(".mask.png"):
            return True
        key, _ = base_plus_ext(fname)
        return key in self.subset


@dataclass(frozen=True)
class _Held:
    """One buffered training image as read from its shard: the tar members' bytes (image, json and, when the
    regime reads it, mask.png), decoded again by `decode` for each episode that uses it. Decoded arrays at
    full size were ~7x the JPEG bytes (COCO: ~0.9 MB per 640 x 480 image against ~0.15 MB)."""

    key: str
    files: Mapping[str, bytes]
    decode_masks: bool

    def decode(self) -> Sample:
        """The Sample these bytes decoded to when they entered the buffer (PIL decoding is deterministic)."""
        return decode_sample(self.key, self.files, decode_masks=self.decode_masks)


def _partial_support_masks(rows: Sequence[Sequence[Sample]], classes: Sequence[int], size: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K, size, size] way-class masks (zeros where a support has no mask) and bool has_gt [N, K]."""
    masks = torch.zeros(len(rows), len(rows[0]), size, size)
    has_gt = torch.zeros(len(rows), len(rows[0]), dtype=torch.bool)
    for i, (c, row) in enumerate(zip(classes, rows)):
        for j, s in enumerate(row):
            if s.mask is not None:
                masks[i, j] = (resize_mask(s.mask, size) == c).float()
                has_gt[i, j] = True
    return masks, has_gt


class TrainEpisodeStream(IterableDataset):
    """Infinite training episodes from the trn shards of `shard_dir` for test fold `fold` (webdataset).

    Yields dicts: query_img [3,S,S], support_img [N,K,3,S,S], presence [N] float, classes [N] int64, and only
    if use_masks: support_mask [N,K,S,S] float {0,1}, query_target [N,S,S] int64 (1 = way class, 0, 255 band).
    Mixed regime (use_masks=False, 0 < gt_fraction <= 1): only the mask.png files of the GT subset
    (gt_subset_member(key, gt_seed, gt_fraction)) are read and decoded; episodes also carry support_mask
    (zeros for supports without GT), support_has_gt [N,K] bool, query_target (all 255 when the query has no
    GT) and query_has_gt (0-dim bool). Weak (use_masks=False, gt_fraction=0): no mask file is ever read.
    Each rank/worker reads its own slice of one seeded resampled shard sequence and keeps per-class buffers of
    recent training images (their shard bytes, decoded again for each episode that uses them). The query
    follows index.json params["query_mode"] like the evaluation sampler: "entry" (default, PASCAL-5i) turns
    every incoming training image into a query, of one of its training classes drawn uniformly; "class"
    (COCO-20i, the reference's training rule) draws the query class uniformly over the training classes and
    the query image uniformly from that class's buffer, so frequent classes are not over-represented.
    Episodes start once the buffers they need are warm. balance_batch > 0 reorders them into presence-balanced
    groups of that many consecutive episodes (`fscs.data.balance`; a reordering, not a resampling).
    """

    def __init__(self, shard_dir: str | Path, fold: int, way: int, shot: int, image_size: int, seed: int,
                 use_masks: bool, rank: int = 0, world_size: int = 1, buffer_per_class: int = 64,
                 shuffle_buffer: int = 256, gt_fraction: float = 0.0, gt_seed: int | None = None,
                 balance_batch: int = 0) -> None:
        super().__init__()
        index = read_index(shard_dir)
        where = f"{index.root}/index.json lists[train] fold {fold}"
        entries = index.fold_entries("train", fold)
        self.train_classes = [c for c in index.fold_classes("train", fold) if any(e[1] == c for e in entries)]
        if not entries or not 1 <= way <= len(self.train_classes) or shot < 1:
            raise FSCSError(f"{where}: {len(entries)} entries, {len(self.train_classes)} classes; "
                            f"way={way} shot={shot} impossible")
        if seed < 0 or (gt_seed is not None and gt_seed < 0):
            raise FSCSError(f"train stream: seed {seed} (gt_seed {gt_seed}) is negative; use train.seed >= 0")
        if balance_batch < 0:
            raise FSCSError(f"train stream: balance_batch={balance_batch} is negative; use 0 (off) or the batch size")
        if not 0 <= rank < world_size or buffer_per_class < shot + 1:
            raise FSCSError(f"train stream: rank {rank} / world {world_size}, buffer_per_class "
                            f"{buffer_per_class} (needs > shot) invalid")
        _images_per_class(entries, self.train_classes, shot, where)
        if not 0.0 <= gt_fraction <= 1.0 or (use_masks and gt_fraction > 0):
            raise FSCSError(f"train stream: gt_fraction={gt_fraction} invalid; use 0 < train.gt_fraction "
                            "<= 1 with train.regime=mixed only")
        allowed: dict[str, set[int]] = {}
        for key, c in entries:
            allowed.setdefault(key, set()).add(c)
        self.allowed = {k: tuple(sorted(cs)) for k, cs in allowed.items()}
        if use_masks and all(index.samples[k].get("mask") is False for k in self.allowed):
            raise FSCSError(f"{where}: none of the {len(self.allowed)} training images has a mask.png; "
                            f"{_FULL_NEEDS_MASKS}")
        self.urls = sorted({str(index.root / index.samples[k]["shard"]) for k in self.allowed})
        self.where = where
        self.way, self.shot, self.image_size, self.seed = way, shot, image_size, seed
        self.use_masks, self.rank, self.world_size = use_masks, rank, world_size
        self.buffer_per_class, self.shuffle_buffer = buffer_per_class, shuffle_buffer
        self.gt_fraction, self.gt_seed = float(gt_fraction), int(seed if gt_seed is None else gt_seed)
        self.gt_keys: set[str] = set()
        self._no_mask = 0  # full regime: training images without a mask, skipped
        if gt_fraction:
            self.gt_keys = gt_subset(self.allowed, self.gt_seed, self.gt_fraction)
            logger.info("mixed regime: ground-truth masks for %d of %d training images (fraction %.3f, seed %d)",
                        len(self.gt_keys), len(self.allowed), self.gt_fraction, self.gt_seed)
        self.query_mode = str(index.params.get("query_mode", "entry"))
        self.balance_batch = int(balance_batch)
        self.epoch = 0

    @property
    def mixed(self) -> bool:
        """True when the stream delivers the GT subset's masks only (mixed regime)."""
        return not self.use_masks and self.gt_fraction > 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the shard sequence and episode RNG derive from (seed, epoch, rank, worker)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        episodes = self._episodes()
        return balance_presence(episodes, self.balance_batch) if self.balance_batch else episodes

    def _episodes(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        guard = _StreamGuard(self.urls, self.where)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=self.seed * 1_000_003 + self.epoch,
                                worker_seed=_same_seed_everywhere, deterministic=True),
            functools.partial(_split_by_rank, rank=self.rank, world_size=self.world_size),
            wds.split_by_worker,
            guard.drop_bad,
            wds.tarfile_to_samples(handler=guard, select_files=self._file_filter()),
            wds.shuffle(self.shuffle_buffer, initial=min(64, self.shuffle_buffer),
                        rng=random.Random(int(rng.integers(2**31)))),
        )
        buffers: dict[int, OrderedDict[str, _Held]] = {c: OrderedDict() for c in self.train_classes}
        no_mask_in_a_row = 0
        for raw in pipeline:
            classes = self.allowed.get(raw["__key__"])
            if not classes:
                continue  # not a training image of this fold
            try:
                files = {k: v for k, v in raw.items() if not k.startswith("__")}
                wants_mask = self.use_masks or raw["__key__"] in self.gt_keys
                sample = decode_sample(raw["__key__"], files, decode_masks=wants_mask)
                if self.use_masks and sample.mask is None:
                    # full regime: an image without a mask cannot be a training sample; the shard is fine
                    self._no_mask += 1
                    no_mask_in_a_row += 1
                    if self._no_mask == 1 or self._no_mask % 1000 == 0:
                        logger.warning("%s: %d training image(s) without mask.png skipped in the full regime "
                                       "(e.g. %r)", guard.where, self._no_mask, sample.key)
                    if no_mask_in_a_row >= max(1000, 2 * len(self.allowed)):
                        raise FSCSError(f"{self.where}: {no_mask_in_a_row} training images in a row have no "
                                        f"mask.png; {_FULL_NEEDS_MASKS}")
                    continue
                no_mask_in_a_row = 0
                # mixed: a GT-subset image without a mask on disk is simply pseudo-labelled (has_gt False)
            except Exception as exn:  # noqa: BLE001 - a bad sample is reported and skipped, not its shard
                guard.bad_sample(str(raw.get("__url__")), raw["__key__"], exn)
                continue
            guard.in_a_row = 0
            held = _Held(sample.key, files, wants_mask)  # decoded once above: a good sample
            if self.query_mode == "class":
                self._remember(held, classes, buffers)
                episode = self._class_episode(buffers, rng, sample)
            else:
                episode = self._episode(sample, classes[int(rng.integers(len(classes)))], buffers, rng)
                self._remember(held, classes, buffers)
            if episode is not None:
                yield episode

    def _remember(self, sample: _Held, classes: tuple[int, ...], buffers: dict[int, OrderedDict[str, _Held]]
                  ) -> None:
        """Put `sample` last in the buffer of each of its training classes (oldest dropped past the size)."""
        for c in classes:
            buffers[c].pop(sample.key, None)
            buffers[c][sample.key] = sample
            if len(buffers[c]) > self.buffer_per_class:
                buffers[c].popitem(last=False)

    def _class_episode(self, buffers: dict[int, OrderedDict[str, _Held]], rng: np.random.Generator,
                       latest: Sample) -> dict[str, torch.Tensor] | None:
        """query_mode "class" (COCO-20i): query class uniform over the training classes, query image uniform
        among that class's buffered images (None while that buffer is empty), as the reference trains.
        `latest` is the image just buffered, already decoded."""
        query_class = self.train_classes[int(rng.integers(len(self.train_classes)))]
        pool = buffers[query_class]
        if not pool:
            return None
        held = list(pool.values())[int(rng.integers(len(pool)))]
        return self._episode(latest if held.key == latest.key else held.decode(), query_class, buffers, rng)

    def _file_filter(self):
        """Which tar members are read: everything (full), no mask (weak), the subset's masks (mixed)."""
        if self.use_masks:
            return None
        return _SubsetMasks(self.gt_keys) if self.mixed else _without_masks

    def _episode(self, query: Sample, query_class: int, buffers: dict[int, OrderedDict[str, _Held]],
                 rng: np.random.Generator) -> dict[str, torch.Tensor] | None:
        """One episode with `query` as an image of `query_class` (None while a needed buffer has < K images
        besides the query). The supports are decoded here, once each, after all of them are drawn."""
        picks = rng.choice(len(self.train_classes), size=self.way, replace=False,
                           p=support_class_probs(self.train_classes, query_class))
        way_classes = [self.train_classes[j] for j in picks]
        drawn: list[list[_Held]] = []
        for c in way_classes:
            cands = [s for k, s in buffers[c].items() if k != query.key]
            if len(cands) < self.shot:
                return None
            drawn.append([cands[j] for j in rng.choice(len(cands), size=self.shot, replace=False)])
        decoded = {h.key: h.decode() for row in drawn for h in row}  # an image in two ways is decoded once
        support = [[decoded[h.key] for h in row] for row in drawn]
        size = self.image_size
        out = {"query_img": to_tensor_image(query.image, size),
               "support_img": torch.stack([torch.stack([to_tensor_image(s.image, size) for s in row])
                                           for row in support]),
               "presence": torch.tensor([float(c in query.labels) for c in way_classes]),
               "classes": torch.tensor(way_classes, dtype=torch.long)}
        if self.use_masks:
            out["support_mask"] = _support_masks(support, way_classes, size)
            out["query_target"] = _way_targets(query.mask, way_classes, size)
        elif self.mixed:
            out["support_mask"], out["support_has_gt"] = _partial_support_masks(support, way_classes, size)
            if query.mask is not None:
                out["query_target"] = _way_targets(query.mask, way_classes, size)
            else:
                out["query_target"] = torch.full((len(way_classes), size, size), IGNORE, dtype=torch.long)
            out["query_has_gt"] = torch.tensor(query.mask is not None)
        return out


class EpochWebLoader(wds.WebLoader):
    """WebLoader over a TrainEpisodeStream; advances the stream's epoch at every pass (`for b in loader`)."""

    def __init__(self, stream: TrainEpisodeStream, batch_size: int, num_workers: int) -> None:
        super().__init__(stream, batch_size=batch_size, num_workers=num_workers, persistent_workers=False)
        self.stream, self.epoch = stream, 0

    def set_epoch(self, epoch: int) -> None:
        """Next pass uses `epoch` (e.g. after resuming from a checkpoint)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Any]:
        self.stream.set_epoch(self.epoch)
        self.epoch += 1
        return super().__iter__()


def make_train_loader(stream: TrainEpisodeStream, batch_size: int, num_workers: int, steps_per_epoch: int
                      ) -> EpochWebLoader:
    """Batched loader with exactly `steps_per_epoch` batches per pass on every rank (`.with_epoch`)."""
    if batch_size < 1 or steps_per_epoch < 1 or num_workers < 0:
        raise FSCSError(f"train loader: batch_size={batch_size} steps_per_epoch={steps_per_epoch} "
                        f"num_workers={num_workers} invalid")
    return EpochWebLoader(stream, batch_size, num_workers).with_epoch(steps_per_epoch)

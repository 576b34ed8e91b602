"""Shared machinery of the real-dataset converters: validated decoding, hold-out, parallel atomic writing."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from fscs.atomic import remove_stale_tmp
from fscs.data.shard_write import write_shards
from fscs.data.shards import ROLES, ShardIndex, read_index
from fscs.data.transforms import pil_rgb
from fscs.data.types import Sample
from fscs.errors import FSCSError
from fscs.parallel import ordered_map
from fscs.progress import progress_bar

logger = logging.getLogger(__name__)

IGNORE = 255
CONVERTER_VERSION = 1
DOCS = "docs/real-data.md"
_SPLIT_ORDER = {"test": 0, "trn": 1, "val": 2}
Entries = list[tuple[str, int]]
Lists = dict[str, dict[int, Entries]]


def default_splits_dir(dataset: str) -> Path:
    """The shipped lists `<repo>/shards/splits/<dataset>` (next to the package); FSCSError if absent."""
    path = Path(__file__).resolve().parents[3] / "shards" / "splits" / dataset
    if not path.is_dir():
        raise FSCSError(f"{path}: standard split lists not found (package installed without the repo); "
                        f"pass --splits DIR pointing at a copy of shards/splits/{dataset}")
    return path


def files_sha256(paths: Iterable[Path]) -> str:
    """One sha256 over the names and bytes of `paths` (in the given order)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png"}


def read_rgb(path: Path) -> tuple[np.ndarray, tuple[str, bytes] | None]:
    """uint8 [H, W, 3] RGB pixels of an image file (EXIF orientation ignored, as the masks are), and the file's
    own bytes as (ext, bytes) when it is a JPEG or PNG: shards then store the original file, so a benchmark
    reads exactly the published pixels (a re-encoded JPEG would not decode to the same values)."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            original = (_KEEP_FORMATS[im.format], data) if im.format in _KEEP_FORMATS else None
            return pil_rgb(im), original
    except FileNotFoundError:
        raise FSCSError(f"{path}: image missing; restore it (layout in {DOCS})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
        raise FSCSError(f"{path}: unreadable image ({exn}); re-download or re-extract it") from None


def read_index_mask(path: Path) -> np.ndarray:
    """uint8 [H, W] values of an index PNG (mode L or P; I/I;16 when every value fits in 0..255)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError:
        raise FSCSError(f"{path}: mask missing; restore it (layout in {DOCS})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
        raise FSCSError(f"{path}: unreadable mask ({exn}); re-download or re-extract it") from None
    if mode in ("L", "P"):
        return arr.astype(np.uint8, copy=False)
    if mode in ("I", "I;16", "I;16B", "I;16L") and arr.size and 0 <= arr.min() and arr.max() <= 255:
        return arr.astype(np.uint8)
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        raise FSCSError(f"{path}: mask value {int(arr.max())} outside 0..255; masks must be 8-bit index PNGs")
    raise FSCSError(f"{path}: mask is a {mode} image, not an index PNG (one class id per pixel); "
                    "use the index masks (e.g. SegmentationClassAug), not colour renderings")


@dataclass(frozen=True)
class LabelSet:
    """Allowed mask values of a dataset: 0 background, 1..num_classes, and 255 (ignore) when `ignore`."""

    name: str
    num_classes: int
    ignore: bool = True

    def describe(self) -> str:
        return f"0..{self.num_classes}" + (f" and {IGNORE}" if self.ignore else "")

    def labels(self, mask: np.ndarray, where: str) -> tuple[int, ...]:
        """Sorted class ids present in `mask` [H, W] uint8; FSCSError when a value is outside the set."""
        counts = np.bincount(mask.ravel(), minlength=256)
        values = np.flatnonzero(counts)
        bad = [int(v) for v in values if v > self.num_classes and not (self.ignore and v == IGNORE)]
        if bad:
            raise FSCSError(f"{where}: mask values {bad[:5]} outside the {self.name} label set "
                            f"({self.describe()}); use the dataset's index masks (see {DOCS})")
        return tuple(int(v) for v in values if 1 <= v <= self.num_classes)


class MaskSpec(Protocol):
    """Where a sample's mask comes from (picklable: it travels to the worker processes)."""

    def describe(self) -> str: ...

    def load(self, image_shape: tuple[int, int]) -> np.ndarray: ...


@dataclass(frozen=True)
class PngMask:
    """An index PNG on disk."""

    path: str

    def describe(self) -> str:
        return self.path

    def load(self, image_shape: tuple[int, int]) -> np.ndarray:
        return read_index_mask(Path(self.path))


@dataclass(frozen=True)
class Job:
    """One image to convert: key, target split, image file, mask source, label set."""

    key: str
    split: str
    image: str
    mask: MaskSpec
    label_set: LabelSet


def load_job(job: Job) -> tuple[Sample, str]:
    """Decode and validate one image + mask (runs in a worker) -> (Sample, split)."""
    image, original = read_rgb(Path(job.image))
    mask = job.mask.load(image.shape[:2])
    if mask.shape != image.shape[:2]:
        raise FSCSError(f"{job.mask.describe()}: mask size {mask.shape[1]}x{mask.shape[0]} != image "
                        f"{job.image} size {image.shape[1]}x{image.shape[0]}; the mask belongs to another "
                        "image or was resized; replace it")
    labels = job.label_set.labels(mask, job.mask.describe())
    return Sample(key=job.key, image=image, mask=np.ascontiguousarray(mask), labels=labels,
                  encoded=original), job.split


def carve_holdout(images: Iterable[str], fraction: float, seed: int) -> set[str]:
    """round(fraction * n) of the distinct `images`, drawn with numpy's default_rng(seed) over their sorted order."""
    if not 0.0 <= fraction < 1.0:
        raise FSCSError(f"--select-fraction {fraction}: must be in [0, 1)")
    pool = sorted(set(images))
    n = round(fraction * len(pool))
    picks = np.random.default_rng(seed).permutation(len(pool))[:n]
    return {pool[i] for i in picks}


def dedupe(entries: Iterable[tuple[str, int]]) -> Entries:
    """Entries without repeats, first occurrence order."""
    return list(dict.fromkeys(entries))


def assign_splits(train: Mapping[int, Entries], test: Mapping[int, Entries], fraction: float, seed: int
                  ) -> tuple[dict[str, str], Lists, int]:
    """Split per image and the index lists from the standard lists (see docs/real-data.md).

    test = images of the test lists; trn = the other images of the training lists, minus a seeded hold-out
    of `fraction` of them which becomes split val and feeds lists["select"]. An image in both kinds of lists
    is stored once, in test; all of its entries stay in their lists as published. Returns
    (key -> split, lists[role][fold] = entries, number of images in both kinds of lists).
    """
    test_imgs = {k for es in test.values() for k, _ in es}
    train_imgs = {k for es in train.values() for k, _ in es}
    both = train_imgs & test_imgs
    if both:
        logger.warning("%d images appear in both the training and the test lists (e.g. %s); they are "
                       "stored once (split test) and keep all their list entries", len(both), min(both))
    held = carve_holdout(train_imgs - test_imgs, fraction, seed)
    splits = {k: "test" for k in test_imgs}
    splits.update({k: "val" if k in held else "trn" for k in train_imgs - test_imgs})
    lists: Lists = {r: {} for r in ROLES}
    for f, es in train.items():
        lists["train"][f] = [e for e in es if e[0] not in held]
        lists["select"][f] = [e for e in es if e[0] in held]
    for f, es in test.items():
        lists["test"][f] = list(es)
    return splits, lists, len(both)


@dataclass
class ConversionPlan:
    """Everything a conversion writes, decided before any image is read."""

    dataset: str
    class_names: dict[int, str]
    folds: dict[int, list[int]]
    lists: Lists
    splits: dict[str, str]
    params: dict[str, Any]
    jobs_fn: Callable[[], list[Job]]
    """Builds the jobs (may read annotation files; only called when the output must be written)."""
    missing_hint: str
    """How to fix a missing image or mask (appended to the error)."""
    list_lines: dict[str, int] = field(default_factory=dict)
    in_both: int = 0


@dataclass
class ConversionReport:
    """Counts of a finished (or reused) shard set, checked against the list files."""

    out: Path
    dataset: str
    reused: bool
    list_lines: dict[str, int]
    entries: dict[str, dict[int, int]]
    images: dict[str, int]
    absent_entries: int
    in_both: int = 0

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        rows = [f"{self.dataset} shards {'reused' if self.reused else 'written'}: {self.out}",
                "list files: " + ", ".join(f"{k} {v}" for k, v in self.list_lines.items())]
        for role, per in self.entries.items():
            rows.append(f"entries {role}: " + ", ".join(f"fold{f} {n}" for f, n in sorted(per.items())))
        rows.append("unique images: " + ", ".join(f"{s} {n}" for s, n in self.images.items())
                    + f", total {sum(self.images.values())}")
        if self.in_both:
            rows.append(f"note: {self.in_both} images are in both training and test lists (stored as test)")
        if self.absent_entries:
            rows.append(f"warning: {self.absent_entries} list entries name a class absent from their mask")
        return rows


def _json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(params)))


def is_complete(out: Path, dataset: str, params: Mapping[str, Any]) -> bool:
    """True when `out` holds a finished shard set of `dataset` written with `params` (all shard files intact)."""
    try:
        index = read_index(out)
    except FSCSError:
        return False
    return (index.dataset == dataset and index.params == _json_params(params)
            and all((out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s.get("bytes", -1)
                    for s in index.shards))


def _report(out: Path, index: ShardIndex, plan: ConversionPlan, reused: bool) -> ConversionReport:
    images: dict[str, int] = {s: 0 for s in _SPLIT_ORDER}
    for meta in index.samples.values():
        images[meta["split"]] += 1
    entries = {r: {f: len(es) for f, es in index.lists.get(r, {}).items()} for r in ROLES}
    absent = sum(1 for fl in index.lists.values() for es in fl.values() for k, c in es
                 if c not in index.samples[k]["labels"])
    planned = {r: {f: len(es) for f, es in plan.lists.get(r, {}).items()} for r in ROLES}
    if entries != planned or len(index.samples) != len(plan.splits):
        raise FSCSError(f"{out}/index.json: {len(index.samples)} images / entries {entries} do not match the "
                        f"lists ({len(plan.splits)} images / {planned}); delete {out} and rerun the conversion")
    return ConversionReport(out, index.dataset, reused, dict(plan.list_lines), entries, images, absent,
                            plan.in_both)


def _check_written(plan: ConversionPlan, records: list[dict[str, Any]]) -> None:
    """Before the rename: every listed image was written exactly once with its planned split."""
    written = {r["key"]: r["split"] for r in records}
    if len(written) != len(records) or written != plan.splits:
        missing = sorted(set(plan.splits) - set(written))
        raise FSCSError(f"{plan.dataset}: wrote {len(written)} images for {len(plan.splits)} listed "
                        f"(e.g. missing {missing[:1]}); rerun the conversion")


def _samples(jobs: Sequence[Job], workers: int, desc: str) -> Iterator[tuple[Sample, str]]:
    """Decoded, validated samples in job order; a worker's FSCSError aborts the whole conversion."""
    bar = progress_bar(total=len(jobs), desc=desc, unit="img")
    try:
        for item in ordered_map(load_job, jobs, workers, chunksize=8, what="conversion worker"):
            yield item
            bar.update()
    finally:
        bar.close()


def run_conversion(plan: ConversionPlan, out: str | Path, workers: int = 2, samples_per_shard: int = 1000
                   ) -> ConversionReport:
    """Write `plan` into `out` (atomic; reused when already complete) and report the counts."""
    out = Path(out)
    params = _json_params(plan.params)
    if is_complete(out, plan.dataset, params):
        logger.info("reusing complete shard set %s", out)
        return _report(out, read_index(out), plan, reused=True)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FSCSError(f"{out}: exists but is not a complete {plan.dataset!r} shard set made with these "
                        "parameters (other root, lists, --seed or --select-fraction?); delete it or pass another "
                        "--out")
    remove_stale_tmp(out.parent, out.name)  # folders of killed conversions
    jobs = sorted(plan.jobs_fn(), key=lambda j: (_SPLIT_ORDER[j.split], j.key))
    check_files(jobs, plan.missing_hint)

    def lists_fn(records: list[dict[str, Any]], folds: dict[int, list[int]]) -> Lists:
        _check_written(plan, records)
        return plan.lists

    samples = _samples(jobs, workers, f"{plan.dataset} -> {out.name}")
    try:
        write_shards(samples, out, dataset=plan.dataset, class_names=plan.class_names, folds=plan.folds,
                     lists_fn=lists_fn, samples_per_shard=samples_per_shard, params=params)
    finally:
        samples.close()  # stops the worker pool at once when the conversion failed
    report = _report(out, read_index(out), plan, reused=False)
    if report.absent_entries:
        logger.warning("%s: %d list entries name a class that is absent from their mask", out,
                       report.absent_entries)
    return report


def check_files(jobs: Sequence[Job], hint: str) -> None:
    """Fail fast, before any decoding, when listed images or masks are missing (names the first one)."""
    missing = [j.image for j in jobs if not os.path.isfile(j.image)]
    missing += [j.mask.path for j in jobs if isinstance(j.mask, PngMask) and not os.path.isfile(j.mask.path)]
    if missing:
        first = Path(missing[0])
        more = f" (and {len(missing) - 1} more files)" if len(missing) > 1 else ""
        if not first.parent.is_dir():
            raise FSCSError(f"{first.parent}: directory missing (needed for {first.name}{more}); {hint}")
        raise FSCSError(f"{first}: missing{more}; {hint}")


def lists_only_index(plan: ConversionPlan, root: Path) -> ShardIndex:
    """A ShardIndex built from the lists alone (no tars): labels = the classes of each image's entries."""
    labels: dict[str, set[int]] = {k: set() for k in plan.splits}
    for fl in plan.lists.values():
        for es in fl.values():
            for k, c in es:
                labels[k].add(c)
    samples = {k: {"labels": sorted(labels[k]), "split": s, "shard": "", "height": 0, "width": 0}
               for k, s in plan.splits.items()}
    return ShardIndex(root=root, dataset=plan.dataset, num_classes=len(plan.class_names),
                      class_names=dict(plan.class_names), folds=dict(plan.folds), shards=[],
                      samples=samples, lists=plan.lists, params=_json_params(plan.params))

"""Tar shards (`fscs-shards/1`): index.json and corrupt-tolerant reading (writing: `shard_write`)."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fscs.data.transforms import pil_rgb
from fscs.data.types import Sample
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

FORMAT = "fscs-shards/1"
SPLITS = ("trn", "val", "test")
ROLES = ("train", "select", "test")
_IMAGE_EXTS = ("jpg", "jpeg", "png")
_REBUILD = {"synthetic": "fscs shards synth --out DIR",
            "pascal": "fscs shards pascal --root VOCdevkit/VOC2012 --out DIR",
            "coco": "fscs shards coco --root COCO2014 --out DIR"}


def rebuild_hint(dataset: str | None, root: str | Path) -> str:
    """The command that (re)creates a shard set of `dataset` at `root` (all of them when it is unknown)."""
    low = (dataset or "").lower()
    cmd = next((c for name, c in _REBUILD.items() if name in low), None)
    if cmd is None:
        cmd = ("fscs shards folder --images ... --out DIR" if dataset else
               "fscs shards synth|pascal|coco|folder ... --out DIR")
    return f"`{cmd}` with DIR={root}"


class ShardReadError(Exception):
    """A shard (or one sample in it) could not be read; the message starts with the file name."""


class CorruptShardLog:
    """Exception handler (webdataset protocol: `handler(exn) -> True` = skip and continue).

    Logs a warning naming the file (unless `quiet`), counts the skips in `count` and remembers the messages in
    `errors`.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.count, self.quiet = 0, quiet
        self.errors: list[str] = []

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        self.errors.append(str(exn))
        if not self.quiet:
            logger.warning("skipping unreadable shard data: %s", exn)
        return True


@dataclass(frozen=True)
class ShardIndex:
    """Parsed index.json of a shard directory (`root`); see shards/README.md for the fields."""

    root: Path
    dataset: str
    num_classes: int
    class_names: dict[int, str]
    folds: dict[int, list[int]]
    shards: list[dict[str, Any]]
    samples: dict[str, dict[str, Any]]
    lists: dict[str, dict[int, list[tuple[str, int]]]]
    params: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    sha256: str = ""
    """sha256 of index.json's bytes: with the shards' own checksums in it, an identity of the data."""

    def fold_entries(self, role: str, fold: int) -> list[tuple[str, int]]:
        """(key, class) entries: train/select = union over folds j != fold; test = the fold's own list."""
        if role not in ROLES:
            raise FSCSError(f"{self.root}/index.json: role {role!r} is not one of {ROLES}")
        if fold not in self.folds:
            raise FSCSError(f"{self.root}/index.json: fold {fold} not in folds {sorted(self.folds)}")
        lists = self.lists.get(role, {})
        if role == "test":
            return list(lists.get(fold, []))
        return [e for j in sorted(lists) if j != fold for e in lists[j]]

    def fold_classes(self, role: str, fold: int) -> list[int]:
        """Classes episodes of `role` draw from: test = fold's classes; train/select = all the others."""
        if fold not in self.folds:
            raise FSCSError(f"{self.root}/index.json: fold {fold} not in folds {sorted(self.folds)}")
        if role == "test":
            return sorted(self.folds[fold])
        return [c for c in range(1, self.num_classes + 1) if c not in set(self.folds[fold])]

    def shard_paths(self, split: str) -> list[str]:
        """Absolute paths of the shards of `split` (trn | val | test), in file order."""
        return [str(self.root / s["file"]) for s in self.shards if s["split"] == split]


def read_index(shard_dir: str | Path) -> ShardIndex:
    """Load `shard_dir/index.json`; FSCSError naming the dir and how to create it when missing/invalid."""
    root = Path(shard_dir)
    path = root / "index.json"
    if not path.is_file():
        raise FSCSError(f"{path}: no shard index; create the shards first: {rebuild_hint(None, root)}")
    raw: Any = None
    try:
        data = path.read_bytes()
        raw = json.loads(data)
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r} != {FORMAT!r}")
        broken = next((k for k, m in raw["samples"].items() if not isinstance(m, dict) or "shard" not in m), None)
        if broken is not None:
            raise ValueError(f"sample {broken!r} names no shard")
        unknown = next((k for fl in raw.get("lists", {}).values() for es in fl.values() for k, _ in es
                        if k not in raw["samples"]), None)
        if unknown is not None:
            raise ValueError(f"list entry {unknown!r} is not among the samples")
        num_classes = int(raw["num_classes"])
        outside = next((c for cs in raw["folds"].values() for c in cs if not 1 <= int(c) <= num_classes), None)
        if outside is not None:  # training classes = 1..C minus the fold's: the test fold's would be trained on
            raise ValueError(f"fold class {outside} is outside 1..num_classes={num_classes}")
        return ShardIndex(
            root=root.resolve(), dataset=raw["dataset"], num_classes=num_classes,
            class_names={int(c): n for c, n in raw["class_names"].items()},
            folds={int(f): [int(c) for c in cs] for f, cs in raw["folds"].items()},
            shards=list(raw["shards"]), samples=dict(raw["samples"]),
            lists={r: {int(f): [(str(k), int(c)) for k, c in es] for f, es in fl.items()}
                   for r, fl in raw.get("lists", {}).items()},
            params=dict(raw.get("params", {})), sha256=hashlib.sha256(data).hexdigest())
    except (ValueError, KeyError, TypeError, AttributeError) as exn:
        dataset = raw.get("dataset") if isinstance(raw, dict) else None
        raise FSCSError(f"{path}: invalid shard index ({exn}); delete {root} and rerun "
                        f"{rebuild_hint(dataset, root)}") from None


def decode_sample(key: str, files: Mapping[str, bytes], decode_masks: bool = True) -> Sample:
    """Decode one sample's files ({"jpg"|"png", "json", ["mask.png"]}) with PIL into a Sample (uint8)."""
    ext = next((e for e in _IMAGE_EXTS if e in files), None)
    if ext is None or "json" not in files:
        raise ShardReadError(f"sample {key!r} lacks an image or its json (has {sorted(files)})")
    with Image.open(io.BytesIO(files[ext])) as im:
        image = pil_rgb(im)
    meta = json.loads(files["json"])
    mask = None
    if decode_masks and "mask.png" in files:
        with Image.open(io.BytesIO(files["mask.png"])) as im:
            mask = np.array(im if im.mode in ("L", "P") else im.convert("L"), dtype=np.uint8)
        if mask.shape != image.shape[:2]:
            raise ShardReadError(f"sample {key!r}: mask {mask.shape} != image {image.shape[:2]}")
    return Sample(key=key, image=image, mask=mask, labels=tuple(sorted(int(c) for c in meta["labels"])))


def _checked_members(tf: tarfile.TarFile, path: str) -> list[tarfile.TarInfo]:
    """All member headers, after checking that the archive ends with its zero end-of-archive blocks."""
    members = tf.getmembers()
    fileobj = tf.fileobj
    fileobj.seek(tf.offset)
    tail = fileobj.read(2 * tarfile.BLOCKSIZE)
    if len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
        raise ShardReadError(f"{path}: truncated tar (no end-of-archive marker after {len(members)} members)")
    return members


def iter_shard_samples(paths: Iterable[str | Path], *, decode_masks: bool = True,
                       handler: Callable[[BaseException], bool] | None = None,
                       keys: set[str] | None = None) -> Iterator[Sample]:
    """Yield the Samples of each shard in order (only `keys` when given).

    A garbage or truncated tar is reported to `handler` (default: a CorruptShardLog, which logs a warning
    with the file name and counts) and skipped whole; an undecodable sample is reported and skipped alone.
    The handler returning False stops the iteration.
    """
    yield from _iter_shards(paths, lambda key, files: decode_sample(key, files, decode_masks),
                            decode_masks=decode_masks, handler=handler, keys=keys)


def _iter_shards(paths: Iterable[str | Path], convert: Callable[[str, dict[str, bytes]], Any], *,
                 decode_masks: bool, handler: Callable[[BaseException], bool] | None,
                 keys: set[str] | None) -> Iterator[Any]:
    """`convert(key, files)` of each sample of each shard in order (see iter_shard_samples): files = its tar
    members' bytes by extension (no "mask.png" unless decode_masks); an exception in `convert` skips the
    sample like an unreadable one."""
    handler = handler if handler is not None else CorruptShardLog()
    for path in map(str, paths):
        try:
            tf = tarfile.open(path, "r:")
        except (OSError, tarfile.TarError) as exn:
            if not handler(ShardReadError(f"{path}: not a readable tar ({exn})")):
                return
            continue
        with tf:
            try:
                members = _checked_members(tf, path)
            except (OSError, tarfile.TarError, ShardReadError) as exn:
                if not handler(exn if isinstance(exn, ShardReadError) else ShardReadError(f"{path}: {exn}")):
                    return
                continue
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in members:
                if m.isfile():
                    key, _, ext = os.path.basename(m.name).partition(".")
                    groups.setdefault(key, {})[ext.lower()] = m
            for key, group in groups.items():
                if keys is not None and key not in keys:
                    continue
                try:
                    wanted = {e: m for e, m in group.items() if decode_masks or e != "mask.png"}
                    files = {e: tf.extractfile(m).read() for e, m in wanted.items()}
                    yield convert(key, files)
                except Exception as exn:  # noqa: BLE001 - any bad sample is skipped, reported by name
                    if not handler(ShardReadError(f"{path}: sample {key!r}: {exn}")):
                        return


def _read_keys(index: ShardIndex, keys: set[str], convert: Callable[[str, dict[str, bytes]], Any],
               decode_masks: bool) -> dict[str, Any]:
    """{key: convert(key, files)} of `keys`, reading the shards holding them (each once, in order); a one-line
    FSCSError when a key is not in the index or its sample cannot be read."""
    unknown = [k for k in keys if k not in index.samples]
    if unknown:
        raise FSCSError(f"{index.root}/index.json: {len(unknown)} keys not in the index (e.g. "
                        f"{unknown[0]!r}); the episode manifest was built from another shard set")
    shards = sorted({index.samples[k]["shard"] for k in keys})
    log = CorruptShardLog()
    paths = [index.root / f for f in shards]
    out = {s.key: s for s in _iter_shards(paths, convert, decode_masks=decode_masks, handler=log,
                                          keys=set(keys))}
    missing = [k for k in keys if k not in out]
    if missing:
        raise FSCSError(f"{index.root}: {len(missing)} samples (e.g. {missing[0]!r}) unreadable in "
                        f"{log.errors[:1] or shards}; regenerate the shards "
                        f"({rebuild_hint(index.dataset, index.root)})")
    return out


def load_samples(index: ShardIndex, keys: set[str], decode_masks: bool = True) -> dict[str, Sample]:
    """Random access: read the shards holding `keys` (each once, in order) -> {key: decoded Sample}."""
    return _read_keys(index, keys, lambda key, files: decode_sample(key, files, decode_masks), decode_masks)


@dataclass(frozen=True)
class EncodedSample:
    """One sample as its shard holds it, for evaluation: the tar members' bytes (image, json, mask.png), plus
    what was learnt when they were first decoded (the original size, whether a mask exists, the labels and
    sample_digest of the decoded arrays). `decode` gives the same Sample again (PIL decoding is
    deterministic); the arrays were ~8x the bytes (a 640 x 480 JPEG + mask: ~1.2 MB against ~0.14 MB)."""

    key: str
    files: Mapping[str, bytes]
    size: tuple[int, int]
    """(H, W) of the image (and of its mask)."""
    has_mask: bool
    labels: tuple[int, ...]
    digest: str

    def decode(self, masks: bool = True) -> Sample:
        """The decoded Sample; masks=False leaves its mask undecoded (None)."""
        return decode_sample(self.key, self.files, decode_masks=masks)


def _encoded(key: str, files: dict[str, bytes]) -> EncodedSample:
    """Decode once (a bad sample fails here, when it is read) to learn its size, mask and digest."""
    sample = decode_sample(key, files, decode_masks=True)
    return EncodedSample(key, files, sample.image.shape[:2], sample.mask is not None, sample.labels,
                         sample_digest(sample))


def load_encoded(index: ShardIndex, keys: set[str]) -> dict[str, EncodedSample]:
    """Like load_samples (masks included, same errors), but each sample is kept as its shard bytes: decoded
    once here (an unreadable one fails now) and again by EncodedSample.decode where it is used."""
    return _read_keys(index, keys, _encoded, decode_masks=True)


def sample_digest(sample: Sample) -> str:
    """sha256 of what an evaluation reads from one image: its decoded pixels, its mask (or that it has none)
    and its image-level labels."""
    h = hashlib.sha256(repr((sample.key, sample.image.shape, sample.labels,
                             None if sample.mask is None else sample.mask.shape)).encode())
    h.update(np.ascontiguousarray(sample.image).tobytes())
    if sample.mask is not None:
        h.update(np.ascontiguousarray(sample.mask).tobytes())
    return h.hexdigest()


def data_digest(digests: Mapping[str, str]) -> str:
    """One sha256 over {key: sample_digest}: equal iff the same images, masks and labels were read."""
    return hashlib.sha256("".join(f"{k} {digests[k]}\n" for k in sorted(digests)).encode()).hexdigest()

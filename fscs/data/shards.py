"""Tar shards (`fscs-shards/1`): atomic cached writing, index.json, corrupt-tolerant reading."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fscs.atomic import make_output_dir, remove_stale_tmp
from fscs.data.transforms import pil_rgb
from fscs.data.types import Sample
from fscs.digest import file_sha256
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

FORMAT = "fscs-shards/1"
SPLITS = ("trn", "val", "test")
ROLES = ("train", "select", "test")
_ROLE_OF_SPLIT = {"trn": "train", "val": "select", "test": "test"}
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
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

ListsFn = Callable[[list[dict[str, Any]], dict[int, list[int]]], dict[str, dict[int, list[tuple[str, int]]]]]


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


def default_lists(records: list[dict[str, Any]], folds: dict[int, list[int]]
                  ) -> dict[str, dict[int, list[tuple[str, int]]]]:
    """Lists by split (trn -> train, val -> select, test -> test): one (key, c) per label c, in c's fold."""
    fold_of = {c: f for f, cs in folds.items() for c in cs}
    lists: dict[str, dict[int, list[tuple[str, int]]]] = {r: {f: [] for f in folds} for r in ROLES}
    for rec in records:
        for c in rec["labels"]:
            lists[_ROLE_OF_SPLIT[rec["split"]]][fold_of[c]].append((rec["key"], int(c)))
    return lists


def _encode(sample: Sample) -> dict[str, bytes]:
    """Tar members of a sample: the source file's own bytes when the sample carries them, else JPEG q95."""
    if sample.encoded is not None:
        files = {sample.encoded[0]: sample.encoded[1]}
    else:
        buf = io.BytesIO()
        Image.fromarray(sample.image, "RGB").save(buf, format="JPEG", quality=95)
        files = {"jpg": buf.getvalue()}
    if sample.mask is not None:
        buf = io.BytesIO()
        Image.fromarray(sample.mask, "L").save(buf, format="PNG")
        files["mask.png"] = buf.getvalue()
    return files


class _SplitWriter:
    """Writes the samples of all splits into `{split}-{NNNNNN}.tar` files of at most `per_shard` samples."""

    def __init__(self, root: Path, per_shard: int) -> None:
        self.root, self.per_shard = root, per_shard
        self.open: dict[str, tuple[tarfile.TarFile, dict[str, Any]]] = {}
        self.shards: list[dict[str, Any]] = []

    def add(self, key: str, split: str, files: dict[str, bytes]) -> str:
        tf, entry = self.open.get(split, (None, None))
        if tf is None or entry["count"] >= self.per_shard:
            if tf is not None:
                self._close(split)
            n = sum(1 for s in self.shards if s["split"] == split)
            entry = {"file": f"{split}-{n:06d}.tar", "split": split, "count": 0}
            self.shards.append(entry)
            tf = tarfile.open(self.root / entry["file"], "w", format=tarfile.USTAR_FORMAT)
            self.open[split] = (tf, entry)
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
        entry["count"] += 1
        return entry["file"]

    def _close(self, split: str) -> None:
        tf, entry = self.open.pop(split)
        tf.close()
        entry["bytes"] = (self.root / entry["file"]).stat().st_size
        entry["sha256"] = file_sha256(self.root / entry["file"])

    def close(self) -> list[dict[str, Any]]:
        for split in list(self.open):
            self._close(split)
        return sorted(self.shards, key=lambda s: s["file"])


def _cached(out: Path, dataset: str, params: dict[str, Any]) -> bool:
    """True when `out` holds a complete shard set of `dataset` written with `params`."""
    try:
        index = json.loads((out / "index.json").read_text())
        if index.get("format") != FORMAT or index.get("dataset") != dataset or index.get("params") != params:
            return False
        return all((out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s.get("bytes", -1)
                   for s in index["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_shards(samples: Iterable[tuple[Sample, str]], out_dir: str | Path, *, dataset: str,
                 class_names: Sequence[str] | Mapping[int, str], folds: Mapping[int, Sequence[int]],
                 lists_fn: ListsFn | None = None, samples_per_shard: int = 1000,
                 params: Mapping[str, Any] | None = None) -> Path:
    """Write (sample, split) pairs as tar shards + index.json into `out_dir`; returns `out_dir`.

    Atomic (written to `out_dir.tmp-<pid>`, then renamed) and cached: if `out_dir` already holds a complete
    set of the same `dataset` and `params`, nothing is consumed or written. `lists_fn(records, folds)` builds
    index["lists"] from records {"key", "labels", "split"} (default: `default_lists`).
    """
    out = Path(out_dir)
    names = dict(class_names) if isinstance(class_names, Mapping) else dict(enumerate(class_names, start=1))
    fold_map = {int(f): [int(c) for c in cs] for f, cs in folds.items()}
    params = json.loads(json.dumps(dict(params or {})))
    if out.exists():
        if _cached(out, dataset, params):
            logger.info("reusing complete shard set %s", out)
            return out
        if not out.is_dir() or any(out.iterdir()):
            raise FSCSError(f"{out}: exists but is not a complete {dataset!r} shard set with these "
                            "parameters; delete it or pass another --out")
    make_output_dir(out.parent, "--out", shown=out)  # a file in the way: a one-line error before any sample is read
    remove_stale_tmp(out.parent, out.name)  # folders of killed earlier attempts
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer, records, index_samples = _SplitWriter(tmp, samples_per_shard), [], {}
        for sample, split in samples:
            _validate(sample, split, len(names), index_samples)
            shard = writer.add(sample.key, split, _encode(sample) | {"json": _meta_bytes(sample, split)})
            h, w = sample.image.shape[:2]
            labels = [int(c) for c in sample.labels]
            index_samples[sample.key] = {"labels": labels, "split": split, "shard": shard,
                                         "height": h, "width": w, "mask": sample.mask is not None}
            records.append({"key": sample.key, "labels": labels, "split": split})
        shards = writer.close()
        lists = (lists_fn or default_lists)(records, fold_map)
        index = {"format": FORMAT, "dataset": dataset, "num_classes": len(names),
                 "class_names": {str(c): n for c, n in names.items()},
                 "folds": {str(f): cs for f, cs in fold_map.items()}, "params": params, "shards": shards,
                 "samples": index_samples,
                 "lists": {r: {str(f): [[k, int(c)] for k, c in es] for f, es in fl.items()}
                           for r, fl in lists.items()}}
        (tmp / "index.json").write_text(json.dumps(index))
        if out.is_dir():
            out.rmdir()  # empty directory left by the user
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _cached(out, dataset, params):  # another process finished the same set first
            return out
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d samples in %d shards to %s", len(index_samples), len(shards), out)
    return out


def _meta_bytes(sample: Sample, split: str) -> bytes:
    h, w = sample.image.shape[:2]
    return json.dumps({"key": sample.key, "labels": [int(c) for c in sample.labels], "split": split,
                       "height": h, "width": w}).encode()


def _validate(sample: Sample, split: str, num_classes: int, seen: dict[str, Any]) -> None:
    where = f"sample {sample.key!r}"
    if not _KEY_RE.match(sample.key):
        raise FSCSError(f"{where}: key must match [A-Za-z0-9_-]+; rename the sample")
    if sample.key in seen:
        raise FSCSError(f"{where}: duplicate key; keys must be unique across splits")
    if split not in SPLITS:
        raise FSCSError(f"{where}: split {split!r} is not one of {SPLITS}")
    if sample.image.dtype != np.uint8 or sample.image.ndim != 3 or sample.image.shape[2] != 3:
        raise FSCSError(f"{where}: image must be uint8 [H, W, 3], got {sample.image.dtype} "
                        f"{sample.image.shape}")
    if sample.mask is not None and sample.mask.shape != sample.image.shape[:2]:
        raise FSCSError(f"{where}: mask shape {sample.mask.shape} != image {sample.image.shape[:2]}")
    if any(not 1 <= c <= num_classes for c in sample.labels):
        raise FSCSError(f"{where}: labels {sample.labels} outside 1..{num_classes}")


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


def shards_fingerprint(index: ShardIndex) -> str:
    """A cheap identity of a shard directory as it is on disk: index.json's bytes and each shard's name, size
    and modification time (regenerated shards get a new one; a copy may too, which only costs a recompute)."""
    h = hashlib.sha256((index.root / "index.json").read_bytes())
    for shard in index.shards:
        st = (index.root / shard["file"]).stat()
        h.update(f"{shard['file']} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def verify_shards(index: ShardIndex, *, decode: bool = False) -> tuple[list[str], int]:
    """Check a shard directory against its index.json -> (problems, samples checked); problems name the file.

    Each shard: present, of the recorded size and sha256 (shard sets written before checksums were recorded
    are checked by size alone), a complete tar holding exactly the samples the index assigns to it. With
    `decode`, every image and mask is decoded too (catches files that were bad before they were sharded).
    """
    problems: list[str] = []
    expected: dict[str, set[str]] = {}
    for key, meta in index.samples.items():
        expected.setdefault(meta["shard"], set()).add(key)
    listed = {s["file"] for s in index.shards}
    problems += [f"{index.root / f}: named by {len(ks)} samples but not listed among the shards"
                 for f, ks in sorted(expected.items()) if f not in listed]
    checked = 0
    for shard in index.shards:
        path = index.root / shard["file"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            problems.append(f"{path}: {size} bytes, index.json says {shard['bytes']}")
            continue
        if "sha256" in shard and file_sha256(path) != shard["sha256"]:
            problems.append(f"{path}: content differs from index.json (sha256 mismatch)")
            continue
        errors: list[str] = []
        seen = _shard_keys(path, errors)
        want = expected.get(shard["file"], set())
        if not errors and seen != want:
            extra, lost = sorted(seen - want), sorted(want - seen)
            errors.append(f"{path}: holds {len(seen)} samples, index.json assigns {len(want)} "
                          f"(missing e.g. {lost[:1]}, unexpected e.g. {extra[:1]})")
        if decode and not errors:
            log = CorruptShardLog(quiet=True)
            for _ in iter_shard_samples([path], handler=log):
                pass
            errors += log.errors
        problems += errors
        checked += len(seen & want)
    return problems, checked


def _shard_keys(path: Path, errors: list[str]) -> set[str]:
    """Sample keys of one complete tar (appends a message to `errors` when it is not one)."""
    try:
        with tarfile.open(path, "r:") as tf:
            return {os.path.basename(m.name).partition(".")[0] for m in _checked_members(tf, str(path))
                    if m.isfile()}
    except (OSError, tarfile.TarError, ShardReadError) as exn:
        errors.append(str(exn) if isinstance(exn, ShardReadError) else f"{path}: not a readable tar ({exn})")
        return set()

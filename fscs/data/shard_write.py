"""Writing tar shards (`fscs-shards/1`): samples -> `{split}-NNNNNN.tar` + index.json, atomic and cached."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fscs.atomic import make_output_dir, remove_stale_tmp
from fscs.data.shards import FORMAT, ROLES, SPLITS
from fscs.data.types import Sample
from fscs.digest import file_sha256
from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

_ROLE_OF_SPLIT = {"trn": "train", "val": "select", "test": "test"}
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")

ListsFn = Callable[[list[dict[str, Any]], dict[int, list[int]]], dict[str, dict[int, list[tuple[str, int]]]]]


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

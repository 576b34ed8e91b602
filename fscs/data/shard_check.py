"""A shard directory as it is on disk: its cheap fingerprint, and `fscs shards verify` against index.json."""
from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

from fscs.data.shards import CorruptShardLog, ShardIndex, ShardReadError, _checked_members, iter_shard_samples
from fscs.digest import file_sha256


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

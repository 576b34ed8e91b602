"""Atomic file writes: a temporary sibling, then a rename, so a reader never sees a partial file."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename inside it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic_with(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, durable: bool = False) -> None:
    """Call write(fh) on `path.tmp-<pid>` (folder created if missing), then rename it over `path`.

    durable: also fsync the file before and its folder after the rename (checkpoints: the write survives a
    crash of the machine, not only of the process). The temporary file is removed if `write` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> None:
    """`data` at `path`, atomically (see write_atomic_with)."""
    write_atomic_with(path, lambda fh: fh.write(data), durable=durable)


def write_text_atomic(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    """`text` (UTF-8) at `path`, atomically (see write_atomic_with)."""
    write_bytes_atomic(path, text.encode("utf-8"), durable=durable)

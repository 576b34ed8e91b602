"""Atomic file writes: a temporary sibling, then a rename, so a reader never sees a partial file."""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fscs.errors import FSCSError

logger = logging.getLogger(__name__)


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


def make_output_dir(path: str | os.PathLike, option: str, shown: str | os.PathLike | None = None) -> Path:
    """Create the output folder `path` (and its parents) before any work is done for it; a path that cannot be
    a folder (a file is in the way, no permission, read-only disk) is a one-line FSCSError naming `option` and
    `shown` (default `path`: the value the user gave)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FSCSError(f"{option} {shown or path}: cannot create {path} ({exc.strerror or exc}); pass a "
                        f"writable {option}") from None
    return path


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


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (this process counts as gone: its own leftovers are stale)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(directory: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Remove the `<prefix>*.tmp-<pid>` files and folders in `directory` whose process is gone: what a killed
    atomic write (or shard conversion) leaves behind. Those of live processes are kept. Returns the removed."""
    removed = []
    folder = Path(directory)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f"{prefix}*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    if removed:
        logger.info("removed %d temporary file(s) left by interrupted writes in %s (e.g. %s)", len(removed),
                    folder, removed[0].name)
    return removed

"""Order-preserving parallel map over worker processes, with a bounded number of results in flight.

`multiprocessing.Pool.imap` decodes as far ahead as its workers can go while the consumer (a single-threaded
tar writer) lags, so memory grows with the dataset; and when a worker is killed (the out-of-memory killer)
it waits forever. `ordered_map` submits a few chunks per worker ahead of the consumer only, and turns a dead
worker into a one-line error. `end_new_children` ends a data loader's workers after an error.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Any, TypeVar

from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def _apply(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(item) for item in chunk]


def _exit_on_ctrl_c(signum: int, frame: Any) -> None:
    os._exit(128 + signum)


def _init_worker(parent: int | None = None) -> None:
    """Worker initializer. Ctrl-C reaches the workers too (the terminal signals the whole process group): a
    worker ends at once and quietly, leaving the parent's one-line message alone on the screen instead of a
    KeyboardInterrupt traceback per worker. On Linux the kernel also kills the worker when the process that
    started it dies, so a killed conversion leaves no orphaned workers holding their memory
    (PR_SET_PDEATHSIG). A parent that died between the fork and the prctl sends no signal: the worker sees
    that it was re-parented (getppid() is no longer `parent`, the pid of the process that made the pool)
    and ends itself.
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # started with Ctrl-C ignored (`cmd &` in a
        signal.signal(signal.SIGINT, _exit_on_ctrl_c)          # script): the workers keep ignoring it
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        logger.debug("prctl(PR_SET_PDEATHSIG) unavailable; workers may outlive a killed parent")
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, *, chunksize: int = 8, ahead: int = 2,
                what: str = "worker") -> Iterator[R]:
    """fn over items in `workers` processes (fork where available), results in input order.

    At most workers * ahead chunks of `chunksize` items are submitted beyond what the caller has taken; the
    items iterable is read lazily. An exception raised by fn is re-raised here (the rest is cancelled); a
    worker process that dies raises FSCSError naming `what`. workers <= 1 maps in this process.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    source = iter(items)
    pending: deque[Future] = deque()
    interrupted = False
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(os.getpid(),)) as pool:
        try:
            while True:
                while len(pending) < workers * ahead:
                    chunk = list(islice(source, chunksize))
                    if not chunk:
                        break
                    pending.append(pool.submit(_apply, fn, chunk))
                if not pending:
                    return
                yield from pending.popleft().result()
        except BrokenProcessPool:
            raise FSCSError(f"a {what} process died (killed by the system, e.g. out of memory); rerun with fewer "
                            "--workers") from None
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            # After Ctrl-C the workers end too and the pool fails every pending future itself; cancelling one
            # first makes Python 3.11's pool thread print an InvalidStateError traceback under the message.
            for fut in () if interrupted else pending:
                fut.cancel()


def end_new_children(known: set[int]) -> None:
    """Kill the child processes started since `known` was taken (the loader's workers) and reap them.

    After an error the workers must go now: they ignore SIGTERM (`ignore_in_worker`), and multiprocessing's
    exit handler, which sends SIGTERM and then joins them, would wait for them forever.
    """
    for proc in multiprocessing.active_children():
        if proc.pid not in known:
            proc.kill()
            proc.join(10)

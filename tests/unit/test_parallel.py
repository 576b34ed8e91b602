"""ordered_map: input order, bounded read-ahead, worker errors and dead workers."""
from __future__ import annotations

import os
import signal

import pytest

from fscs.errors import FSCSError
from fscs.parallel import ordered_map


def _square(x: int) -> int:
    return x * x


def _fail_at_5(x: int) -> int:
    if x == 5:
        raise FSCSError("item 5 is bad")
    return x


def _die_at_5(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return x


def test_order_and_in_process_path():
    assert list(ordered_map(_square, range(50), 2, chunksize=3)) == [x * x for x in range(50)]
    assert list(ordered_map(_square, range(5), 1)) == [0, 1, 4, 9, 16]


def test_reads_only_a_bounded_window_ahead():
    pulled = []

    def items():
        for i in range(10_000):
            pulled.append(i)
            yield i

    it = ordered_map(_square, items(), 2, chunksize=4, ahead=2)
    assert next(it) == 0
    assert len(pulled) <= 2 * 2 * 4 + 4  # the submitted window (+ one chunk), not the whole input
    it.close()


def test_worker_error_is_raised_and_a_dead_worker_is_a_one_line_error():
    with pytest.raises(FSCSError, match="item 5 is bad"):
        list(ordered_map(_fail_at_5, range(20), 2, chunksize=2))
    with pytest.raises(FSCSError, match="a test worker process died .* fewer --workers"):
        list(ordered_map(_die_at_5, range(20), 2, chunksize=2, what="test worker"))

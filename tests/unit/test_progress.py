"""progress_bar: frequent refreshes on a terminal, one line per 30 s in a log file."""
from __future__ import annotations

import io
import sys

from fscs.progress import NON_TTY_INTERVAL_S, progress_bar


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_log_file_gets_sparse_updates(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    bar = progress_bar(total=1000, desc="t")
    for i in range(1000):
        bar.update(1)
        bar.set_postfix(loss=f"{i / 1000:.3f}")  # as the trainers do every step: no redraw of its own
    bar.close()
    assert bar.mininterval == NON_TTY_INTERVAL_S
    # start + close (+ at most one timed refresh): not one line per update
    assert sys.stderr.getvalue().count("\r") <= 3


def test_terminal_refreshes_often_and_explicit_interval_wins(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    for kwargs, want in (({}, 0.1), ({"mininterval": 5.0}, 5.0)):
        bar = progress_bar(total=1, **kwargs)
        bar.close()
        assert bar.mininterval == want

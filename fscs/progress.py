"""Progress bars that stay readable in log files: a SLURM or `tee`d log gets one line every 30 s, not ten a second."""
from __future__ import annotations

import functools
import sys
from typing import Any

NON_TTY_INTERVAL_S = 30.0
"""Seconds between bar updates when stderr is not a terminal (each update is a line in the log file)."""


@functools.lru_cache(maxsize=1)
def _bar_class() -> type:
    from tqdm import tqdm

    class Bar(tqdm):
        """tqdm whose set_postfix waits for the next timed refresh (tqdm's default redraws at once, which
        wrote a log line per training step)."""

        def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
            super().set_postfix(ordered_dict, refresh, **kwargs)

    return Bar


def progress_bar(**kwargs: Any) -> Any:
    """tqdm(**kwargs) writing to stderr, refreshed every 0.1 s on a terminal and every 30 s otherwise.

    kwargs go to tqdm unchanged (total, initial, desc, unit, disable, ...); an explicit mininterval wins.
    set_postfix does not force a redraw (pass refresh=True to force one).
    """
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else NON_TTY_INTERVAL_S)
    return _bar_class()(**kwargs)

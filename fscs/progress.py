"""Progress bars that stay readable in log files: a SLURM or `tee`d log gets one line every 30 s, not ten a second."""
from __future__ import annotations

import sys
from typing import Any

NON_TTY_INTERVAL_S = 30.0
"""Seconds between bar updates when stderr is not a terminal (each update is a line in the log file)."""


def progress_bar(**kwargs: Any) -> Any:
    """tqdm(**kwargs) writing to stderr, refreshed every 0.1 s on a terminal and every 30 s otherwise.

    kwargs go to tqdm unchanged (total, initial, desc, unit, disable, ...); an explicit mininterval wins.
    """
    from tqdm import tqdm

    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else NON_TTY_INTERVAL_S)
    return tqdm(**kwargs)

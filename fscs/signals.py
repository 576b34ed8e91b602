"""Checkpoint and stop requests from signals, acted on by every rank together at the next step boundary."""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SAVE_SIGNALS = ("SIGUSR1",)
"""Checkpoint at the next step boundary and keep training."""
STOP_SIGNALS = ("SIGTERM", "SIGUSR2", "SIGINT")
"""Checkpoint at the next step boundary and stop (SIGTERM: kill/requeue/torchrun; SIGUSR2: submitit's
preemption/timeout signal; SIGINT: Ctrl-C, where a second one stops at once without the checkpoint)."""


@dataclass(frozen=True)
class Decision:
    """What all ranks agreed on at a step boundary."""

    save: bool = False
    stop: bool = False
    signum: int = 0
    diverged: bool = False
    """Some rank's loss at this step was not finite: every rank stops without saving."""

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None


class CheckpointRequests:
    """Signal handlers that only set flags; `poll()` (a collective) makes them one decision for all ranks.

    Use as a context manager around the training loop: handlers are installed on entry (main thread only)
    and the previous ones restored on exit. DataLoader workers forked inside inherit the flag-only handlers,
    so a SIGTERM sent to the whole process group does not kill them mid-epoch.
    """

    def __init__(self, save: Sequence[str] = SAVE_SIGNALS, stop: Sequence[str] = STOP_SIGNALS) -> None:
        self.save_signals = [getattr(signal, s) for s in save if hasattr(signal, s)]
        self.stop_signals = [getattr(signal, s) for s in stop if hasattr(signal, s)]
        self._save = False
        self._stop = 0
        self._previous: dict[int, Any] = {}
        self._first_sigint = 0.0

    def __enter__(self) -> "CheckpointRequests":
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not in the main thread: checkpoint signals are not handled")
            return self
        for signum in [*self.save_signals, *self.stop_signals]:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._stop == signal.SIGINT:
                if now - self._first_sigint > 1.0:  # torchrun relays the terminal's SIGINT: that copy is no 2nd
                    raise KeyboardInterrupt  # a second Ctrl-C: stop now, the last published checkpoint stays
                return
            self._first_sigint = now
            logger.warning("Ctrl-C: checkpointing at the next step boundary, then stopping (Ctrl-C again to stop "
                           "at once, without that checkpoint)")
        if signum in self.stop_signals:
            self._stop = signum  # the last one decides: submitit's preemption sends SIGTERM, then SIGUSR2
        else:
            self._save = True

    def request_save(self) -> None:
        self._save = True

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        self._stop = int(signum)

    @property
    def pending(self) -> bool:
        return self._save or bool(self._stop)

    @property
    def stop_signum(self) -> int:
        """The stop signal this process received (0 = none), before any poll."""
        return self._stop

    def poll(self, device: torch.device | None = None, diverged: bool = False) -> Decision:
        """Collective (call on every rank at the same step): a request on any rank is a request on all, and so
        is `diverged` (this rank's loss is not finite), so that all ranks stop at the same step."""
        # consume the save request before the collective: a SIGUSR1 handled while this rank waits in the
        # all-reduce stays set for the next poll instead of being cleared unseen
        save, self._save = self._save, False
        flags = torch.tensor([int(save), int(self._stop), int(diverged)], dtype=torch.int64, device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        save, stop = int(flags[0]), int(flags[1])
        return Decision(save=bool(save or stop), stop=bool(stop), signum=stop, diverged=bool(flags[2]))


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave SIGTERM/SIGUSR1/SIGUSR2/SIGINT to the training process.

    torch's workers die on a SIGTERM that SLURM or torchrun sends to the whole process group, which would
    break the step before the trainer reaches its checkpoint; the workers still exit with their parent.
    """
    for name in (*SAVE_SIGNALS, *STOP_SIGNALS):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)

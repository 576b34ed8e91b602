"""Presence-balanced batches: a bounded reordering of the training episode stream.

Under image-level supervision the presence classifier's gradient at chance is dominated by the batch's
present/absent imbalance, sum(p - y), not by what tells present from absent
(`benchmarks/quality/plateau/README.md`). `balance_presence` reorders the episodes so that each run of
`batch` consecutive episodes (one loader batch of one worker) holds as many present as absent (episode,
class) pairs as the waiting episodes allow. It emits every episode it reads, in a window of at most
`window` waiting episodes, so the stream's episode distribution is unchanged; only which episodes share a
batch changes.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import torch


def _excess(episode: dict[str, torch.Tensor]) -> float:
    """Present minus absent ways of one episode, halved: presence [N] float {0,1} -> sum(presence) - N/2."""
    presence = episode["presence"]
    return float(presence.sum()) - presence.numel() / 2


def balance_presence(episodes: Iterable[dict[str, torch.Tensor]], batch: int, window: int | None = None
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """Episodes reordered so each consecutive group of `batch` nearly cancels its present/absent excess.

    Greedy: a slot takes the oldest waiting episode whose excess has the opposite sign of the group's running
    excess (the oldest of all when the group is balanced); with none waiting it reads on, up to `window`
    waiting episodes (default 2 * batch), then takes the oldest. Groups restart every `batch` episodes. For
    1-way episodes and enough of both kinds, groups alternate present and absent exactly. At the end of the
    input the waiting episodes are emitted oldest first.
    """
    if batch < 1:
        raise ValueError(f"balance_presence: batch={batch} must be >= 1")
    window = 2 * batch if window is None else window
    if window < 1:
        raise ValueError(f"balance_presence: window={window} must be >= 1")
    source = iter(episodes)
    waiting: deque[tuple[float, dict[str, torch.Tensor]]] = deque()
    running, slot = 0.0, 0

    def choice() -> int | None:
        """Index of the oldest waiting episode that suits the group's running excess, or None."""
        if running == 0:
            return 0 if waiting else None
        return next((i for i, (e, _) in enumerate(waiting) if e * running < 0), None)

    while True:
        pick = choice()
        while pick is None and len(waiting) < window:
            episode = next(source, None)
            if episode is None:
                break
            waiting.append((_excess(episode), episode))
            pick = choice()
        if pick is None:  # a full window or the end of the input: the oldest
            if not waiting:
                return
            pick = 0
        excess, episode = waiting[pick]
        del waiting[pick]
        yield episode
        running += excess
        slot += 1
        if slot == batch:
            running, slot = 0.0, 0

"""balance_presence: a bounded reordering into presence-balanced groups that loses and invents nothing."""
from __future__ import annotations

import random

import pytest
import torch

from fscs.data.balance import balance_presence


def _eps(presences: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    return [{"presence": torch.tensor(p, dtype=torch.float), "id": torch.tensor(i)} for i, p in enumerate(presences)]


def _ids(episodes) -> list[int]:
    return [int(e["id"]) for e in episodes]


def _excess(group) -> float:
    return sum(float(e["presence"].sum()) - e["presence"].numel() / 2 for e in group)


def test_one_way_groups_alternate_present_and_absent():
    presences = [[1]] * 6 + [[0]] * 6  # all present first: the worst order for a plain stream
    out = list(balance_presence(_eps(presences), batch=4, window=8))
    assert sorted(_ids(out)) == list(range(12))  # every episode, once
    assert [int(e["presence"][0]) for e in out[:8]] == [1, 0, 1, 0, 1, 0, 1, 0]
    assert all(_excess(out[i:i + 4]) == 0 for i in (0, 4))


def test_a_permutation_with_bounded_delay_and_balanced_groups_on_a_random_stream():
    rng = random.Random(0)
    presences = [[int(rng.random() < 0.55)] for _ in range(2000)]
    batch, window = 8, 16
    out = _ids(balance_presence(_eps(presences), batch=batch, window=window))
    assert sorted(out) == list(range(2000))
    # at most `window` wait, and each group starts with the oldest: nothing is held back for long
    position = {ep: i for i, ep in enumerate(out)}
    assert max(position[i] - i for i in range(2000)) <= window + batch
    episodes = _eps(presences)
    groups = [[episodes[i] for i in out[g:g + batch]] for g in range(0, 2000 - batch + 1, batch)]
    balanced = sum(_excess(g) == 0 for g in groups) / len(groups)
    plain = [[episodes[i] for i in range(g, g + batch)] for g in range(0, 2000 - batch + 1, batch)]
    assert balanced > 0.6 > 0.4 > sum(_excess(g) == 0 for g in plain) / len(plain)


def test_n_way_groups_cancel_their_excess_greedily():
    presences = [[1, 1]] * 4 + [[0, 0]] * 4 + [[1, 0]] * 4
    out = list(balance_presence(_eps(presences), batch=4, window=12))
    assert sorted(_ids(out)) == list(range(12))
    assert [_excess(out[i:i + 4]) for i in (0, 4, 8)] == [0, 0, 0]


def test_one_kind_only_passes_through_in_order_and_the_tail_is_flushed():
    assert _ids(balance_presence(_eps([[1]] * 5), batch=2, window=3)) == [0, 1, 2, 3, 4]
    assert _ids(balance_presence(_eps([[1], [1], [0]]), batch=4)) == [0, 2, 1]
    assert list(balance_presence([], batch=4)) == []


def test_reads_lazily():
    pulled = []

    def source():
        for i, e in enumerate(_eps([[i % 2] for i in range(10_000)])):
            pulled.append(i)
            yield e

    it = balance_presence(source(), batch=8)
    [next(it) for _ in range(4)]
    assert len(pulled) <= 4 + 16


@pytest.mark.parametrize("batch,window", [(0, None), (4, 0)])
def test_bad_sizes_are_refused(batch, window):
    with pytest.raises(ValueError, match="balance_presence"):
        list(balance_presence(_eps([[1]]), batch=batch, window=window))

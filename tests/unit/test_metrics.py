"""Hand-computed tests of FS-CS targets, decisions, ER / mIoU / FB-IoU, bootstrap and record merging."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from fscs.bench.metrics import (
    FSCSMetric, episodic_target, format_metrics, has_segmentation, predict_from_probs,
)
from fscs.errors import FSCSError

FOLD = [1, 2, 3, 4, 5]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


# 1-way episode, class 2: target square of 4 pixels, prediction 4 pixels, 3 of them correct.
TGT_A = _t([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
PRED_A = _t([[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])


def test_episodic_target_numpy_and_torch():
    mask = np.array([[0, 7, 7, 255], [3, 3, 5, 255], [0, 0, 0, 0], [7, 3, 5, 0]], dtype=np.uint8)
    want = _t([[0, 1, 1, 255], [2, 2, 0, 255], [0, 0, 0, 0], [1, 2, 0, 0]])
    for src in (mask, torch.from_numpy(mask)):
        out = episodic_target(src, [7, 3])
        assert out.dtype == torch.long
        assert torch.equal(out, want)
    compat = episodic_target(mask, np.array([7, 3]), ignore_boundary=False)
    want_compat = want.clone()
    want_compat[want_compat == 255] = 0
    assert torch.equal(compat, want_compat)
    with pytest.raises(FSCSError):
        episodic_target(mask, [7, 7])
    with pytest.raises(FSCSError):
        episodic_target(mask[None], [7])


def test_predict_from_probs():
    presence, pred = predict_from_probs(
        torch.tensor([0.6, 0.5]),
        torch.tensor([[[0.9, 0.4], [0.3, 0.5]], [[0.2, 0.45], [0.7, 0.1]]]),
    )
    assert presence.tolist() == [True, False]  # strictly greater than 0.5
    # pixel (0,1): max 0.45 < 0.5 -> background; (1,1): max 0.5 (way 1) is not < 0.5 -> way 1
    assert pred.tolist() == [[1, 0], [2, 1]]
    assert pred.dtype == torch.long
    with pytest.raises(FSCSError):
        predict_from_probs(torch.tensor([0.6]), torch.zeros(2, 3, 3))


def test_single_episode_miou_fbiou_er():
    m = FSCSMetric(FOLD)
    m.update(PRED_A, TGT_A, [2], [True], [True], episode_index=0)
    r = m.compute()
    # class 2: I = 3, U = 4 + 4 - 3 = 5 -> 60; four other classes 0 -> mIoU 12
    assert r["per_class_iou"][2] == pytest.approx(60.0)
    assert r["per_class_iou"][1] == 0.0
    assert r["miou"] == pytest.approx(12.0)
    assert r["classes_without_pixels"] == [c for c in FOLD if c != 2]  # their IoU 0 is a count, not a score
    # bg: I = 16 - 5 = 11, U = 16 - 3 = 13; fg: 3/5
    assert r["fbiou"] == pytest.approx((11 / 13 + 3 / 5) / 2 * 100)
    assert r["er"] == 100.0 and r["episodes"] == 1
    st = m.state_tensor()
    assert st.dtype == torch.long and st.shape == (2 * 5 + 6,)
    assert st.tolist()[:10] == [0, 3, 0, 0, 0, 0, 5, 0, 0, 0]
    assert st.tolist()[10:] == [11, 13, 3, 5, 1, 1]


def test_false_positive_in_absent_episode_grows_union():
    m = FSCSMetric(FOLD)
    m.update(PRED_A, TGT_A, [2], [True], [True], episode_index=0)
    empty = torch.zeros(4, 4, dtype=torch.long)
    fp = empty.clone()
    fp[0, 0] = fp[3, 3] = 1
    m.update(fp, empty, [2], [True], [False], episode_index=1)
    r = m.compute()
    assert r["per_class_iou"][2] == pytest.approx(3 / 7 * 100)  # I 3, U 5 + 2
    assert r["er"] == pytest.approx(50.0)
    # bg: I 11 + 14, U 13 + 16; fg: I 3, U 5 + 2
    assert r["fbiou"] == pytest.approx((25 / 29 + 3 / 7) / 2 * 100)


def test_ignore_255_excluded_and_reference_compat_mode():
    mask = np.array([[0, 255, 0, 0], [0, 2, 2, 255], [0, 2, 2, 0], [0, 0, 0, 0]], dtype=np.uint8)
    ours, ref = FSCSMetric(FOLD), FSCSMetric(FOLD)
    ours.update(PRED_A, episodic_target(mask, [2]), [2], [True], [True])
    ref.update(PRED_A, episodic_target(mask, [2], ignore_boundary=False), [2], [True], [True])
    a, b = ours.compute(), ref.compute()
    # excluded: 14 valid pixels; the FP at (1,3) is a 255 pixel -> I 3, U 4; bg I 10, U 11
    assert a["per_class_iou"][2] == pytest.approx(75.0)
    assert a["fbiou"] == pytest.approx((10 / 11 + 3 / 4) / 2 * 100)
    # reference mode: 255 -> background, the FP counts: I 3, U 5; bg I 11, U 13
    assert b["per_class_iou"][2] == pytest.approx(60.0)
    assert b["fbiou"] == pytest.approx((11 / 13 + 3 / 5) / 2 * 100)


def test_two_way_pooled_foreground_and_er():
    tgt = _t([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]])
    pred = _t([[1, 1, 0, 0], [2, 2, 0, 0], [0, 0, 2, 2], [0, 0, 0, 0]])
    m = FSCSMetric(FOLD)
    m.update(pred.numpy(), tgt.numpy(), np.array([3, 5]), np.array([True, False]), np.array([True, True]))
    r = m.compute()
    assert r["per_class_iou"][3] == pytest.approx(50.0)  # I 2, U 4
    assert r["per_class_iou"][5] == pytest.approx(100 / 3)  # I 2, U 6
    assert r["miou"] == pytest.approx((50 + 100 / 3) / 5)
    assert r["fbiou"] == pytest.approx((8 / 10 + 6 / 8) / 2 * 100)  # way confusion still pooled fg
    assert r["er"] == 0.0
    m.update(pred, tgt, [3, 5], [True, True], [True, True])
    m.update(pred, tgt, [5, 3], [False, True], [False, True])
    assert m.compute()["er"] == pytest.approx(200 / 3)


def test_bad_inputs_raise():
    m = FSCSMetric(FOLD)
    with pytest.raises(FSCSError):
        m.update(PRED_A, TGT_A, [9], [True], [True])  # class outside the fold
    with pytest.raises(FSCSError):
        m.update(PRED_A * 2, TGT_A, [2], [True], [True])  # label 2 in a 1-way episode
    with pytest.raises(FSCSError):
        m.update(PRED_A, TGT_A[:3], [2], [True], [True])
    with pytest.raises(FSCSError):
        m.update(PRED_A, TGT_A, [2], [True, False], [True])
    with pytest.raises(FSCSError):
        m.bootstrap_ci()  # no episodes
    with pytest.raises(FSCSError, match="no episodes recorded"):
        m.compute()  # not an ER of 0.0 over nothing
    with pytest.raises(FSCSError):
        FSCSMetric([1, 1])


def _random_metric(n_episodes: int, seed: int, way: int = 2, size: int = 8) -> FSCSMetric:
    """A metric filled with noisy predictions of random episodes (episode_index = i)."""
    rng = np.random.default_rng(seed)
    m = FSCSMetric(FOLD)
    for i in range(n_episodes):
        classes = rng.choice(FOLD, size=way, replace=False)
        tgt = rng.integers(0, way + 1, size=(size, size))
        tgt[rng.random((size, size)) < 0.1] = 255
        noise = rng.integers(0, way + 1, (size, size))
        pred = np.where(rng.random((size, size)) < 0.7, np.where(tgt == 255, 0, tgt), noise)
        true_p = rng.random(way) < 0.6
        pred_p = np.where(rng.random(way) < 0.8, true_p, ~true_p)
        m.update(pred, tgt, classes, pred_p, true_p, episode_index=i)
    return m


def test_bootstrap_contains_estimate_and_shrinks():
    small, big = _random_metric(30, seed=1), _random_metric(600, seed=1)
    ci_s, ci_b = small.bootstrap_ci(300, seed=0), big.bootstrap_ci(300, seed=0)
    for m, ci in ((small, ci_s), (big, ci_b)):
        point = m.compute()
        for key in ("er", "miou", "fbiou"):
            lo, hi = ci[key]
            assert lo <= point[key] <= hi, (key, lo, point[key], hi)
    for key in ("er", "miou", "fbiou"):
        assert ci_b[key][1] - ci_b[key][0] < 0.5 * (ci_s[key][1] - ci_s[key][0])
    assert small.bootstrap_ci(300, seed=0) == ci_s  # deterministic for a seed
    assert small.bootstrap_ci(300, seed=1) != ci_s


def test_bootstrap_matches_naive_resampling():
    m = _random_metric(25, seed=3)
    rec = m.episode_records()
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 25, size=(9, 25))
    naive = {"er": [], "miou": [], "fbiou": []}
    for row in idx:
        sub = rec[row].copy()
        sub[:, 0] = np.arange(25)  # resampled duplicates need distinct indices for from_records
        r = FSCSMetric.from_records(FOLD, sub).compute()
        for k in naive:
            naive[k].append(r[k])
    ci = m.bootstrap_ci(9, seed=7, alpha=0.2)
    for k, vals in naive.items():
        assert ci[k] == pytest.approx(list(np.percentile(vals, [10.0, 90.0])), abs=1e-9)


def test_bootstrap_ci_brackets_the_mean_for_5000_episodes():
    rng = np.random.default_rng(0)
    e, c = 5000, len(FOLD)
    rec = np.zeros((e, 6 + 2 * c), dtype=np.int64)
    rec[:, 0] = np.arange(e)
    rec[:, 1] = rng.integers(0, 2, e)
    rec[:, 2:6] = rng.integers(0, 100_000, (e, 4))
    rec[:, 6:] = rng.integers(0, 50_000, (e, 2 * c))
    m = FSCSMetric.from_records(FOLD, rec)
    ci = m.bootstrap_ci(1000, seed=0)
    assert ci["er"][0] < 100 * rec[:, 1].mean() < ci["er"][1]


def test_records_round_trip_and_rank_merge_bit_identical():
    whole = _random_metric(40, seed=5)
    rec = whole.episode_records()
    assert rec.dtype == np.int64 and rec.shape == (40, 6 + 2 * len(FOLD))
    assert len(whole.record_columns()) == rec.shape[1]
    # replay the same episodes on two "ranks" taking interleaved (disjoint) indices
    ranks = [FSCSMetric(FOLD), FSCSMetric(FOLD)]
    replay = _random_metric(40, seed=5)
    for row in replay.episode_records():
        ranks[int(row[0]) % 2]._records.append(row.copy())  # noqa: SLF001 - set up rank-local state
    for r in ranks:
        r._totals = r._record_to_totals(r.episode_records())  # noqa: SLF001
    gathered = np.concatenate([r.episode_records() for r in ranks])  # rank order, not episode order
    rebuilt = FSCSMetric.from_records(FOLD, gathered)
    assert np.array_equal(rebuilt.episode_records(), rec)
    assert rebuilt.compute() == whole.compute()
    assert rebuilt.bootstrap_ci(200, seed=4) == whole.bootstrap_ci(200, seed=4)
    assert FSCSMetric.from_records(FOLD, rec).compute() == whole.compute()
    # all-reduce of the state tensors
    summed = ranks[0].state_tensor() + ranks[1].state_tensor()
    assert torch.equal(summed, whole.state_tensor())
    ranks[0].merge_state_tensor(summed)
    assert ranks[0].compute() == whole.compute()
    with pytest.raises(FSCSError):
        ranks[0].bootstrap_ci(10)  # totals global, records local
    with pytest.raises(FSCSError):
        ranks[0].load_state_tensor(summed[:-1])
    merged = FSCSMetric(FOLD)
    merged.merge(ranks[1])
    merged.merge(FSCSMetric.from_records(FOLD, ranks[0].episode_records()))
    assert merged.compute() == whole.compute()
    with pytest.raises(FSCSError):
        FSCSMetric.from_records(FOLD, np.concatenate([rec, rec[:1]]))  # duplicate episode index


def test_split_halves_by_update_equal_whole():
    tgt = TGT_A
    halves = [FSCSMetric(FOLD), FSCSMetric(FOLD)]
    whole = FSCSMetric(FOLD)
    for i in range(6):
        cls = [FOLD[i % 5]]
        pred = PRED_A if i % 3 else torch.zeros_like(PRED_A)
        args = (pred, tgt, cls, [i % 2 == 0], [True])
        whole.update(*args, episode_index=i)
        halves[0 if i < 3 else 1].update(*args, episode_index=i)
    gathered = np.concatenate([halves[1].episode_records(), halves[0].episode_records()])
    rebuilt = FSCSMetric.from_records(FOLD, gathered)
    assert rebuilt.compute() == whole.compute()
    assert rebuilt.bootstrap_ci(100, seed=0) == whole.bootstrap_ci(100, seed=0)
    assert whole.compute()["er"] == pytest.approx(50.0)


# ------------------------------------------------------------------------------------------- no query mask
def test_fully_masked_results_are_pinned():
    """Values of the code before episodes without query masks existed: the masked path is bit-identical."""
    m = _random_metric(40, seed=5)
    assert m.compute() == {
        "er": 67.5, "miou": 67.19771591432016, "fbiou": 76.77677677677679,
        "per_class_iou": {1: 65.92356687898089, 2: 70.22900763358778, 3: 69.08665105386417,
                          4: 65.63307493540051, 5: 65.11627906976744}, "classes_without_pixels": [],
        "episodes": 40}
    assert m.bootstrap_ci(200, seed=4) == {"er": [54.93750000000001, 82.5],
                                           "miou": [64.85467910969078, 69.34386595313143],
                                           "fbiou": [75.50454366654905, 77.96130829142577]}
    assert m.segmentation_episodes() == 40


def test_episodes_without_query_mask_count_for_er_only():
    masked, mixed = FSCSMetric(FOLD), FSCSMetric(FOLD)
    for m in (masked, mixed):
        m.update(PRED_A, TGT_A, [2], [True], [True], episode_index=0)
    mixed.update(None, None, [3], [True], [False], episode_index=1)  # wrong presence, no mask
    mixed.update(PRED_A, None, [2, 4], [True, False], [True, False], episode_index=2)  # pred ignored
    r, ref = mixed.compute(), masked.compute()
    assert r["er"] == pytest.approx(200 / 3) and r["episodes"] == 3
    assert (r["miou"], r["fbiou"], r["per_class_iou"]) == (ref["miou"], ref["fbiou"], ref["per_class_iou"])
    rec = mixed.episode_records()
    assert rec[1:, 2:].sum() == 0 and rec[:, 1].tolist() == [1, 0, 1]
    assert has_segmentation(rec).tolist() == [True, False, False] and mixed.segmentation_episodes() == 1
    rebuilt = FSCSMetric.from_records(FOLD, rec[::-1])
    assert rebuilt.compute() == r and rebuilt.segmentation_episodes() == 1


def test_no_query_mask_at_all_gives_er_and_no_segmentation_metrics():
    m = FSCSMetric(FOLD)
    for i in range(20):
        m.update(None, None, [FOLD[i % 5]], [i % 4 != 0], [True], episode_index=i)
    r = m.compute()
    assert r == {"er": 75.0, "miou": None, "fbiou": None, "per_class_iou": None, "classes_without_pixels": [],
                 "episodes": 20}
    ci = m.bootstrap_ci(300, seed=0)
    assert ci["miou"] is None and ci["fbiou"] is None
    assert ci["er"][0] < 75.0 < ci["er"][1]
    assert m.segmentation_episodes() == 0
    assert format_metrics(r, 0) == "ER 75.0 mIoU n/a FB-IoU n/a (20 episodes, 0 with query masks)"


def test_bootstrap_resamples_masked_episodes_for_segmentation():
    """ER resamples every episode; mIoU only the masked ones (never a replicate without any: no fake 0)."""
    m = FSCSMetric(FOLD)
    m.update(PRED_A, TGT_A, [2], [True], [True], episode_index=0)
    for i in range(1, 60):
        m.update(None, None, [FOLD[i % 5]], [i % 2 == 0], [True], episode_index=i)
    point, ci = m.compute(), m.bootstrap_ci(500, seed=1)
    assert ci["miou"] == pytest.approx([point["miou"]] * 2)
    assert ci["fbiou"] == pytest.approx([point["fbiou"]] * 2)
    assert ci["er"][0] < point["er"] < ci["er"][1]
    masked = _random_metric(30, seed=2)
    part = FSCSMetric.from_records(FOLD, masked.episode_records())
    for i in range(30, 45):
        part.update(None, None, [1], [True], [True], episode_index=i)
    lo_hi = part.bootstrap_ci(300, seed=0)["miou"]
    assert lo_hi[0] < part.compute()["miou"] < lo_hi[1]
    line = format_metrics(part.compute(), part.segmentation_episodes())
    assert line.endswith("(45 episodes, 30 with query masks)")


def test_episode_with_a_mask_but_no_correct_pixel_is_still_scored():
    """An episode whose prediction misses every pixel (all intersections 0) still counts for segmentation:
    its unions enter mIoU / FB-IoU and the bootstrap resamples it."""
    m = FSCSMetric(FOLD)
    tgt = torch.ones(2, 2, dtype=torch.long)  # all class 2
    m.update(torch.zeros(2, 2, dtype=torch.long), tgt, [2], [True], [True], episode_index=0)
    m.update(None, None, [2], [True], [True], episode_index=1)  # no query mask: ER only
    rec = m.episode_records()
    assert has_segmentation(rec).tolist() == [True, False]
    assert m.segmentation_episodes() == 1
    r = m.compute()
    assert r["miou"] == 0.0 and r["fbiou"] == 0.0 and r["er"] == 100.0
    assert m.bootstrap_ci(50, seed=0) == {"er": [100.0, 100.0], "miou": [0.0, 0.0], "fbiou": [0.0, 0.0]}


def test_classes_without_pixels_are_those_with_zero_union_and_default_indices_count_from_zero():
    """A class that was only predicted (false positives, no truth) has a union and an IoU of 0 that is a
    score, not a missing class; episodes added without an index are numbered 0, 1, ... in update order."""
    m = FSCSMetric(FOLD)
    empty = torch.zeros(4, 4, dtype=torch.long)
    fp = empty.clone()
    fp[0, 0] = 1
    m.update(fp, empty, [4], [True], [False])  # class 4: I 0, U 1
    m.update(PRED_A, TGT_A, [2], [True], [True])
    r = m.compute()
    assert r["per_class_iou"][4] == 0.0
    assert r["classes_without_pixels"] == [1, 3, 5]
    assert m.episode_records()[:, 0].tolist() == [0, 1]

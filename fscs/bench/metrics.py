"""FS-CS metrics: episodic targets, inference decisions, ER / mIoU / FB-IoU with bootstrap CIs."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
# Leading columns of a per-episode record; then I of each fold class, then U of each fold class.
# An episode whose query has no mask is recorded with zeros in every I/U column: it counts for ER only
# (see has_segmentation).
RECORD_HEAD = ("episode_index", "er_correct", "bg_i", "bg_u", "fg_i", "fg_u")
_BOOT_CELLS = 4_000_000  # resample rows x episodes materialised at once in bootstrap_ci


def _as_long_tensor(x: Any, name: str) -> torch.Tensor:
    """Convert a numpy array / tensor / sequence to an int64 tensor (keeps a tensor's device)."""
    if isinstance(x, torch.Tensor):
        return x.long()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x).astype(np.int64, copy=False))
    try:
        return torch.as_tensor(np.asarray(x, dtype=np.int64))
    except (TypeError, ValueError) as exc:
        raise FSCSError(f"metrics: {name} must be an array of integers (got {type(x).__name__})") from exc


def has_segmentation(records: np.ndarray) -> np.ndarray:
    """bool [E]: which episodes of records [E, 6 + 2C] were scored for segmentation (bg_u + fg_u > 0).

    Every scored pixel lies in the background or the foreground union, so this is False exactly for
    episodes without a query mask (and for a query whose mask ignores every pixel).
    """
    rec = np.asarray(records)
    return (rec[:, 3] + rec[:, 5]) > 0


def _resampled_sums(values: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Column sums [num_samples, F] of `num_samples` bootstrap resamples (E rows with replacement) of
    values [E, F] (per-episode count vector x value matrix, chunked to bound memory)."""
    e = values.shape[0]
    chunk = max(1, _BOOT_CELLS // e)
    sums = []
    for start in range(0, num_samples, chunk):
        b = min(chunk, num_samples - start)
        idx = rng.integers(0, e, size=(b, e))
        counts = np.bincount((idx + np.arange(b)[:, None] * e).ravel(), minlength=b * e).reshape(b, e)
        sums.append(counts.astype(np.float64) @ values)
    return np.concatenate(sums, axis=0)


def _segmentation_from_sums(s: np.ndarray, c_num: int) -> dict[str, np.ndarray]:
    """mIoU and FB-IoU (x100) from summed record columns 1.. (er, bg_i, bg_u, fg_i, fg_u, I..., U...)."""
    bg = s[:, 1] / np.maximum(s[:, 2], 1.0)
    fg = s[:, 3] / np.maximum(s[:, 4], 1.0)
    fbiou = (bg + fg) / 2.0 * 100.0
    miou = (s[:, 5 : 5 + c_num] / np.maximum(s[:, 5 + c_num :], 1.0)).mean(axis=1) * 100.0
    return {"miou": miou, "fbiou": fbiou}


def bootstrap_replicates(records: np.ndarray, num_samples: int, rng: np.random.Generator
                         ) -> dict[str, np.ndarray | None]:
    """Bootstrap replicates [num_samples] of ER / mIoU / FB-IoU (x100) from records [E, 6 + 2C], E >= 1.

    ER resamples all E episodes. When every episode has a query mask, one resample serves all three metrics;
    otherwise mIoU and FB-IoU resample only the episodes scored for segmentation (a second draw from `rng`),
    and are None when there are none.
    """
    rec = np.asarray(records)
    e, c_num = rec.shape[0], (rec.shape[1] - 6) // 2
    values = rec[:, 1:].astype(np.float64)  # er, bg_i, bg_u, fg_i, fg_u, I..., U... (exact in float64)
    seg = has_segmentation(rec)
    if seg.all():
        s = _resampled_sums(values, num_samples, rng)
        return {"er": s[:, 0] / e * 100.0, **_segmentation_from_sums(s, c_num)}
    er = _resampled_sums(values[:, :1], num_samples, rng)[:, 0] / e * 100.0
    if not seg.any():
        return {"er": er, "miou": None, "fbiou": None}
    return {"er": er, **_segmentation_from_sums(_resampled_sums(values[seg], num_samples, rng), c_num)}


def format_metrics(metrics: dict[str, Any], segmentation_episodes: int | None = None) -> str:
    """One log line: 'ER 74.8 mIoU 42.9 FB-IoU 70.1 (1000 episodes)'; a missing metric prints as n/a, and
    the count of episodes with query masks is added when it differs from the episode count."""
    def num(key: str) -> str:
        v = metrics.get(key)
        return "n/a" if v is None else f"{v:.1f}"

    e = int(metrics.get("episodes", 0))
    masked = "" if segmentation_episodes in (None, e) else f", {segmentation_episodes} with query masks"
    return f"ER {num('er')} mIoU {num('miou')} FB-IoU {num('fbiou')} ({e} episodes{masked})"


def episodic_target(query_mask_abs: Any, classes: Any, ignore_boundary: bool = True) -> torch.Tensor:
    """Turn an absolute-id query mask [H, W] into the episode's label map [H, W] int64.

    0 = background (including classes outside the episode), k = 1..N where the pixel has
    ``classes[k-1]``, 255 = ignore (boundary). With ``ignore_boundary=False`` the 255 pixels become
    background, reproducing the reference (iFSL/CST) code's behaviour.
    """
    mask = _as_long_tensor(query_mask_abs, "query_mask_abs")
    cls = _as_long_tensor(classes, "classes").flatten().cpu()
    if mask.dim() != 2:
        raise FSCSError(f"metrics.episodic_target: query_mask_abs must be [H, W], got {tuple(mask.shape)}")
    ids = cls.tolist()
    if not ids or len(set(ids)) != len(ids) or any(c <= 0 or c >= IGNORE_INDEX for c in ids):
        raise FSCSError(f"metrics.episodic_target: classes must be distinct ids in 1..254, got {ids}")
    target = torch.zeros_like(mask)
    for k, c in enumerate(ids, start=1):
        target[mask == c] = k
    if ignore_boundary:
        target[mask == IGNORE_INDEX] = IGNORE_INDEX
    return target


def predict_from_probs(
    presence_prob: torch.Tensor, fg_prob: torch.Tensor, threshold: float = 0.5, seg_threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decisions of one episode (optionally with leading batch dims ``...``).

    presence_prob [..., N]: softmax probability of "present" per way -> presence [..., N] bool
    (p > threshold).
    fg_prob [..., N, H, W]: foreground probability per way -> pred [..., H, W] long: argmax way k (1..N),
    0 where the maximum foreground probability is < seg_threshold.
    """
    if fg_prob.dim() < 3 or presence_prob.shape[-1] != fg_prob.shape[-3]:
        raise FSCSError(
            f"metrics.predict_from_probs: need presence_prob [..., N] and fg_prob [..., N, H, W], "
            f"got {tuple(presence_prob.shape)} and {tuple(fg_prob.shape)}"
        )
    presence = presence_prob > threshold
    best, idx = fg_prob.max(dim=-3)
    pred = idx.long() + 1
    pred[best < seg_threshold] = 0
    return presence, pred


class FSCSMetric:
    """Accumulates FS-CS metrics over episodes, per absolute class id, with per-episode records.

    Totals (int64): I/U per fold class, background and pooled-foreground I/U, ER-correct count,
    episode count. Records: one int64 row per episode (see ``record_columns``) for bootstrap CIs
    and for exact multi-rank gathering (rows sorted by episode index).
    """

    def __init__(self, fold_classes: Sequence[int]) -> None:
        classes = [int(c) for c in fold_classes]
        if not classes or len(set(classes)) != len(classes):
            raise FSCSError(f"metrics.FSCSMetric: fold_classes must be non-empty and distinct, got {classes}")
        self.fold_classes: list[int] = classes
        self._col = {c: i for i, c in enumerate(classes)}
        self._records: list[np.ndarray] = []
        self._totals = np.zeros(2 * len(classes) + 6, dtype=np.int64)

    # ------------------------------------------------------------------ accumulation
    def record_columns(self) -> list[str]:
        """Names of the F = 6 + 2C columns of ``episode_records()``."""
        ids = self.fold_classes
        return list(RECORD_HEAD) + [f"i_{c}" for c in ids] + [f"u_{c}" for c in ids]

    def update(
        self,
        pred: Any,
        target: Any,
        classes: Any,
        pred_presence: Any,
        true_presence: Any,
        episode_index: int | None = None,
    ) -> None:
        """Add one episode.

        pred [H, W] int in 0..N; target [H, W] int in 0..N or 255 (from ``episodic_target``), or None when
        the query has no mask (the episode then counts for ER only; pred is not used and may be None);
        classes [N] absolute ids (all in fold_classes); pred_presence / true_presence [N] bool.
        episode_index: the episode's global index (defaults to the local episode count; pass it
        explicitly when ranks are merged with ``from_records``).
        """
        cls = _as_long_tensor(classes, "classes").flatten().cpu().tolist()
        n = len(cls)
        pp = _as_long_tensor(pred_presence, "pred_presence").flatten().cpu().numpy() != 0
        tp = _as_long_tensor(true_presence, "true_presence").flatten().cpu().numpy() != 0
        if pp.shape != (n,) or tp.shape != (n,):
            raise FSCSError(
                f"metrics.update: presence vectors must have N={n} entries, got {pp.shape}, {tp.shape}"
            )
        unknown = [c for c in cls if c not in self._col]
        if unknown or len(set(cls)) != n:
            raise FSCSError(
                f"metrics.update: classes {cls} must be distinct members of fold_classes {self.fold_classes}"
            )
        c_num = len(self.fold_classes)
        rec = np.zeros(6 + 2 * c_num, dtype=np.int64)
        rec[0] = len(self._records) if episode_index is None else int(episode_index)
        rec[1] = int(bool(np.all(pp == tp)))
        if target is not None:  # else no query mask: classification only, zero I/U
            self._score_pixels(rec, pred, target, cls)
        self._records.append(rec)
        self._totals += self._record_to_totals(rec[None, :])

    def _score_pixels(self, rec: np.ndarray, pred: Any, target: Any, cls: list[int]) -> None:
        """Fill the I/U columns of record `rec` from pred / target [H, W] of an episode with ways `cls`."""
        n, c_num = len(cls), len(self.fold_classes)
        p = _as_long_tensor(pred, "pred")
        t = _as_long_tensor(target, "target").to(p.device)
        if p.dim() != 2 or p.shape != t.shape:
            raise FSCSError(
                f"metrics.update: pred and target must both be [H, W], got {tuple(p.shape)}, {tuple(t.shape)}"
            )
        valid = t != IGNORE_INDEX
        pv, tv = p[valid], t[valid]
        if pv.numel() and (int(pv.min()) < 0 or int(pv.max()) > n or int(tv.min()) < 0 or int(tv.max()) > n):
            raise FSCSError(f"metrics.update: pred/target labels must be in 0..{n} (255 = ignore in target)")
        # confusion[pred label, target label] over valid pixels
        conf = torch.bincount(pv * (n + 1) + tv, minlength=(n + 1) ** 2).reshape(n + 1, n + 1).cpu().numpy()
        conf = conf.astype(np.int64)
        inter = np.diag(conf)
        union = conf.sum(axis=1) + conf.sum(axis=0) - inter
        rec[2], rec[3] = inter[0], union[0]
        rec[4] = conf[1:, 1:].sum()
        rec[5] = conf.sum() - conf[0, 0]
        for k, c in enumerate(cls, start=1):
            j = self._col[c]
            rec[6 + j] += inter[k]
            rec[6 + c_num + j] += union[k]

    def _record_to_totals(self, records: np.ndarray) -> np.ndarray:
        """Sum records [E, F] into the totals layout of ``state_tensor``."""
        c_num = len(self.fold_classes)
        s = records.sum(axis=0, dtype=np.int64)
        out = np.zeros(2 * c_num + 6, dtype=np.int64)
        out[: 2 * c_num] = s[6:]
        out[2 * c_num : 2 * c_num + 4] = s[2:6]
        out[2 * c_num + 4] = s[1]
        out[2 * c_num + 5] = records.shape[0]
        return out

    # ------------------------------------------------------------------ distributed support
    def state_tensor(self) -> torch.Tensor:
        """Flat LongTensor [2C + 6]: I per class, U per class, bg_i, bg_u, fg_i, fg_u, er_correct, episodes.

        Sum it over ranks (all-reduce) and pass the result to ``load_state_tensor``.
        """
        return torch.from_numpy(self._totals.copy())

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace the totals by ``state`` (e.g. after an all-reduce SUM of every rank's state_tensor)."""
        arr = state.detach().cpu().long().numpy().reshape(-1)
        if arr.shape != self._totals.shape:
            raise FSCSError(
                f"metrics.load_state_tensor: expected {self._totals.shape[0]} values, got {arr.shape[0]}"
            )
        self._totals = arr.astype(np.int64).copy()

    merge_state_tensor = load_state_tensor

    def merge(self, other: FSCSMetric) -> None:
        """Add another metric's totals and records (same fold classes)."""
        if other.fold_classes != self.fold_classes:
            raise FSCSError(
                f"metrics.merge: fold classes differ: {self.fold_classes} vs {other.fold_classes}"
            )
        self._records.extend(r.copy() for r in other._records)
        self._totals = self._totals + other._totals

    def episode_records(self) -> np.ndarray:
        """Per-episode records as int64 [E, 6 + 2C] (columns: ``record_columns()``)."""
        if not self._records:
            return np.zeros((0, 6 + 2 * len(self.fold_classes)), dtype=np.int64)
        return np.stack(self._records).astype(np.int64)

    @classmethod
    def from_records(cls, fold_classes: Sequence[int], records: np.ndarray) -> FSCSMetric:
        """Rebuild a metric from (concatenated) records; rows are sorted by episode index."""
        metric = cls(fold_classes)
        arr = np.asarray(records, dtype=np.int64)
        width = 6 + 2 * len(metric.fold_classes)
        if arr.ndim != 2 or arr.shape[1] != width:
            raise FSCSError(f"metrics.from_records: records must be [E, {width}], got {arr.shape}")
        arr = arr[np.argsort(arr[:, 0], kind="stable")]
        if arr.shape[0] > 1 and np.any(arr[1:, 0] == arr[:-1, 0]):
            raise FSCSError(
                "metrics.from_records: duplicate episode indices; ranks must take disjoint episodes"
            )
        metric._records = [row.copy() for row in arr]
        metric._totals = metric._record_to_totals(arr)
        return metric

    # ------------------------------------------------------------------ results
    @property
    def episodes(self) -> int:
        """Number of episodes in the totals."""
        return int(self._totals[-1])

    def segmentation_episodes(self) -> int:
        """Recorded episodes scored for segmentation, i.e. with a query mask (see has_segmentation)."""
        return int(has_segmentation(self.episode_records()).sum())

    def compute(self) -> dict[str, Any]:
        """{"er", "miou", "fbiou" (all x100), "per_class_iou" {class: iou x100}, "classes_without_pixels",
        "episodes"}.

        ER covers every episode; mIoU, FB-IoU and per-class IoU pool the episodes with a query mask only and
        are None when no episode has one (never a made-up 0); FSCSError when there is no episode at all.
        "classes_without_pixels" lists the fold classes whose summed union is 0 (never in a scored query's
        truth nor predicted: too few episodes); as the protocol's I / max(U, 1) says, each counts as IoU 0 in
        the mIoU, and callers must say so.
        """
        if self.episodes == 0:  # no ER of 0 % for a fold that was never evaluated
            raise FSCSError("metrics.compute: no episodes recorded; call update() or from_records() first")
        c_num = len(self.fold_classes)
        t = self._totals
        er = float(t[2 * c_num + 4] / self.episodes * 100.0)
        if t[2 * c_num + 1] + t[2 * c_num + 3] == 0:  # no scored pixel: no episode had a query mask
            return {"er": er, "miou": None, "fbiou": None, "per_class_iou": None, "classes_without_pixels": [],
                    "episodes": self.episodes}
        inter, union = t[:c_num].astype(np.float64), t[c_num : 2 * c_num].astype(np.float64)
        iou = inter / np.maximum(union, 1.0) * 100.0
        bg = t[2 * c_num] / max(int(t[2 * c_num + 1]), 1)
        fg = t[2 * c_num + 2] / max(int(t[2 * c_num + 3]), 1)
        return {
            "er": er,
            "miou": float(iou.mean()),
            "fbiou": float((bg + fg) / 2.0 * 100.0),
            "per_class_iou": {c: float(iou[j]) for j, c in enumerate(self.fold_classes)},
            "classes_without_pixels": [c for j, c in enumerate(self.fold_classes) if union[j] == 0],
            "episodes": self.episodes,
        }

    def bootstrap_ci(
        self, num_samples: int = 1000, seed: int = 0, alpha: float = 0.05
    ) -> dict[str, list[float] | None]:
        """Percentile bootstrap CI over episodes: {"er"|"miou"|"fbiou": [lo, hi] (x100) or None}.

        Each resample draws E episodes with replacement; metrics are recomputed from the resampled
        sums (per-episode count vector x record matrix), so it is vectorised over resamples. mIoU / FB-IoU
        resample the episodes with a query mask only (None when there are none; see bootstrap_replicates).
        """
        rec = self.episode_records()
        if rec.shape[0] == 0:
            raise FSCSError(
                "metrics.bootstrap_ci: no episodes recorded; call update() or from_records() first"
            )
        if not np.array_equal(self._record_to_totals(rec), self._totals):
            raise FSCSError(
                "metrics.bootstrap_ci: totals were replaced (load_state_tensor) but records are local; "
                "gather episode_records() from all ranks and use FSCSMetric.from_records"
            )
        if num_samples < 1 or not 0.0 < alpha < 1.0:
            raise FSCSError(
                f"metrics.bootstrap_ci: need num_samples >= 1 and 0 < alpha < 1, got {num_samples}, {alpha}"
            )
        reps = bootstrap_replicates(rec, num_samples, np.random.default_rng(seed))
        q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
        return {name: None if arr is None else [float(v) for v in np.percentile(arr, q)]
                for name, arr in ((k, reps[k]) for k in ("er", "miou", "fbiou"))}

"""Scoring of evaluation jobs, episode by episode: metric records, presence, prediction files and episode panels
(candidates on each rank, picked after the gather)."""
from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fscs.bench.metrics import FSCSMetric, episodic_target, predict_from_probs
from fscs.bench.plots import episode_panel, png_bytes, ways_to_labels
from fscs.bench.results_io import save_prediction
from fscs.data.episodes import EpisodeSpec
from fscs.data.types import Sample
from fscs.model.fscs_model import EpisodeFeatures, FSCSModel, upsample_logits

if TYPE_CHECKING:
    from fscs.bench.runner import EvalJob


@dataclass
class _Track:
    """Per-job accumulators on one rank: metric records, presence probabilities, panel candidates."""

    metric: FSCSMetric
    first: int
    worst: int
    prob: dict[int, np.ndarray] = field(default_factory=dict)
    true: dict[int, np.ndarray] = field(default_factory=dict)
    panels: dict[int, dict[str, Any]] = field(default_factory=dict)
    heap: list[tuple[float, int]] = field(default_factory=list)  # max-heap of the lowest (iou, index)

    def wants(self, index: int, iou: float | None) -> bool:
        """Whether episode `index` (foreground IoU `iou`; None = no query mask) is a panel candidate (a first
        one or a worst; an episode without a query mask can only be a first one)."""
        if index < self.first:
            return True
        if iou is None:
            return False
        keep = self.worst + self.first  # enough to still pick `worst` failures outside the first ones
        return self.worst > 0 and (len(self.heap) < keep or (-iou, -index) > self.heap[0])

    def add_panel(self, index: int, iou: float | None, panel: dict[str, Any]) -> None:
        self.panels[index] = panel
        if self.worst == 0 or iou is None:
            return
        heapq.heappush(self.heap, (-iou, -index))
        if len(self.heap) > self.worst + self.first:
            _, gone = heapq.heappop(self.heap)
            if -gone >= self.first:
                self.panels.pop(-gone, None)


def _episode_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Pooled foreground IoU (x100) of one episode, pred / target [H, W] (255 ignored) as FSCSMetric pools it;
    100 when prediction and truth are both empty."""
    valid = target != 255
    p, t = (pred != 0) & valid, (target != 0) & valid
    union = int((p | t).sum())
    return 100.0 * int((p & t).sum()) / union if union else 100.0


def _query_pseudo(model: FSCSModel, feats: EpisodeFeatures, regime: str, presence: torch.Tensor
                  ) -> torch.Tensor:
    """Query pseudo-masks [B, N, S, S] of a batch given its true presence (enhanced for the mixed regime)."""
    if regime == "mixed" and getattr(model, "enhancer", None) is not None:
        return model.enhanced_masks(feats, presence)[1]
    return model.pseudo_masks(feats, presence)[1]


def _score(job: EvalJob, track: _Track, feats: EpisodeFeatures, out: Any, specs: Sequence[EpisodeSpec],
           items: Sequence[dict[str, torch.Tensor]], samples: Mapping[str, Sample], ignore_boundary: bool
           ) -> None:
    """Metric update, presence probabilities and panel candidates of one decoded batch for one job."""
    presence_p = out.cls_logits.float().softmax(-1)[..., 1]
    pseudo: torch.Tensor | None = None
    for j, spec in enumerate(specs):
        it = items[j]
        gt = it.get("query_mask_abs")  # None: image-level labels only (presence from labels, ER only)
        size = tuple(samples[spec.query].image.shape[:2])  # the original query size (its mask's, if any)
        if out.shot_mask_logits is None:
            fg = upsample_logits(out.mask_logits[j], size).softmax(1)[:, 1]  # [N, H, W] at original size
        else:  # K shots: each shot's logits upsampled, then its probabilities averaged (the reference's order)
            fg = upsample_logits(out.shot_mask_logits[j], size).softmax(2)[:, :, 1].mean(1)
        pred_presence, pred = (x.cpu() for x in predict_from_probs(presence_p[j], fg))
        target = None if gt is None else episodic_target(gt, spec.classes, ignore_boundary=ignore_boundary)
        track.metric.update(pred, target, list(spec.classes), pred_presence, it["presence"].bool(),
                            episode_index=spec.index)
        track.prob[spec.index] = presence_p[j].cpu().numpy().astype(np.float32)
        track.true[spec.index] = it["presence"].numpy().astype(np.int8)
        if job.predictions_dir is not None:
            save_prediction(job.predictions_dir, spec, presence_p[j], pred_presence, pred)
        iou = None if target is None else _episode_iou(pred, target)
        if not track.wants(spec.index, iou):
            continue
        if pseudo is None:
            presence = torch.stack([x["presence"] for x in items]).to(feats.corr.device)
            pseudo = _query_pseudo(job.model, feats, job.regime, presence).cpu()
        image = episode_panel(samples[spec.query].image, None if target is None else target.numpy(),
                              ways_to_labels(pseudo[j]), pred.numpy())
        track.add_panel(spec.index, iou, {
            "index": spec.index, "iou": None if iou is None else round(iou, 2), "query": spec.query,
            "classes": list(spec.classes),
            "present": [int(x) for x in it["presence"].tolist()],
            "pred_present": [int(x) for x in pred_presence.tolist()], "png": png_bytes(image)})


def _payload(track: _Track) -> dict[str, Any]:
    """What one rank sends for one job: records, presence arrays, its panel candidates."""
    return {"records": track.metric.episode_records(), "prob": track.prob, "true": track.true,
            "panels": list(track.panels.values())}


def _pick_panels(parts: Sequence[dict[str, Any]], first: int, worst: int) -> list[dict[str, Any]]:
    """Panels of episodes 0..first-1 ("first") and the `worst` lowest-IoU other episodes ("worst")."""
    cands = {p["index"]: p for part in parts for p in part["panels"]}
    firsts = [dict(cands[i], kind="first") for i in sorted(cands) if i < first]
    rest = sorted((p for i, p in cands.items() if i >= first and p["iou"] is not None),
                  key=lambda p: (p["iou"], p["index"]))
    return firsts + [dict(p, kind="worst") for p in rest[:worst]]


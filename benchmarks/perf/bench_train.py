"""Benchmarks 1, 2 and 5: training step vs the frozen-backbone bound, distillation share, precisions, compile,
and the speed-up over an emulation of the authors' reference training step."""
from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch

import fscs.model.cst as cst
from fscs.bench.runner import evaluate
from fscs.data.episodes import EpisodeSampler, make_episode_tensors
from fscs.data.shards import load_samples, read_index
from fscs.model.attention import kept_columns

from reference_impl import reference_train_step
from setups import Setting, episode_images, fetch_batches, make_cfg, make_trainer, to_device
from timing import Clock, interleaved

logger = logging.getLogger(__name__)

BF16_TOLERANCE = 1.0
"""Largest accepted |bf16 - fp32| difference of ER, mIoU and FB-IoU, in points (percent), or one episode's
worth (100 / episodes) when that is larger: a barely trained head has presence probabilities near 0.5."""


def _timed_functions(trainer: Any, batch: dict[str, torch.Tensor], tag: str) -> dict[str, Any]:
    """step / backbone / encode / distill closures of one trainer on one batch (all in its precision)."""
    model, engine = trainer.model, trainer.engine
    dev_batch = to_device(batch, trainer.device)
    images = episode_images(dev_batch)
    with engine.autocast():
        feats = model.encode_episode(dev_batch["query_img"], dev_batch["support_img"])

    def backbone() -> None:
        with engine.autocast():
            model.backbone(images)

    def encode() -> None:
        with engine.autocast():
            model.encode_episode(dev_batch["query_img"], dev_batch["support_img"])

    def distill() -> None:
        with engine.autocast(), torch.no_grad():
            model.pseudo_masks(feats, dev_batch["presence"])

    return {f"step {tag}": lambda: trainer.train_step(batch), f"backbone {tag}": backbone,
            f"encode {tag}": encode, f"distill {tag}": distill}


def _without_column_skipping(step: Any) -> Any:
    """`step` with the head's masked-column skipping switched off (the batched masked attention throughout)."""
    def run() -> Any:
        saved, cst.COMPACT_MAX_SHARE = cst.COMPACT_MAX_SHARE, -1.0
        try:
            return step()
        finally:
            cst.COMPACT_MAX_SHARE = saved
    return run


def kept_column_share(trainer: Any, batch: dict[str, torch.Tensor]) -> float:
    """Share of the block-1 support columns (CLS included) that the batch's weak pseudo-masks keep."""
    model = trainer.model
    dev_batch = to_device(batch, trainer.device)
    with torch.no_grad():
        feats = model.encode_episode(dev_batch["query_img"], dev_batch["support_img"])
        support, _ = model.pseudo_masks(feats, dev_batch["presence"])
    masks = support.flatten(0, 2)
    return float(kept_columns(masks, model.head.support_grid, masks.shape[0]).float().mean())


def bench_step(setting: Setting, shards: str, clock: Clock, *, precisions: tuple[str, ...], rounds: int,
               warmup: int, reference: bool, compile_head: bool, skip_ab: bool = False) -> dict[str, Any]:
    """Interleaved medians of the step and its parts for each precision (+ reference, + compiled head,
    + with skip_ab the step without the head's masked-column skipping)."""
    device = clock.device.type
    trainers = {p: make_trainer(make_cfg(setting, shards, precision=p, device=device)) for p in precisions}
    batch = fetch_batches(trainers[precisions[0]].cfg, 1)[0]
    fns: dict[str, Any] = {}
    for p, tr in trainers.items():
        fns.update(_timed_functions(tr, batch, p))
        if skip_ab:
            fns[f"step {p} no-skip"] = _without_column_skipping(lambda tr=tr: tr.train_step(batch))
    compile_seconds = None
    if compile_head:
        tr = make_trainer(make_cfg(setting, shards, precision="fp32", device=device))
        if hasattr(tr.engine, "module"):
            tr.engine.module.compile()  # in place: the module stays an nn.Module (callers test `head or ...`)
            start = time.perf_counter()
            tr.train_step(batch)  # compiles forward and backward
            compile_seconds = time.perf_counter() - start
            fns["step fp32+compile"] = lambda: tr.train_step(batch)
    if reference:
        base = trainers["fp32"] if "fp32" in trainers else next(iter(trainers.values()))
        ref_head = copy.deepcopy(base.model.head)
        ref_opt = torch.optim.Adam(ref_head.parameters(), lr=base.cfg.train.lr)
        dev_batch = to_device(batch, base.device)
        fns["reference step fp32"] = lambda: reference_train_step(base.model.backbone, ref_head, ref_opt,
                                                                  dev_batch)
    samples = interleaved(clock, fns, rounds=rounds, warmup=warmup)
    med = {name: samples.median(name) for name in samples.runs}
    rows = []
    for p in precisions:
        step, bb = med[f"step {p}"], med[f"backbone {p}"]
        enc, dis = med[f"encode {p}"], med[f"distill {p}"]
        row = {"precision": p, "step_s": step, "backbone_s": bb, "ratio": step / bb,
               "correlation_s": enc - bb, "distill_s": dis, "distill_share": dis / step,
               "head_loss_opt_s": step - enc - dis, "spread": samples.spread(f"step {p}"),
               "samples_per_s": setting.batch / step}
        if reference:
            row["reference_s"] = med["reference step fp32"]
            row["speedup_vs_reference"] = med["reference step fp32"] / step
        rows.append(row)
    out: dict[str, Any] = {"setting": setting.label, "batch": setting.batch, "rounds": rounds,
                           "warmup": warmup, "rows": rows, "medians": med,
                           "images_per_step": setting.batch * (1 + setting.way * setting.shot)}
    if skip_ab:
        out["column_skip"] = {"kept_share": kept_column_share(trainers[precisions[0]], batch),
                              "rows": [{"precision": p, "step_s": med[f"step {p}"],
                                        "no_skip_step_s": med[f"step {p} no-skip"],
                                        "speedup": med[f"step {p} no-skip"] / med[f"step {p}"]}
                                       for p in precisions]}
    if compile_seconds is not None:
        out["compile"] = {"compile_s": compile_seconds, "step_s": med["step fp32+compile"],
                          "vs_eager_fp32": (med["step fp32+compile"] / med["step fp32"]
                                            if "step fp32" in med else None)}
    return out


@torch.no_grad()
def _agreement(model: Any, shards: str, fold: int, way: int, regime: str, episodes: int, device: torch.device
               ) -> dict[str, float]:
    """Per-pixel / per-class decision agreement of fp32 and bf16-autocast forwards on the same episodes."""
    index = read_index(shards)
    sampler = EpisodeSampler(index, "test", fold, way, 1, seed=0)
    specs = [sampler.episode(i) for i in range(episodes)]
    keys = {s.query for s in specs} | {k for s in specs for shots in s.support for k in shots}
    samples = load_samples(index, keys)
    flips = prob = pres_flips = pixels = classes = 0.0
    for start in range(0, episodes, 8):
        items = [make_episode_tensors(s, samples, model.image_size) for s in specs[start:start + 8]]
        q, sup, m = (torch.stack([it[k] for it in items]).to(device)
                     for k in ("query_img", "support_img", "support_mask"))
        outs = []
        for bf16 in (False, True):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                o = model.forward_episode(q, sup, m if regime == "full" else None, regime=regime)
            outs.append((o.mask_logits.float().softmax(2)[:, :, 1], o.cls_logits.float().softmax(-1)[..., 1]))
        (fg32, p32), (fg16, p16) = outs
        flips += float(((fg32 > 0.5) != (fg16 > 0.5)).sum())
        prob += float((fg32 - fg16).abs().sum())
        pixels += fg32.numel()
        pres_flips += float(((p32 > 0.5) != (p16 > 0.5)).sum())
        classes += p32.numel()
    return {"pixel_decisions_flipped": flips / pixels, "mean_abs_fg_prob_diff": prob / pixels,
            "presence_decisions_flipped": pres_flips / classes}


def bf16_metric_check(setting: Setting, shards: str, device: torch.device, *, train_steps: int,
                      episodes: int) -> dict[str, Any]:
    """Train a head briefly (fp32, full regime: pixel labels give it signal fastest), then evaluate it in fp32
    and under bf16 autocast on the same episodes: metrics and decision agreement."""
    cfg = make_cfg(setting, shards, precision="fp32", device=device.type, regime="full")
    trainer = make_trainer(cfg)
    for batch in fetch_batches(cfg, train_steps, seed=1):
        trainer.train_step(batch)
    model = trainer.model.eval()
    index = read_index(shards)
    tol = max(BF16_TOLERANCE, 100.0 / episodes)
    out: dict[str, Any] = {"train_steps": train_steps, "train_regime": "full", "episodes": episodes,
                           "tolerance_points": tol, "settings": []}
    for way, regime in ((1, "full"), (2, "full"), (1, "weak")):
        common = dict(fold=cfg.data.fold, way=way, shot=1, regime=regime, episodes=episodes, bootstrap=0)
        ref = evaluate(model, index, **common)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = evaluate(model, index, **common)
        diffs = {m: abs(low["metrics"][m] - ref["metrics"][m]) for m in ("er", "miou", "fbiou")}
        out["settings"].append({"setting": f"{way}w1s {regime}",
                                "fp32": {m: ref["metrics"][m] for m in diffs},
                                "bf16": {m: low["metrics"][m] for m in diffs}, "abs_diff": diffs,
                                **_agreement(model, shards, cfg.data.fold, way, regime, episodes, device),
                                "within_tolerance": all(v <= tol for v in diffs.values())})
    return out

"""Benchmark 3: evaluation feature reuse (encode once, decode per head) vs recomputing per shot/way/head."""
from __future__ import annotations

import logging
from typing import Any

import torch

from fscs.data.episodes import EpisodeSampler, make_episode_tensors
from fscs.data.shards import load_samples, read_index
from fscs.model.cst import CSTHead
from fscs.model.fscs_model import FSCSModel

from reference_impl import no_reuse_episode
from setups import Setting
from timing import Clock, interleaved

logger = logging.getLogger(__name__)


def _episodes(shards: str, setting: Setting, device: torch.device, count: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [B,3,S,S], support [B,N,K,3,S,S], support masks [B,N,K,S,S]: the first test episodes, fold 0."""
    index = read_index(shards)
    sampler = EpisodeSampler(index, "test", 0, setting.way, setting.shot, seed=0)
    specs = [sampler.episode(i) for i in range(count)]
    keys = {s.query for s in specs} | {k for s in specs for shots in s.support for k in shots}
    samples = load_samples(index, keys, decode_masks=True)
    items = [make_episode_tensors(s, samples, setting.image_size) for s in specs]
    return tuple(torch.stack([it[k] for it in items]).to(device)  # type: ignore[return-value]
                 for k in ("query_img", "support_img", "support_mask"))


def _heads(model: FSCSModel, device: torch.device) -> dict[str, tuple[str, Any]]:
    """{name: (regime, head)}: the model's head for weak, fresh heads for full and (when supported) mixed."""
    in_ch = model.head.in_channels
    torch.manual_seed(1)
    heads: dict[str, tuple[str, Any]] = {"weak": ("weak", model.head),
                                         "full": ("full", CSTHead(in_ch).to(device))}
    if hasattr(model, "attach_enhancer"):
        model.attach_enhancer()
        heads["mixed"] = ("mixed", CSTHead(in_ch).to(device))
    for _, head in heads.values():
        head.eval()
    return heads


@torch.no_grad()
def _reuse(model: FSCSModel, heads: dict[str, tuple[str, Any]], query: torch.Tensor, support: torch.Tensor,
           masks: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Encode once, decode with every head -> {name: (presence prob [B,N], foreground prob [B,N,S,S])}."""
    feats = model.encode_episode(query, support)
    out = {}
    for name, (regime, head) in heads.items():
        o = model.decode_episode(feats, masks if regime == "full" else None, regime, None, None, head=head)
        out[name] = (o.cls_logits.float().softmax(-1)[..., 1], o.mask_logits.float().softmax(2)[:, :, 1])
    return out


def bench_eval_reuse(setting: Setting, shards: str, clock: Clock, *, episodes: int, rounds: int, warmup: int,
                     precision: str = "fp32") -> dict[str, Any]:
    """Times per batch of `episodes` episodes: reuse with 1 head, reuse with every head, no reuse."""
    device = clock.device
    model = FSCSModel.build(backbone=setting.backbone, image_size=setting.image_size).to(device).eval()
    heads = _heads(model, device)
    first = {k: heads[k] for k in list(heads)[:1]}
    query, support, masks = _episodes(shards, setting, device, episodes)

    def ctx():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def run(fn, *args):
        with ctx():
            return fn(*args)

    reuse_all = run(_reuse, model, heads, query, support, masks)
    no_reuse = run(no_reuse_episode, model, heads, query, support, masks)
    max_diff = max(max((a - b).abs().max().item() for a, b in zip(reuse_all[n], no_reuse[n])) for n in heads)
    fns = {"reuse, 1 head": lambda: run(_reuse, model, first, query, support, masks),
           f"reuse, {len(heads)} heads": lambda: run(_reuse, model, heads, query, support, masks),
           f"no reuse, {len(heads)} heads": lambda: run(no_reuse_episode, model, heads, query, support,
                                                        masks)}
    samples = interleaved(clock, fns, rounds=rounds, warmup=warmup)
    med = {k: samples.median(k) for k in fns}
    one, allh, none = (med[k] for k in fns)
    label = f"{setting.label}, {setting.way}-way {setting.shot}-shot, {episodes} episode(s) per batch"
    return {"setting": label,
            "heads": list(heads), "precision": precision, "medians": med,
            "all_heads_vs_one": allh / one, "speedup_vs_no_reuse": none / allh,
            "images_encoded_reuse": episodes * (1 + setting.way * setting.shot),
            "images_encoded_no_reuse": episodes * 2 * setting.way * setting.shot * len(heads),
            "max_prob_diff_reuse_vs_no_reuse": max_diff}

"""Benchmark 4: data headroom = samples/s one loader worker delivers / samples/s the training step uses."""
from __future__ import annotations

import logging
import time
from typing import Any

from fscs.data.stream import TrainEpisodeStream, make_train_loader

from setups import Setting

logger = logging.getLogger(__name__)


def _stream(setting: Setting, shards: str, use_masks: bool) -> TrainEpisodeStream:
    return TrainEpisodeStream(shards, fold=0, way=setting.way, shot=setting.shot,
                              image_size=setting.image_size, seed=0, use_masks=use_masks)


def worker_samples_per_s(setting: Setting, shards: str, *, samples: int, use_masks: bool) -> dict[str, Any]:
    """Episodes/s of one loader worker.

    cpu: the stream run in this (single-threaded) process, per CPU second -- the work one worker process
    does per sample (read, decode, episode assembly), independent of other load on the machine.
    wall: a real WebLoader with 1 worker process, batches of setting.batch, after its first batch.
    """
    it = iter(_stream(setting, shards, use_masks))
    for _ in range(2 * setting.batch):  # fill the per-class buffers first
        next(it)
    start = time.process_time()
    for _ in range(samples):
        next(it)
    cpu = samples / (time.process_time() - start)
    steps = max(2, samples // setting.batch)
    loader = make_train_loader(_stream(setting, shards, use_masks), setting.batch, 1, steps + 1)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    got = sum(b["query_img"].shape[0] for b in batches)
    wall = got / (time.perf_counter() - start)
    return {"cpu_samples_per_s": cpu, "wall_samples_per_s_1_worker": wall, "samples": samples,
            "masks_decoded": use_masks}


def bench_loader(setting: Setting, shards: str, consumption: dict[str, float], *, samples: int
                 ) -> dict[str, Any]:
    """Headroom of the weak (no masks) and full (masks decoded) streams against each measured step rate."""
    rows = []
    for use_masks in (False, True):
        w = worker_samples_per_s(setting, shards, samples=samples, use_masks=use_masks)
        for precision, rate in consumption.items():
            rows.append({**w, "regime": "full" if use_masks else "weak", "step_precision": precision,
                         "step_samples_per_s": rate, "headroom": w["cpu_samples_per_s"] / rate})
    return {"setting": setting.label, "rows": rows}

"""Memory and time of one evaluation process on COCO-like shards (not part of run.py).

    python benchmarks/perf/stream_memory.py build --out /tmp/cocolike-test --images 1600 --test-every 1
    python benchmarks/perf/eval_memory.py --shards /tmp/cocolike-test --setting 2w5s --episodes 300

Runs `evaluate_jobs` (what `fscs bench` and `fscs suite` run) for one setting of fold 0 with a tiny randomly
initialised head (`fscs_vit_tiny_patch8`, seeded; `--image-size` 64 by default, so the model costs little and
what is measured is the data path) and prints one JSON line: the RSS before the evaluation, the peak RSS
(VmHWM), what the shared sample cache holds at the end (images, bytes), wall and CPU seconds, and a sha256
over the results (metrics, presence, records, panels, data_sha256, manifest; not the timings) to compare
two versions of the code.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time

import numpy as np
import torch

from stream_memory import held_bytes, status_kb


def _held(cache: dict) -> tuple[int, int]:
    """(images, bytes) the shared cache holds: decoded arrays or encoded tar members."""
    return len(cache), held_bytes(cache.values())


def results_sha256(results: list[dict]) -> str:
    """sha256 of everything a result holds but its timings (panel PNGs and record arrays included)."""
    h = hashlib.sha256()
    for res in results:
        body = {k: v for k, v in res.items() if k not in ("seconds", "artifacts")}
        h.update(json.dumps(body, sort_keys=True).encode())
        art = res.get("artifacts") or {}
        if "records" in art:
            h.update(np.ascontiguousarray(art["records"]).tobytes())
        for p in art.get("panels", []):
            h.update(json.dumps({k: v for k, v in p.items() if k != "png"}, sort_keys=True).encode())
            h.update(p["png"])
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--setting", default="2w5s")
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--regimes", default="weak", help="comma-separated jobs sharing one backbone pass")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args()

    from fscs import FSCSModel
    from fscs.bench.runner import EvalJob, evaluate_jobs
    from fscs.config import parse_setting
    from fscs.data.shards import read_index

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = FSCSModel.build(backbone="fscs_vit_tiny_patch8", image_size=a.image_size).eval()
    index = read_index(a.shards)
    way, shot = parse_setting(a.setting)
    cache: dict = {}
    rss0 = status_kb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    results = evaluate_jobs([EvalJob(model, r, r) for r in a.regimes.split(",")], index, fold=0, way=way,
                            shot=shot, episodes=a.episodes, seed=0, batch_size=a.batch_size, samples=cache)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images, nbytes = _held(cache)
    print(json.dumps({"setting": a.setting, "episodes": a.episodes, "regimes": a.regimes,
                      "image_size": a.image_size, "rss_start_mb": round(rss0 / 1024),
                      "peak_rss_mb": round(status_kb("VmHWM") / 1024),
                      "peak_minus_start_mb": round((status_kb("VmHWM") - rss0) / 1024),
                      "cached_images": images, "cached_mb": round(nbytes / 2**20, 1),
                      "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                      "results_sha256": results_sha256(results)}))


if __name__ == "__main__":
    main()

"""Memory and CPU cost of one training-stream worker on COCO-like shards (not part of run.py).

    python benchmarks/perf/stream_memory.py build --out /tmp/cocolike      # 2,000 640x480 JPEGs, 80 classes
    python benchmarks/perf/stream_memory.py measure --shards /tmp/cocolike --regime weak --episodes 2500

`build` writes a shard set laid out like COCO-20i (80 classes, folds {4k + f + 1}, query_mode "class"):
textured 640 x 480 JPEGs of about COCO's compressed size (~137 KB a sample with its mask) with 1-4 labels
each and index masks. `measure` runs the stream of fold 0 in this process (as one loader worker does) and
prints one JSON line: the RSS before the first episode, the peak RSS (VmHWM), what the per-class buffers
hold at the end (distinct images, bytes), and episodes per CPU second after the first 200 episodes.
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def status_kb(field: str) -> int:
    """A /proc/self/status field in kB (VmRSS, VmHWM); ru_maxrss where there is no /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def build(out: str, images: int, width: int, height: int, seed: int, test_every: int = 10) -> None:
    """COCO-like shards; every `test_every`-th image is a test image (1: all of them), the others trn."""
    from fscs.data.shard_write import write_shards
    from fscs.data.types import Sample

    rng = np.random.default_rng(seed)
    folds = {f: [4 * k + f + 1 for k in range(20)] for f in range(4)}

    def samples():
        for n in range(images):
            low = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.int16)
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            picked = rng.choice(80, size=int(rng.integers(1, 5)), replace=False) + 1
            labels = tuple(sorted(int(c) for c in picked))
            mask = np.zeros((height, width), np.uint8)
            for c in labels:
                y, x = int(rng.integers(0, height - 60)), int(rng.integers(0, width - 60))
                mask[y:y + int(rng.integers(40, height - y)), x:x + int(rng.integers(40, width - x))] = c
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            with Image.open(io.BytesIO(buf.getvalue())) as im:
                decoded = np.array(im.convert("RGB"))
            split = "test" if n % test_every == 0 else "trn"
            yield Sample(f"img{n:06d}", decoded, mask, labels, encoded=("jpg", buf.getvalue())), split

    write_shards(samples(), out, dataset="coco-like", class_names=[f"c{c}" for c in range(1, 81)],
                 folds=folds, samples_per_shard=250,
                 params={"query_mode": "class", "images": images, "seed": seed, "size": [width, height],
                         **({} if test_every == 10 else {"test_every": test_every})})


def held_bytes(samples) -> int:
    """Bytes the given samples hold: their decoded arrays (image, mask) or encoded tar members (files)."""
    total = 0
    for s in samples:
        for name in ("image", "mask", "files"):
            v = getattr(s, name, None)
            if isinstance(v, np.ndarray):
                total += v.nbytes
            elif isinstance(v, dict):
                total += sum(len(b) for b in v.values())
    return total


def _buffer_bytes(buffers) -> tuple[int, int]:
    """(distinct images, bytes) held by the stream's per-class buffers (decoded arrays or encoded bytes)."""
    held = {id(s): s for b in buffers.values() for s in b.values()}
    return len(held), held_bytes(held.values())


def measure(shards: str, regime: str, episodes: int, way: int, shot: int, image_size: int, buffer: int
            ) -> None:
    from fscs.data.stream import TrainEpisodeStream

    torch.set_num_threads(1)
    stream = TrainEpisodeStream(shards, fold=0, way=way, shot=shot, image_size=image_size, seed=0,
                                use_masks=regime == "full", buffer_per_class=buffer,
                                gt_fraction=0.2 if regime == "mixed" else 0.0)
    it = iter(stream)
    rss0 = status_kb("VmRSS")
    for _ in islice(it, 200):
        pass
    start = time.process_time()
    for _ in islice(it, episodes - 200):
        pass
    cpu = time.process_time() - start
    held, nbytes = _buffer_bytes(it.gi_frame.f_locals["buffers"])
    print(json.dumps({"regime": regime, "episodes": episodes, "way": way, "shot": shot,
                      "image_size": image_size, "buffer_per_class": buffer, "rss_start_mb": rss0 / 1024,
                      "peak_rss_mb": status_kb("VmHWM") / 1024,
                      "peak_minus_start_mb": (status_kb("VmHWM") - rss0) / 1024,
                      "buffered_images": held, "buffered_mb": nbytes / 2**20,
                      "episodes_per_cpu_s": (episodes - 200) / cpu}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--images", type=int, default=2000)
    b.add_argument("--width", type=int, default=640)
    b.add_argument("--height", type=int, default=480)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--test-every", type=int, default=10, help="every n-th image is a test image (1: all)")
    m = sub.add_parser("measure")
    m.add_argument("--shards", required=True)
    m.add_argument("--regime", choices=("weak", "full", "mixed"), default="weak")
    m.add_argument("--episodes", type=int, default=3000)
    m.add_argument("--way", type=int, default=1)
    m.add_argument("--shot", type=int, default=1)
    m.add_argument("--image-size", type=int, default=400)
    m.add_argument("--buffer", type=int, default=64)
    a = p.parse_args()
    if a.cmd == "build":
        build(a.out, a.images, a.width, a.height, a.seed, a.test_every)
    else:
        measure(a.shards, a.regime, a.episodes, a.way, a.shot, a.image_size, a.buffer)


if __name__ == "__main__":
    main()

"""Query-class distribution of the PASCAL-5i training stream against the reference's entry weighting.

    python benchmarks/quality/train_query_classes.py --out /tmp/pascal-standin --fold 0 --passes 10

Builds (once) stand-in shards from the shipped PASCAL-5i lists alone: one 4 px PNG per training image, labels
= the classes of its list entries, query_mode "entry". Then runs the training stream of `--fold` (1-way
1-shot, weak, this process) for `passes` x (number of training entries) queries, records the query class of
each, and prints the total-variation distances of that distribution to (a) the fold's training entries, (b)
the entries of the shard reads the stream made (webdataset resamples shards with replacement, so (a) also
holds the luck of the draw), and of the one-query-per-image rule the stream used before to (a), exactly.
"""
from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

import fscs.data.stream as stream_mod
from fscs.data.shards import read_index, write_shards
from fscs.data.sources.pascal import index_from_lists
from fscs.data.stream import TrainEpisodeStream
from fscs.data.types import Sample


def build(out: Path) -> None:
    """Stand-in shards of the shipped lists' trn images (the lists restricted to them)."""
    idx = index_from_lists()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    keys = {k for k, m in idx.samples.items() if m["split"] == "trn"}
    samples = ((Sample(k, np.zeros((4, 4, 3), np.uint8), None, tuple(idx.samples[k]["labels"]),
                       encoded=("png", buf.getvalue())), "trn") for k in sorted(keys))
    lists = {r: {f: [e for e in es if e[0] in keys] for f, es in fl.items()} for r, fl in idx.lists.items()}
    write_shards(samples, out, dataset="pascal-standin", class_names=idx.class_names, folds=idx.folds,
                 lists_fn=lambda _records, _folds: lists, samples_per_shard=1000,
                 params={"query_mode": "entry"})


def tv(a: Counter, b: Counter, classes: list[int]) -> float:
    p = np.array([a[c] for c in classes], float)
    q = np.array([b[c] for c in classes], float)
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--passes", type=float, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.out.exists():
        build(args.out)
    index = read_index(args.out)
    entries = sorted(set(index.fold_entries("train", args.fold)))
    want = Counter(c for _, c in entries)
    classes = sorted(want)
    per_image: dict[str, list[int]] = {}
    for k, c in entries:
        per_image.setdefault(k, []).append(c)
    old_rule = Counter()
    for cs in per_image.values():
        for c in cs:
            old_rule[c] += 1 / len(cs)

    count = int(args.passes * len(entries))
    queries: list[int] = []
    shards: list[str] = []
    episode, split = TrainEpisodeStream._episode, stream_mod._split_by_rank

    def spy_episode(self, query, query_class, buffers, rng):
        queries.append(query_class)
        return episode(self, query, query_class, buffers, rng)

    def spy_split(src, rank, world_size):
        for item in split(src, rank, world_size):
            shards.append(Path(item["url"]).name)
            yield item

    TrainEpisodeStream._episode, stream_mod._split_by_rank = spy_episode, spy_split
    stream = TrainEpisodeStream(args.out, fold=args.fold, way=1, shot=1, image_size=4, seed=args.seed,
                                use_masks=False)
    for _ in stream:
        if len(queries) >= count:
            break
    got = Counter(queries[:count])
    per_shard: dict[str, Counter] = {}
    for k, c in entries:
        per_shard.setdefault(index.samples[k]["shard"], Counter())[c] += 1
    read = Counter()
    for name in shards[:-1]:  # the last shard is read in part
        read.update(per_shard.get(name, Counter()))
    names = index.class_names
    print(json.dumps({
        "fold": args.fold, "entries": len(entries), "images": len(per_image), "queries": count,
        "shard_reads": len(shards) - 1,
        "tv_stream_vs_entries": round(tv(got, want, classes), 4),
        "tv_stream_vs_entries_of_shards_read": round(tv(got, read, classes), 4),
        "tv_shards_read_vs_entries": round(tv(read, want, classes), 4),
        "tv_one_query_per_image_vs_entries": round(tv(old_rule, want, classes), 4),
        "share_percent": {names[c]: {"stream": round(100 * got[c] / count, 1),
                                     "entries": round(100 * want[c] / len(entries), 1),
                                     "one_per_image": round(100 * old_rule[c] / len(per_image), 1)}
                          for c in classes}}))


if __name__ == "__main__":
    main()

"""The shipped standard split lists are intact (byte-identical to the published ones)."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

SPLITS = Path(__file__).resolve().parents[2] / "shards" / "splits"


def test_checksums_match():
    for line in (SPLITS / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((SPLITS / name).read_bytes()).hexdigest() == digest, name


def test_list_lengths():
    pascal_val = [len((SPLITS / f"pascal/val_fold{i}.txt").read_text().split()) for i in range(4)]
    assert pascal_val == [346, 451, 725, 346]
    first = gzip.open(SPLITS / "coco/trn_fold0.tsv.gz", "rt").readline().rstrip("\n").split("\t")
    assert first[0].isdigit() and first[1].startswith(("train2014/", "val2014/"))

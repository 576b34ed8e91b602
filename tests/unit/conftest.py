"""Fixtures shared by the data-side unit tests."""
from __future__ import annotations

import pytest

from fscs.data.shard_write import write_shards
from fscs.data.shards import read_index
from fscs.data.synthetic import DATASET_NAME, SYNTH_CLASS_NAMES, SYNTH_FOLDS, generate_synthetic


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
    """300 synthetic 96 px images in shards of 40 (read-only: tests that damage shards copy them first)."""
    out = tmp_path_factory.mktemp("ep") / "synth"
    return write_shards(generate_synthetic(seed=0, num_images=300, size=96, workers=1), out,
                        dataset=DATASET_NAME, class_names=SYNTH_CLASS_NAMES,
                        folds=dict(enumerate(SYNTH_FOLDS)),
                        samples_per_shard=40, params={"seed": 0, "n": 300})


@pytest.fixture(scope="session")
def index(shard_dir):
    return read_index(shard_dir)

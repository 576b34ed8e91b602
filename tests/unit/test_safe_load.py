"""Untrusted checkpoints load without running code from the file."""
from __future__ import annotations

import argparse
import os

import pytest
import torch

from fscs.errors import FSCSError
from fscs.safe_load import load_untrusted


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_plain_state_dict(tmp_path):
    p = tmp_path / "a.pth"
    torch.save({"w": torch.arange(3)}, p)
    assert torch.equal(load_untrusted(p)["w"], torch.arange(3))


def test_lightning_like_checkpoint_with_objects_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "ref.ckpt"
    torch.save({"state_dict": {"learner.x": torch.ones(2)}, "hyper_parameters": argparse.Namespace(lr=1e-3),
                "evil": _Evil(marker)}, p)
    out = load_untrusted(p)
    assert torch.equal(out["state_dict"]["learner.x"], torch.ones(2))
    assert not marker.exists()


def test_missing_and_garbage(tmp_path):
    with pytest.raises(FSCSError, match="not found"):
        load_untrusted(tmp_path / "nope.pth")
    g = tmp_path / "g.pth"
    g.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FSCSError, match="g.pth"):
        load_untrusted(g)

"""benchmarks/quality/cls_plateau.py: its pseudo/pseudo and GT/GT variants are the weak and full training steps."""
from __future__ import annotations

import itertools

import pytest
import torch

from fscs.config import load_config
from fscs.data.synthetic import build_synthetic_shards
from fscs.distributed import DistEnv
from fscs.losses import fscs_loss
from fscs.train import Trainer


@pytest.fixture(scope="module")
def trainer_and_batch(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("plateau")
    shards = build_synthetic_shards(root / "synth", num_images=200, size=96, workers=1)
    cfg = load_config(None, [f"data.shards={shards}", f"out_dir={root / 'runs'}", "name=t", "train.regime=full",
                             "data.batch_size=3", "data.num_workers=0", "model.image_size=32",
                             "train.steps_per_epoch=1", "train.epochs=1", "train.cls_weight=0.3"])
    trainer = Trainer(cfg, DistEnv())
    loader = trainer._loader()
    loader.set_epoch(0)
    return trainer, next(iter(loader))


def test_variants_are_the_training_steps(cls_plateau, trainer_and_batch):
    trainer, batch = trainer_and_batch
    model, pres = trainer.model, batch["presence"]
    with torch.no_grad():
        weak = model.forward_episode(batch["query_img"], batch["support_img"], regime="weak", query_presence=pres)
        want_weak = fscs_loss(weak.cls_logits, weak.mask_logits, pres, weak.pseudo_query.long(), cls_weight=0.3)[0]
        full = model.forward_episode(batch["query_img"], batch["support_img"], batch["support_mask"], regime="full")
        target = torch.where(batch["query_target"] == 255, 0, batch["query_target"])
        want_full = fscs_loss(full.cls_logits, full.mask_logits, pres, target, cls_weight=0.3)[0]
        got = {(s, t): cls_plateau.variant_loss(model, model.head, batch, s, t, 0.3, 1.0)[0]
               for s, t in itertools.product(("pseudo", "gt"), repeat=2)}
    torch.testing.assert_close(got["pseudo", "pseudo"], want_weak)
    torch.testing.assert_close(got["gt", "gt"], want_full)
    # the hybrids really swap one ingredient (the synthetic pseudo-masks are not the GT masks)
    assert not torch.equal(got["gt", "pseudo"], got["pseudo", "pseudo"])
    assert not torch.equal(got["pseudo", "gt"], got["pseudo", "pseudo"])


def test_variant_table_names_real_configs(cls_plateau):
    for support, target, overrides in cls_plateau.VARIANTS.values():
        assert support in ("pseudo", "gt") and target in ("pseudo", "gt")
        load_config(None, ["train.regime=full", *overrides])  # every override is a valid config key

"""DeepSpeed with 2 gloo processes on CPU: same loss curve as DDP, ZeRO-2 + accumulation, bf16, safe loads.

Stated tolerance (fp32, train.grad_accum=2, same seed, 6 steps): DDP and DeepSpeed ZeRO-2 per-step losses
agree within 1e-4 relative (observed ~1e-6) and the final head weights within 1e-3 relative L2 (observed
~1e-4). Only
the order of the gradient reductions differs; Adam divides by sqrt(v), which magnifies that rounding noise on
weights whose gradients are ~0 (single elements can move by up to lr per step), hence an L2 criterion.
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest

from test_resume import COMMON, head, launch_jobs, losses

pytestmark = pytest.mark.slow

RTOL_LOSS = 1e-4
RTOL_WEIGHTS_L2 = 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from fscs.data.synthetic import build_synthetic_shards

    shards = build_synthetic_shards(tmp_path_factory.mktemp("data") / "synth", num_images=400, size=96,
                                    workers=1)
    out = tmp_path_factory.mktemp("runs")

    def cfg(name: str, *extra: str) -> list[str]:
        return [f"data.shards={shards}", f"out_dir={out}", f"name={name}", *COMMON, "train.grad_accum=2",
                *extra]

    launch_jobs([cfg("ddp"), cfg("ds_zero2", "train.engine=deepspeed", "train.zero_stage=2"),
                 cfg("ds_bf16", "train.engine=deepspeed", "train.precision=bf16", "train.epochs=1",
                     "train.steps_per_epoch=2", "train.grad_accum=1",
                     "train.image_every=1")])  # TensorBoard panels: a forward of the bf16 head outside step()
    return out


def test_same_loss_curve_as_ddp(runs):
    ddp, ds = losses(runs / "ddp"), losses(runs / "ds_zero2")
    assert len(ddp) == len(ds) == 6
    for step, (a, b) in enumerate(zip(ddp, ds), start=1):
        assert math.isclose(a, b, rel_tol=RTOL_LOSS), f"step {step}: ddp {a} vs deepspeed {b}"
    ha, hb = head(runs / "ddp"), head(runs / "ds_zero2")
    assert ha.keys() == hb.keys()
    diff = math.sqrt(sum(float((ha[k] - hb[k]).float().pow(2).sum()) for k in ha))
    norm = math.sqrt(sum(float(ha[k].float().pow(2).sum()) for k in ha))
    assert diff / norm <= RTOL_WEIGHTS_L2, diff / norm
    summary = json.loads((runs / "ds_zero2" / "train_summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["steps"] == 6 and summary["world_size"] == 2


def test_bf16_zero0_trains_and_exports_fp32_head(runs):
    import torch

    from fscs.bench.runs import load_run

    assert all(math.isfinite(x) for x in losses(runs / "ds_bf16"))
    weights = head(runs / "ds_bf16")
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    loaded = load_run(runs / "ds_bf16")  # bench loads a DeepSpeed-trained head like any other
    assert loaded.cfg.train.precision == "bf16" and loaded.checkpoint.name == "checkpoint.pt"


def test_checkpoints_exclude_the_backbone_and_load_without_code(runs, tmp_path):
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint

    from fscs.engine.deepspeed import SAFE_GLOBAL_NAMES, safe_torch_load
    from fscs.errors import FSCSError

    files = sorted(runs.glob("ds_*/state/step-*/engine/deepspeed/*.pt"))  # ZeRO-2 fp32 and ZeRO-0 bf16
    assert any("optim_states" in f.name for f in files) and any("model_states" in f.name for f in files)
    for f in files:  # only allow-listed DeepSpeed classes: safe_torch_load never needs weights_only=False
        assert set(get_unsafe_globals_in_checkpoint(f)) <= set(SAFE_GLOBAL_NAMES), f
    model = safe_torch_load(next(f for f in files if "model_states" in f.name))
    assert not any(k.startswith("backbone") for k in model["module"])
    assert set(model["module"]) == set(head(runs / "ds_zero2"))  # the head, nothing else

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Payload()}, evil)
    with pytest.raises(FSCSError, match=r"unreadable or unsafe \(it refers to getattr, which is not an allow"):
        safe_torch_load(evil)  # names what the file would run (Path.touch pickles as getattr), not a docs link
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload()))  # the payload is real: unpickled without guard, it runs
    assert marker.exists()


@pytest.fixture(scope="module")
def one_process_group():
    """The engines' private one-member gloo group, destroyed after this module's tests (DeepSpeed caches its
    groups: every in-process engine of the module shares the first one's)."""
    import torch.distributed as dist

    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _one_process_engine(*overrides: str):
    import torch
    import torch.nn as nn

    from fscs.config import load_config
    from fscs.distributed import DistEnv
    from fscs.engine import build_engine

    torch.manual_seed(0)
    cfg = load_config(None, ["train.engine=deepspeed", "train.epochs=1", "train.steps_per_epoch=3",
                             "data.batch_size=4", *overrides])
    return build_engine(nn.Linear(16, 4), cfg, DistEnv(), torch.device("cpu"))


def test_bf16_zero0_exports_the_fp32_master_weights(one_process_group):
    """bf16 + ZeRO-0 keeps fp32 masters in DeepSpeed's unfused optimizer: checkpoint.pt holds those (what
    training continues from), not the bf16-rounded module weights."""
    import torch

    engine = _one_process_engine("train.precision=bf16", "train.zero_stage=0")
    x = torch.randn(4, 16)
    for _ in range(3):
        with engine.autocast():
            loss = engine.module(x.bfloat16()).float().pow(2).mean()
        engine.step(loss)
    state = engine.head_state_dict()
    module = {k: v.detach() for k, v in engine.head.state_dict().items()}
    assert all(v.dtype == torch.bfloat16 for v in module.values())  # the module itself runs in bf16
    for k, v in state.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v.bfloat16(), module[k], rtol=0, atol=0)  # rounds to the module's weights
    rounded = all(torch.equal(v, v.bfloat16().float()) for v in state.values())
    assert not rounded, "bf16-rounded module weights, not the masters"


def test_a_head_with_a_0_dim_parameter_trains(one_process_group):
    """The mixed head's enhancer.prior_scale is 0-dim: DeepSpeed's initial broadcast (it views each parameter
    as bytes) must not fail on it, and it keeps its shape, so the export loads into a fresh head."""
    import torch
    import torch.nn as nn

    from fscs.config import load_config
    from fscs.distributed import DistEnv
    from fscs.engine import build_engine

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(16, 4)
            self.scale = nn.Parameter(torch.tensor(8.0))

        def forward(self, x):
            return self.body(x) * self.scale

    for stage in (0, 2):
        torch.manual_seed(0)
        cfg = load_config(None, ["train.engine=deepspeed", f"train.zero_stage={stage}", "train.epochs=1",
                                 "train.steps_per_epoch=2", "data.batch_size=4"])
        engine = build_engine(Head(), cfg, DistEnv(), torch.device("cpu"))
        x = torch.randn(4, 16)
        for _ in range(2):
            engine.step(engine.module(x).pow(2).mean())
        state = engine.head_state_dict()
        assert state["scale"].shape == () and float(state["scale"]) != 8.0  # trained, still a scalar
        Head().load_state_dict(state)

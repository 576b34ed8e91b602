"""`fscs pretrain` under torchrun (2 processes, gloo): 2 + 2 steps with an interruption == 4 steps straight, bitwise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TINY = ["model.backbone=fscs_vit_mini_patch8", "model.image_size=32", "dino.local_size=16", "dino.local_crops=2",
        "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "labels.fold=0", "labels.evidence_width=8",
        "optim.batch_size=2", "optim.steps=4", "optim.warmup_steps=1", "optim.precision=fp32", "log_every=1",
        "image_every=2", "ckpt_every=100"]


def _pretrain(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fscs", "pretrain", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from fscs.data.synthetic import build_synthetic_shards

    return build_synthetic_shards(tmp_path_factory.mktemp("data") / "synth", num_images=48, size=96, workers=1)


def test_two_plus_two_steps_equal_four_straight_and_export_loads(shards, tmp_path):
    common = [f"out_dir={tmp_path}", f"data.shards={shards}", *TINY]
    _pretrain(["name=straight", *common])
    _pretrain(["name=resumed", "stop_at=2", *common])
    assert not (tmp_path / "resumed" / "backbone.safetensors").exists()  # interrupted runs do not export
    first = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert first["step"] == 2
    again = _pretrain(["name=resumed", *common])
    assert "resumed" in again.stderr + again.stdout and "step 2" in again.stderr + again.stdout

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for part in ("student", "teacher_vit", "teacher_head"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert torch.equal(a["dino_center"], b["dino_center"])
    assert not torch.equal(first["student"]["vit.cls_token"], b["student"]["vit.cls_token"])  # it did train
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["exp_avg"], state_b["exp_avg"])
    from safetensors.torch import load_file

    exported = [load_file(str(tmp_path / n / "backbone.safetensors")) for n in ("straight", "resumed")]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])

    summary = json.loads((tmp_path / "straight" / "pretrain_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and "dino" in summary["last"]
    assert "mask" in summary["last"] and any((tmp_path / "straight" / "tb").iterdir())

    from fscs.model.fscs_model import FSCSModel

    model = FSCSModel.build(backbone="fscs_vit_mini_patch8", weights=tmp_path / "straight" / "backbone.safetensors",
                            image_size=32, mask_rule="otsu")
    loaded = model.backbone.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in a["teacher_vit"].items())


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_finishes(shards, tmp_path, monkeypatch):
    """Under SLURM a preempted pretraining gets SIGTERM/SIGUSR2: it must save at the next step (not lose up to
    ckpt_every steps) and exit 128 + signal, so the launcher requeues it; the rerun resumes and exports."""
    import signal

    from fscs.cli import main
    from fscs.distributed import IN_PROCESS_ENV
    from fscs.pretrain import Pretrainer

    monkeypatch.setenv(IN_PROCESS_ENV, "1")  # fscs' finish() returns instead of ending pytest
    args = ["pretrain", f"out_dir={tmp_path}", f"data.shards={shards}", "name=sig", *TINY]
    real = Pretrainer.train_step

    def step_then_signal(self):
        out = real(self)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run; ckpt_every=100 would not save before step 4
        return out

    monkeypatch.setattr(Pretrainer, "train_step", step_then_signal)
    assert main(args) == 128 + signal.SIGTERM
    monkeypatch.setattr(Pretrainer, "train_step", real)
    assert torch.load(tmp_path / "sig" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "sig" / "backbone.safetensors").exists()
    assert main(args) == 0
    assert (tmp_path / "sig" / "backbone.safetensors").is_file()
    assert json.loads((tmp_path / "sig" / "pretrain_summary.json").read_text())["steps_this_run"] == 3


def test_labels_only_pretraining_runs_under_ddp(shards, tmp_path):
    """dino.weight=0 (the documented labels-only ablation): nothing reads the CLS output, so the last block's
    attention output/MLP and the final norm get no gradient; DDP failed at the second step ("Expected to have
    finished reduction in the prior iteration"). Those parameters must stay untouched, as in one process."""
    common = [f"out_dir={tmp_path}", f"data.shards={shards}", *TINY, "optim.steps=3", "dino.weight=0"]
    _pretrain(["name=ddp", *common])
    summary = json.loads((tmp_path / "ddp" / "pretrain_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and "dino" not in summary["last"]
    state = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert len(state["optimizer"]["state"]) < sum(len(g["params"]) for g in groups)  # no grad: no Adam state
    assert (tmp_path / "ddp" / "backbone.safetensors").is_file()

"""Engine interface (DDP, one process), schedules, signal requests, checkpoint store, resume checks, keys."""
from __future__ import annotations

import json
import logging
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fscs.config import load_config
from fscs.distributed import DistEnv
from fscs.engine import build_engine
from fscs.engine.base import WarmupSchedule
from fscs.engine.checkpoint import (LATEST, TRAINER_FILE, CheckpointStore, capture_rng, check_resume,
                                    load_checkpoint, restore_rng, save_checkpoint)
from fscs.engine.ddp import DDPEngine
from fscs.errors import FSCSError
from fscs.signals import CheckpointRequests


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cfg(*overrides: str):
    return load_config(None, ["train.epochs=2", "train.steps_per_epoch=5", *overrides])


def test_warmup_cosine_schedule():
    s = WarmupSchedule("cosine", warmup=2, total=10)
    assert [round(s(i), 4) for i in (0, 1, 2, 6, 10, 50)] == [0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert WarmupSchedule("constant", 0, 10)(7) == 1.0


def test_ddp_engine_accumulates_then_steps_like_one_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    head_a, head_b = nn.Linear(4, 1), nn.Linear(4, 1)
    head_b.load_state_dict(head_a.state_dict())
    cpu = torch.device("cpu")
    acc = build_engine(head_a, _cfg("train.grad_accum=2", "train.schedule=cosine"), DistEnv(), cpu)
    one = DDPEngine(head_b, _cfg("train.schedule=cosine").train, DistEnv(), cpu, total_steps=10)
    assert isinstance(acc, DDPEngine) and acc.grad_accum == 2
    flags = [acc.step(nn.functional.mse_loss(head_a(x[:4]), y[:4])),
             acc.step(nn.functional.mse_loss(head_a(x[4:]), y[4:]))]
    assert flags == [False, True] and acc.stepped
    assert one.step(nn.functional.mse_loss(head_b(x), y))
    for a, b in zip(head_a.parameters(), head_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert acc.lr() == pytest.approx(one.lr()) and acc.lr() < 1e-3  # cosine decayed after one optimizer step


def test_ddp_engine_save_load_round_trip(tmp_path):
    head = nn.Linear(4, 2)
    eng = DDPEngine(head, _cfg().train, DistEnv(), torch.device("cpu"))
    eng.step(head(torch.randn(3, 4)).pow(2).mean())
    eng.save(tmp_path / "engine")
    fresh = DDPEngine(nn.Linear(4, 2), _cfg().train, DistEnv(), torch.device("cpu"))
    fresh.load(tmp_path / "engine")
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), fresh.head.parameters()))
    assert fresh.optimizer.state_dict()["state"][0]["step"] == 1
    assert fresh.scheduler.state_dict()["last_epoch"] == 1


def test_rng_capture_restore_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "rng.pt", capture_rng())
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(load_checkpoint(tmp_path / "rng.pt"))  # weights_only load: plain data and tensors only
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_signals_set_flags_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with CheckpointRequests() as req:
        assert not req.poll().save
        os.kill(os.getpid(), signal.SIGUSR1)
        d = req.poll()
        assert d.save and not d.stop
        assert not req.poll().save  # a save request is consumed
        os.kill(os.getpid(), signal.SIGTERM)
        d = req.poll()
        assert d.save and d.stop and d.signal_name == "SIGTERM" and d.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR2)  # submitit's preemption: SIGTERM then SIGUSR2; the last decides
        assert req.poll().signal_name == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR1) is before


def _poll_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    with CheckpointRequests() as req:
        first = req.poll(diverged=rank == 1)  # only rank 1's loss is NaN
        second = req.poll()
    Path(f"{out}.{rank}").write_text(json.dumps([first.diverged, first.save, second.diverged]))
    dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """The divergence flag travels with the step's collective poll: no rank goes on into the next all-reduce
    alone (which would hang) while another stops."""
    import torch.multiprocessing as mp

    mp.start_processes(_poll_rank, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2,
                       start_method="fork")
    assert [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)] == [[True, False, False]] * 2


def test_ctrl_c_checkpoints_and_stops_and_a_second_one_stops_at_once():
    """Ctrl-C used to raise KeyboardInterrupt inside the step: a traceback and every step since the last
    epoch-end checkpoint lost. Now it is a stop request like SIGTERM (exit 130 after the checkpoint)."""
    before = signal.getsignal(signal.SIGINT)
    with CheckpointRequests() as req:
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C raised KeyboardInterrupt instead of requesting a checkpoint")
        d = req.poll()
        assert d.save and d.stop and d.signal_name == "SIGINT" and 128 + d.signum == 130
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's relayed copy of the same Ctrl-C: no second press
        req._first_sigint -= 2.0  # a real second press comes later
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_save_request_arriving_during_the_collective_is_not_lost(monkeypatch):
    """poll() read the flag, all-reduced it, then cleared it: a SIGUSR1 whose handler ran during the
    all-reduce (where a rank waiting for a slower peer spends most of a poll) was cleared unseen. Seen under
    SLURM: `scancel --signal=USR1` on a 2-task job wrote no checkpoint and logged nothing."""
    import torch.distributed as dist

    def all_reduce(flags, op=None):  # the signal lands while this rank waits in the collective
        os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with CheckpointRequests() as req:
        req.poll()
        monkeypatch.setattr(dist, "all_reduce", lambda flags, op=None: None)
        assert req.poll().save  # acted on at the next step boundary


def test_store_publishes_atomically_and_prunes(tmp_path):
    store = CheckpointStore(tmp_path, DistEnv(), keep=2)
    assert store.latest() is None
    for step in (3, 6, 9):
        d = store.begin(step)
        save_checkpoint(d / TRAINER_FILE, {"step": step})
        store.publish(d)
    assert store.latest().name == "step-00000009"
    assert sorted(p.name for p in store.root.glob("step-*")) == ["step-00000006", "step-00000009"]
    partial = store.begin(12)  # a save killed before publish: latest still names step 9
    (partial / "half.pt").write_bytes(b"\x80")
    assert store.latest().name == "step-00000009"
    (store.root / LATEST).write_text("step-00000012\n")  # pointer to an incomplete save
    with pytest.raises(FSCSError, match="delete .*state"):
        store.latest()


def test_resume_refuses_other_backbone_or_engine_and_warns_on_soft_changes(tmp_path):
    from fscs.config import config_to_dict

    saved = {"step": 4, "dataset": "synthetic-5i", "world_size": 2,
             "config": config_to_dict(_cfg("train.engine=deepspeed", "train.zero_stage=1"))}
    same = config_to_dict(_cfg("train.engine=deepspeed", "train.zero_stage=1", "train.epochs=9",
                               "train.image_every=1"))  # TensorBoard panels: a no-grad forward, same result
    assert check_resume(saved, same, dataset="synthetic-5i", world_size=2, where=tmp_path) == []
    with pytest.raises(FSCSError) as err:
        check_resume(saved, config_to_dict(_cfg()), dataset="synthetic-5i", world_size=2, where=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "train.engine='deepspeed'" in msg and "set train.engine=deepspeed" in msg
    with pytest.raises(FSCSError, match="model.backbone"):
        check_resume(saved, config_to_dict(_cfg("train.engine=deepspeed", "train.zero_stage=1",
                                                "model.backbone=vit_small_patch16_224.dino")),
                     dataset="synthetic-5i", world_size=2, where=tmp_path)
    with pytest.raises(FSCSError, match="dataset"):
        check_resume(saved, same, dataset="pascal-5i", world_size=2, where=tmp_path)
    with pytest.raises(FSCSError, match="resume with 2 processes"):
        check_resume(saved, same, dataset="synthetic-5i", world_size=4, where=tmp_path)
    mixed = {"step": 4, "dataset": "d", "world_size": 1,
             "config": config_to_dict(_cfg("train.regime=mixed", "train.gt_fraction=0.1"))}
    with pytest.raises(FSCSError, match="model.enhancer_channels=128"):  # the enhancer's shapes change
        check_resume(mixed, config_to_dict(_cfg("train.regime=mixed", "train.gt_fraction=0.1",
                                                "model.enhancer_channels=16")),
                     dataset="d", world_size=1, where=tmp_path)
    weak = {"step": 4, "dataset": "d", "world_size": 1, "config": config_to_dict(_cfg())}
    assert check_resume(weak, config_to_dict(_cfg("model.enhancer_channels=16")), dataset="d", world_size=1,
                        where=tmp_path) == []  # no enhancer in a weak head
    ds = {"step": 4, "dataset": "d", "world_size": 1,
          "config": config_to_dict(_cfg("train.engine=deepspeed", "train.precision=fp32"))}
    with pytest.raises(FSCSError, match="set train.precision=fp32 to resume"):  # DeepSpeed: other state files
        check_resume(ds, config_to_dict(_cfg("train.engine=deepspeed", "train.precision=bf16")), dataset="d",
                     world_size=1, where=tmp_path)
    ddp = {"step": 4, "dataset": "d", "world_size": 1, "config": config_to_dict(_cfg("train.precision=fp32"))}
    assert check_resume(ddp, config_to_dict(_cfg("train.precision=bf16")), dataset="d", world_size=1,
                        where=tmp_path) == ["train.precision changed from 'fp32' to 'bf16'"]  # DDP: autocast
    soft = config_to_dict(_cfg("train.engine=deepspeed", "train.zero_stage=1", "train.lr=0.5"))
    assert check_resume(saved, soft, dataset="synthetic-5i", world_size=2, where=tmp_path) == [
        "train.lr changed from 0.001 to 0.5"]
    rebuilt = check_resume(saved | {"index_sha256": "a" * 64}, same, dataset="synthetic-5i", world_size=2,
                           where=tmp_path, index_sha256="b" * 64)  # same dataset name, other shards
    assert len(rebuilt) == 1 and "index.json differs" in rebuilt[0]
    assert "aaaaaaaaaaaa vs bbbbbbbbbbbb" in rebuilt[0]
    assert check_resume(saved | {"index_sha256": "a" * 64}, same, dataset="synthetic-5i", world_size=2,
                        where=tmp_path, index_sha256="a" * 64) == []


def test_resumed_schedule_follows_the_current_config(tmp_path):
    """The schedule's step count comes from the checkpoint, its shape and base lr from the config: a cosine
    run resumed with more epochs goes on along the longer cosine (it stayed at lr 0 before)."""
    import math

    from fscs.config import config_to_dict

    def engine(epochs: int, *extra: str) -> DDPEngine:
        torch.manual_seed(0)
        cfg = _cfg("train.schedule=cosine", f"train.epochs={epochs}", "train.steps_per_epoch=4", *extra)
        return DDPEngine(nn.Linear(2, 1), cfg.train, DistEnv(), torch.device("cpu"))

    first = engine(1)
    for _ in range(4):
        first.step(first.module(torch.ones(1, 2)).sum())
    assert first.lr() == 0.0  # the end of a 4-step cosine
    again = engine(1)
    again.load_state_dict(first.state_dict())
    assert again.lr() == first.lr()  # unchanged config: the uninterrupted run's value
    mid = engine(1)
    mid.load_state_dict(first.state_dict() | {"schedule": dict(first.state_dict()["schedule"], last_epoch=2)})
    mid_ref = engine(1)
    for _ in range(2):
        mid_ref.step(mid_ref.module(torch.ones(1, 2)).sum())
    assert mid.lr() == mid_ref.lr()  # bitwise, mid-schedule too
    longer = engine(2)
    longer.load_state_dict(first.state_dict())
    lr = _cfg().train.lr
    assert longer.lr() == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    longer.step(longer.module(torch.ones(1, 2)).sum())
    assert longer.lr() == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 5 / 8)))
    higher = engine(1, "train.lr=0.01")
    higher.load_state_dict(dict(first.state_dict(), schedule=dict(first.state_dict()["schedule"], last_epoch=0)))
    assert higher.lr() == pytest.approx(0.01)  # a changed train.lr is used, not the stored base lr
    assert first.optimizer.param_groups[0]["weight_decay"] == 0.0
    decayed = engine(1, "train.weight_decay=0.05")
    decayed.load_state_dict(first.state_dict())
    assert decayed.optimizer.param_groups[0]["weight_decay"] == 0.05  # not the stored 0.0
    saved = {"step": 4, "dataset": "d", "world_size": 1,
             "config": config_to_dict(_cfg("train.schedule=cosine", "train.epochs=1", "train.steps_per_epoch=4"))}
    warnings = check_resume(saved, config_to_dict(_cfg("train.schedule=cosine", "train.epochs=2",
                                                       "train.steps_per_epoch=4")),
                            dataset="d", world_size=1, where=tmp_path)
    assert warnings == ["the cosine schedule's length changes from 4 to 8 steps: the learning rate follows the "
                        "new length from this step on"]


def test_new_config_keys_validate():
    cfg = _cfg("train.engine=deepspeed", "train.zero_stage=2", "train.grad_accum=4", "train.save_every=10")
    assert (cfg.train.zero_stage, cfg.train.grad_accum, cfg.train.save_every) == (2, 4, 10)
    for bad, needle in ((["train.zero_stage=1"], "train.engine=deepspeed"),
                        (["train.engine=deepspeed", "train.zero_stage=3"], "0, 1, 2"),
                        (["train.grad_accum=0"], "train.grad_accum"), (["train.device=tpu"], "cpu, cuda"),
                        (["train.engine=horovod"], "ddp, deepspeed")):
        with pytest.raises(FSCSError, match=needle):
            _cfg(*bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_deepspeed_engine_without_deepspeed_is_one_line_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    with pytest.raises(FSCSError) as err:
        build_engine(nn.Linear(4, 2), _cfg("train.engine=deepspeed"), DistEnv(), torch.device("cpu"))
    msg = str(err.value)
    assert "\n" not in msg and "deepspeed package does not import" in msg and "train.engine=ddp" in msg


@pytest.mark.parametrize("value", ["", "cuda"])
def test_deepspeed_accelerator_other_than_the_device_is_one_line_error(monkeypatch, value):
    monkeypatch.setenv("DS_ACCELERATOR", value)  # "" breaks deepspeed's import; cuda on a CPU run
    with pytest.raises(FSCSError) as err:
        build_engine(nn.Linear(4, 2), _cfg("train.engine=deepspeed"), DistEnv(), torch.device("cpu"))
    msg = str(err.value)
    assert "\n" not in msg and f"accelerator is '{value}'" in msg and "DS_ACCELERATOR=cpu" in msg


def test_deepspeed_detecting_a_gpu_for_a_cpu_run_is_one_line_error(monkeypatch):
    pytest.importorskip("deepspeed")
    import deepspeed.accelerator

    class Cuda:
        def device_name(self) -> str:
            return "cuda"

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", Cuda)  # a GPU node, train.device=cpu
    with pytest.raises(FSCSError, match="accelerator is 'cuda'.*train.device=cpu"):
        build_engine(nn.Linear(4, 2), _cfg("train.engine=deepspeed", "train.device=cpu"), DistEnv(),
                     torch.device("cpu"))


def test_gpu_config_on_cpu_machine_is_one_line_error():
    from fscs.runtime import resolve_device

    with pytest.raises(FSCSError) as err:
        resolve_device("cuda", DistEnv())
    assert "\n" not in str(err.value) and "train.device=cpu" in str(err.value)
    assert resolve_device("auto", DistEnv()).type == "cpu"


def test_more_ranks_than_gpus_is_one_line_error_everywhere(monkeypatch):
    """Training, pretraining and evaluation pick their GPU through resolve_device: a ninth process on an
    8-GPU node is told to start fewer processes (CUDA said 'invalid device ordinal' deep inside before)."""
    from fscs.bench import runner, suite
    from fscs.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_device("auto", DistEnv(local_rank=7)) == torch.device("cuda:7")
    with pytest.raises(FSCSError, match="local rank 8 has no GPU .*start at most one process per GPU"):
        resolve_device("auto", DistEnv(local_rank=8))
    import fscs.pretrain as pretrain
    assert all(m.resolve_device is resolve_device for m in (runner, suite, pretrain))


def test_truncate_train_log_keeps_resumed_steps_and_drops_a_cut_line(tmp_path, caplog):
    from fscs.run_dir import truncate_train_log

    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    log.write_text("\n".join(lines) + "\n" + '{"step": 5, "lo')  # killed while appending step 5
    with caplog.at_level(logging.WARNING, logger="fscs.train"):
        truncate_train_log(log, 3)
    assert log.read_text() == "\n".join(lines[:3]) + "\n"
    assert any("unreadable line" in r.getMessage() for r in caplog.records)
    truncate_train_log(tmp_path / "absent.jsonl", 3)  # nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def test_train_refuses_to_overwrite_a_pretraining_runs_checkpoint(shard_dir, tmp_path):
    """`fscs train name=X` where X is a `fscs pretrain` run: its resumable checkpoint.pt (student, teacher,
    optimizer) would be replaced by the head at the first save; refused before anything is written."""
    from fscs.distributed import DistEnv
    from fscs.errors import FSCSError
    from fscs.train import Trainer

    run = tmp_path / "pre"
    run.mkdir()
    foreign = {"format": "fscs-pretrain-checkpoint/1", "student": {"w": torch.ones(2)}, "step": 7}
    torch.save(foreign, run / "checkpoint.pt")
    before = (run / "checkpoint.pt").read_bytes()
    cfg = _cfg(f"data.shards={shard_dir}", f"out_dir={tmp_path}", "name=pre", "model.image_size=32",
               "model.backbone=fscs_vit_tiny_patch8", "model.weights=null", "data.batch_size=2",
               "data.num_workers=0", "train.epochs=1", "train.steps_per_epoch=1")
    with pytest.raises(FSCSError, match=r"checkpoint.pt is not a `fscs train` checkpoint .*a pretraining run.*"
                                        r"pick another name or out_dir"):
        Trainer(cfg, DistEnv()).fit()
    assert (run / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]


def test_an_unreadable_resumable_save_names_the_way_out(tmp_path):
    """'delete it' was the wrong fix for a truncated state/step-*/trainer.pt: the pointer still names that
    save. The error says how to resume from an older kept save or restart."""
    from fscs.engine.checkpoint import load_checkpoint

    bad = tmp_path / "run" / "state" / "step-00000008" / TRAINER_FILE
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(FSCSError) as err:
        load_checkpoint(bad)
    msg = str(err.value)
    assert "\n" not in msg and f"older save in {tmp_path / 'run' / 'state' / 'latest'}" in msg
    assert f"delete {tmp_path / 'run' / 'state'} to restart" in msg
    other = tmp_path / "checkpoint.pt"
    other.write_bytes(b"junk")
    with pytest.raises(FSCSError, match="delete it or pick another run"):
        load_checkpoint(other)

"""Trainer: stream episodes, train the head, checkpoint atomically, select the best epoch, resume exactly."""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import time
from pathlib import Path
from typing import Any

import torch

from fscs.atomic import remove_stale_tmp, write_text_atomic
from fscs.config import RunConfig, config_to_dict, save_config
from fscs.data.stream import TrainEpisodeStream, make_train_loader
from fscs.data.shards import read_index
from fscs.distributed import DistEnv
from fscs.engine import build_engine
from fscs.engine.checkpoint import (ENGINE_DIR, TRAINER_FILE, CheckpointStore, capture_rng, check_resume,
                                    load_checkpoint, restore_rng, rng_file, save_checkpoint)
from fscs.errors import FSCSError
from fscs.losses import CHANCE_CE, at_chance, batch_loss
from fscs.parallel import end_new_children
from fscs.run_dir import (BEST, CHECKPOINT, HEAD_FORMAT, SUMMARY, TRAIN_LOG, build_model,
                          check_backbone_identity, check_backbone_novel_fold, resolve_checkpoint,
                          truncate_train_log)
from fscs.runtime import resolve_device, resolve_precision, seed_all
from fscs.signals import CheckpointRequests, Decision, ignore_in_worker

logger = logging.getLogger(__name__)

STATE_FORMAT = "fscs-train-state/1"


class Trainer:
    """Trains the CST head of one run directory; resumes exactly from its newest checkpoint when one exists.

    One train step = one optimizer step = train.grad_accum micro-batches of data.batch_size episodes per rank.
    Data position: the stream of epoch e is a deterministic function of (seed, e, rank, worker), so a
    checkpoint stores (epoch, steps done in it) and a resumed run replays that epoch's loader and skips the
    batches already trained on (no model compute), then restores every rank's RNG states: the continuation is
    bitwise the uninterrupted run on CPU (same world size, workers and config).
    """

    def __init__(self, cfg: RunConfig, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.run_dir = cfg.run_dir
        if env.is_main:  # before any slow set-up: an unusable out_dir is a one-line error, not a late traceback
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                remove_stale_tmp(self.run_dir)
            except OSError as exc:
                raise FSCSError(f"out_dir={cfg.out_dir}: cannot create the run directory {self.run_dir} "
                                f"({exc.strerror or exc}); pick a writable out_dir") from None
        self.device = resolve_device(cfg.train.device, env)
        cfg.train.precision = resolve_precision(cfg.train.precision, self.device)
        seed_all(cfg.train.seed)
        self.index = read_index(cfg.data.shards)
        self.model = build_model(cfg).to(self.device)
        self.engine = build_engine(self.model.head, cfg, env, self.device)
        self.use_masks = cfg.train.regime == "full"
        self.store = CheckpointStore(self.run_dir, env, cfg.train.keep_checkpoints)
        self.epoch = 0
        self.step = 0
        self.step_in_epoch = 0
        self.sums: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.selection: dict[str, Any] | None = None
        self.resumed_from: int | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._saved_step = -1
        self.writer = None

    def _loader(self):
        """Fixed batches per epoch and rank; episode randomness from (seed, epoch, rank, worker)."""
        d = self.cfg.data
        extra = {"gt_fraction": self.cfg.train.gt_fraction} if self.cfg.train.regime == "mixed" else {}
        stream = TrainEpisodeStream(
            d.shards, fold=d.fold, way=d.way, shot=d.shot, image_size=self.cfg.model.image_size,
            seed=self.cfg.train.seed, use_masks=self.use_masks,
            rank=self.env.rank, world_size=self.env.world_size, buffer_per_class=d.buffer_per_class,
            balance_batch=d.batch_size if d.balance_presence else 0, **extra,
        )
        batches = self.cfg.train.steps_per_epoch * self.engine.grad_accum
        loader = make_train_loader(stream, d.batch_size, d.num_workers, batches)
        for part in getattr(loader, "pipeline", []):  # the torch DataLoader inside the WebLoader
            if isinstance(part, torch.utils.data.DataLoader) and part.num_workers and not part.worker_init_fn:
                part.worker_init_fn = ignore_in_worker
        return loader

    # ------------------------------------------------------------------ checkpoints
    def _resume(self) -> None:
        """Every rank: load the published checkpoint (engine state, counters, data position, RNG states)."""
        path = self.store.latest()
        if path is None:
            if (self.run_dir / CHECKPOINT).is_file():
                self._refuse_foreign_checkpoint(self.run_dir / CHECKPOINT)
                logger.warning("%s has %s but no resumable state/ folder: training from scratch",
                               self.run_dir, CHECKPOINT)
            return
        state = load_checkpoint(path / TRAINER_FILE)
        check_backbone_identity(state["backbone"], self.model, path)
        for warning in check_resume(state, config_to_dict(self.cfg), dataset=self.index.dataset,
                                    index_sha256=self.index.sha256, world_size=self.env.world_size,
                                    where=path):
            logger.warning("resuming %s: %s; the result will differ from an uninterrupted run", path, warning)
        self.engine.load(path / ENGINE_DIR)
        rng = path / rng_file(self.env.rank)
        self._pending_rng = load_checkpoint(rng) if rng.is_file() else None
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.sums, self.history = dict(state["sums"]), list(state["history"])
        self.selection = state["selection"]
        self.resumed_from = self._saved_step = self.step
        if self.env.is_main:
            logger.info("resumed %s at step %d: epoch %d, %d of its steps done", path, self.step, self.epoch + 1,
                        self.step_in_epoch)

    def _refuse_foreign_checkpoint(self, path: Path) -> None:
        """A readable checkpoint.pt of another kind (a `fscs pretrain` run's resumable state, say) would be
        overwritten by this run's first save and tb/ mixed with its curves: refuse before anything is written."""
        try:
            state = load_checkpoint(path)
        except FSCSError:
            return  # unreadable: nothing to lose, it is replaced
        fmt = state.get("format") if isinstance(state, dict) else None
        if fmt != HEAD_FORMAT:
            raise FSCSError(f"{path} is not a `fscs train` checkpoint (format {fmt!r}; "
                            f"{'a pretraining run' if str(fmt).startswith('fscs-pretrain') else 'another file'}), "
                            "and training here would overwrite it; pick another name or out_dir")

    def _apply_pending_rng(self) -> None:
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    def _export(self, head: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The head file bench/predict load (checkpoint.pt, best.pt): no optimizer, no backbone weights."""
        return {"format": HEAD_FORMAT, "engine": {"head": head}, "epoch": self.epoch, "step": self.step,
                "config": config_to_dict(self.cfg), "backbone": self.model.backbone.identity,
                "dataset": self.index.dataset, "index_sha256": self.index.sha256, "selection": self.selection}

    def _save(self) -> None:
        """Every rank: write a resumable checkpoint of this step boundary and publish it atomically."""
        if self._saved_step == self.step:
            return
        path = self.store.begin(self.step)
        self.engine.save(path / ENGINE_DIR)
        save_checkpoint(path / rng_file(self.env.rank), capture_rng())
        head = self.engine.head_state_dict()
        if self.env.is_main:
            save_checkpoint(path / TRAINER_FILE, {
                "format": STATE_FORMAT, "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step_in_epoch, "sums": self.sums, "history": self.history,
                "selection": self.selection,
                "config": config_to_dict(self.cfg), "backbone": self.model.backbone.identity,
                "dataset": self.index.dataset, "index_sha256": self.index.sha256,
                "world_size": self.env.world_size, "engine": self.engine.name})
        if self.env.is_main:  # before `latest` moves: a kill in between retrains from the previous save
            save_checkpoint(self.run_dir / CHECKPOINT, self._export(head))
        self.store.publish(path)
        self._saved_step = self.step
        logger.debug("checkpoint %s published", path)

    # ------------------------------------------------------------------ logging and model selection
    def _log(self, parts: dict[str, float], batch: dict[str, torch.Tensor]) -> None:
        every = self.cfg.train.image_every
        if self.env.is_main and self.writer and every and self.step % every == 0:
            from fscs.bench.plots import training_panels  # query | GT (if any) | pseudo-mask | prediction

            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.engine.autocast():  # as in training: DeepSpeed's bf16 mode keeps the head in bf16
                panels = training_panels(self.model, batch, self.cfg.train.regime)
            for i, img in enumerate(panels):
                self.writer.add_image(f"episodes/{i}", img, self.step, dataformats="HWC")
        if not self.env.is_main or self.step % self.cfg.train.log_every:
            return
        if self.writer:
            for k, v in parts.items():
                self.writer.add_scalar(f"train/{k}", v, self.step)
        with open(self.run_dir / TRAIN_LOG, "a") as fh:
            # epoch: 1-based, the epoch this step belongs to (as in train_summary.json's history)
            record = {"step": self.step, "epoch": self.epoch + 1, "lr": self.engine.lr(), **parts}
            fh.write(json.dumps(record) + "\n")

    def _select(self) -> None:
        """Model selection after an epoch: select-role episodes of the training classes (never the test
        fold), on every rank; the best epoch's head becomes best.pt."""
        n = self.cfg.train.val_episodes
        if not n:
            return
        from fscs.bench.runner import evaluate

        d, b = self.cfg.data, self.cfg.bench
        self.engine.train(False)
        try:
            with self.engine.autocast():
                res = evaluate(self.model, self.index, fold=d.fold, way=d.way, shot=d.shot,
                               regime=self.cfg.train.regime, episodes=n, seed=self.cfg.train.seed,
                               role="select", ignore_boundary=b.ignore_boundary, batch_size=b.batch_size,
                               bootstrap=0, env=self.env)
        finally:
            self.engine.train(True)
        m = res["metrics"]
        # select mIoU; select ER when no select image has a mask (image-level labels only: mIoU is None)
        key, name = ("miou", "select mIoU") if m["miou"] is not None else ("er", "select ER")
        sel = self.selection or {"criterion": name, "role": "select",
                                 "setting": f"{d.way}w{d.shot}s", "episodes": n,
                                 "manifest_hash": res["manifest_hash"], "checkpoint": BEST,
                                 "value": None, "epoch": None, "step": None, "history": []}
        sel["history"].append({"epoch": self.epoch, "step": self.step, "miou": m["miou"], "er": m["er"],
                               "fbiou": m["fbiou"]})
        measured = [k for k in ("er", "miou", "fbiou") if m[k] is not None]
        if self.history:
            self.history[-1].update({f"val/{k}": m[k] for k in measured})
        if self.writer:
            for k in measured:
                self.writer.add_scalar(f"val/{k}", m[k], self.step)
        improved = sel["value"] is None or m[key] > sel["value"]
        if improved:
            sel.update(value=m[key], epoch=self.epoch, step=self.step)
        self.selection = sel
        logger.info("model selection after epoch %d: %s %.2f (best %.2f at epoch %d)", self.epoch, name,
                    m[key], sel["value"], sel["epoch"])
        if improved:
            head = self.engine.head_state_dict()  # every rank (collective for DeepSpeed)
            if self.env.is_main:
                save_checkpoint(self.run_dir / BEST, self._export(head))

    # ------------------------------------------------------------------ the loop
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step on a batch of episodes; returns the loss terms."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.engine.autocast():
            loss, parts = batch_loss(self.model, batch, self.cfg.train, head=self.engine.module)
        self.engine.step(loss)
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}

    def fit(self) -> dict[str, Any]:
        """Train for cfg.train.epochs epochs of cfg.train.steps_per_epoch steps on every rank (or until a
        stop request / train.stop_after_steps); returns the summary (also written as train_summary.json)."""
        from fscs.progress import progress_bar

        self._resume()  # a refused resume leaves config.yaml and tb/ as they were
        d, t = self.cfg.data, self.cfg.train
        check_backbone_novel_fold(self.model, self.index.dataset, d.fold, self.cfg.model.weights)
        logger.info("%d episodes per optimizer step (data.batch_size %d x %d process(es) x "
                    "train.grad_accum %d)", d.batch_size * self.env.world_size * t.grad_accum, d.batch_size,
                    self.env.world_size, t.grad_accum)
        if self.env.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            from torch.utils.tensorboard import SummaryWriter

            # what a killed attempt logged after the checkpoint resumed from goes (everything, without one)
            truncate_train_log(self.run_dir / TRAIN_LOG, self.step)
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step + 1)
        t0 = time.time()
        total = self.cfg.train.epochs * self.cfg.train.steps_per_epoch
        with CheckpointRequests() as requests:  # installed before the loader forks its workers
            known = {p.pid for p in multiprocessing.active_children()}
            loader = self._loader()
            bar = progress_bar(total=total, initial=self.step, disable=not self.env.is_main,
                       desc=f"train {self.cfg.name}")
            try:
                status, decision = self._run(loader, requests, bar)
            except Exception as exc:  # noqa: BLE001
                if not requests.stop_signum:
                    end_new_children(known)
                    raise
                decision = Decision(stop=True, signum=requests.stop_signum)
                logger.warning("%s arrived and the step in progress failed (%s: %s); stopping without a new "
                               "checkpoint: the run resumes from its last one", decision.signal_name,
                               type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                status = "interrupted"
            finally:
                bar.close()
        return self._finish(status, decision, time.time() - t0)

    def _epoch_batches(self, loader) -> Any:
        """This epoch's batch iterator, fast-forwarded past the batches a resumed checkpoint trained on."""
        loader.set_epoch(self.epoch)
        skip = self.step_in_epoch * self.engine.grad_accum
        if skip == 0:
            self._apply_pending_rng()  # the uninterrupted run drew the loader's seed after this state, too
        it = iter(loader)
        for done in range(skip):
            if next(it, None) is None:
                raise FSCSError(f"the data stream of epoch {self.epoch + 1} ended after {done} of the {skip} "
                                "batches the checkpoint trained on; resume with the same data.* settings")
        if skip:
            logger.info("data position restored: epoch %d, skipped %d batches", self.epoch + 1, skip)
        self._apply_pending_rng()
        return it

    def _run(self, loader, requests: CheckpointRequests, bar) -> tuple[str, Decision]:
        t = self.cfg.train
        decision = Decision()
        while self.epoch < t.epochs:
            if t.stop_after_steps and self.step >= t.stop_after_steps:
                return "stopped", decision
            self.engine.train(True)
            micro: dict[str, float] = {}
            count = 0
            for batch in self._epoch_batches(loader):
                for k, v in self.train_step(batch).items():
                    micro[k] = micro.get(k, 0.0) + v
                count += 1
                if not self.engine.stepped:
                    continue
                parts = {k: v / count for k, v in micro.items()}
                micro, count = {}, 0
                self.step += 1
                self.step_in_epoch += 1
                # collective: every rank acts on any rank's request, and stops on any rank's non-finite loss
                decision = requests.poll(self.device, diverged=not math.isfinite(parts["loss"]))
                if decision.diverged:  # nothing logged or saved from this step on
                    raise FSCSError(
                        f"the training loss is not finite at step {self.step} on some process (here "
                        f"{', '.join(f'{k} {v:.4g}' for k, v in parts.items())}); stopped without saving: a "
                        "rerun resumes from the last checkpoint; lower train.lr there or use "
                        "train.precision=fp32 (or delete the run directory to start over)")
                for k, v in parts.items():
                    self.sums[k] = self.sums.get(k, 0.0) + v
                self._log(parts, batch)
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.3f}", epoch=self.epoch + 1)
                if decision.signum:
                    logger.warning("%s received: checkpoint at step %d, then stop", decision.signal_name,
                                   self.step)
                elif decision.save:
                    logger.info("checkpoint requested (SIGUSR1): saving at step %d", self.step)
                if self.step_in_epoch >= t.steps_per_epoch:
                    break
                stop = decision.stop or bool(t.stop_after_steps and self.step >= t.stop_after_steps)
                if decision.save or stop or (t.save_every and self.step % t.save_every == 0):
                    self._save()
                if stop:
                    return ("interrupted" if decision.stop else "stopped"), decision
            self._end_epoch()
            if decision.stop:
                return "interrupted", decision
        return "completed", decision

    def _end_epoch(self) -> None:
        n = self.step_in_epoch
        if n < self.cfg.train.steps_per_epoch:
            logger.warning("epoch %d ended after %d of %d steps (the loader ran dry)", self.epoch + 1, n,
                           self.cfg.train.steps_per_epoch)
        self.epoch += 1
        self.step_in_epoch = 0
        means = {k: v / max(n, 1) for k, v in self.sums.items()}
        self.sums = {}
        self.history.append({"epoch": self.epoch, "step": self.step, **means})
        if self.env.is_main:
            logger.info("epoch %d done: %s", self.epoch, ", ".join(f"{k}={v:.4f}" for k, v in means.items()))
        self._select()
        if self.env.is_main:
            from fscs.bench.plots import epoch_table

            print(epoch_table(self.history, title=f"{self.cfg.name}: epoch summary"), flush=True)
        self._save()

    def _finish(self, status: str, decision: Decision, seconds: float) -> dict[str, Any]:
        summary = {"run_dir": str(self.run_dir), "status": status, "steps": self.step, "epochs": self.epoch,
                   "seconds": round(seconds, 1), "history": self.history, "world_size": self.env.world_size,
                   "engine": self.engine.name, "resumed_from": self.resumed_from, "selection": self.selection,
                   "checkpoint": str(resolve_checkpoint(self.run_dir)), "signal": decision.signal_name,
                   "exit_code": 128 + decision.signum if status == "interrupted" else 0}
        last = self.history[-1] if self.history else {}
        if "cls" in last:
            summary["classifier_at_chance"] = at_chance(last["cls"])
            if summary["classifier_at_chance"] and status == "completed" and self.env.is_main:
                logger.warning(
                    "the presence classifier is still at chance: CE(cls) %.3f in the last epoch (ln 2 = %.3f), so "
                    "its present/absent decisions are nearly constant and ER will sit near the majority share; "
                    "train longer (train.epochs, train.steps_per_epoch): on the offline default the weak regime "
                    "left ln 2 after 250 to more than 600 steps (benchmarks/quality/CLS_PLATEAU.md)",
                    last["cls"], CHANCE_CE)
        if self.env.is_main:
            write_text_atomic(self.run_dir / SUMMARY, json.dumps(summary, indent=2))
            if self.writer:
                self.writer.close()
        logger.info("training %s at step %d (%s)", status, self.step, self.run_dir)
        return summary

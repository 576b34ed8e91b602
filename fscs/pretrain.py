"""`fscs pretrain`: DINO self-distillation of a timm ViT (+ optional image-level label objective), exported for FrozenBackbone.

Student and EMA teacher ViT, multi-crop, projection head, teacher centring and sharpening, cosine schedules
(lr, weight decay, teacher momentum); DDP through torchrun, bf16 option, atomic checkpoints, exact resume
(every random draw of step s is seeded by (seed, s, rank)), TensorBoard, tqdm. The images are read once into
memory from the shards (uint8), so the data order is a pure function of the step (fscs.pretrain_data); the
teacher is exported by fscs.pretrain_export.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from fscs.atomic import make_output_dir, remove_stale_tmp, write_text_atomic
from fscs.data.shards import read_index
from fscs.data.multicrop import MultiCropAugment
from fscs.distributed import DistEnv
from fscs.engine.checkpoint import compare_configs, flat_config, load_checkpoint, save_checkpoint
from fscs.errors import FSCSError
from fscs.model.backbone_specs import get_spec
from fscs.model.backbone_weights import PRETRAIN_FORMAT
from fscs.model.dino_head import DINOHead, DINOLoss, EvidenceNet, label_losses, vit_forward
from fscs.model.distill import cls_key_cosine
from fscs.model.student import Student, build_student_vit
from fscs.pretrain_config import PretrainConfig
from fscs.pretrain_data import batch_indices, load_images, novel_folds, step_seed
from fscs.pretrain_export import export_backbone
from fscs.runtime import resolve_device
from fscs.signals import CheckpointRequests, Decision

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FORMAT = "fscs-pretrain-checkpoint/1"


# ----------------------------------------------------------------------------------------- schedules


def cosine_schedule(start: float, end: float, step: int, total: int, warmup: int = 0, warmup_from: float = 0.0
                    ) -> float:
    """Linear warm-up from `warmup_from` to `start` over `warmup` steps, then cosine from `start` to `end`."""
    if step < warmup:
        return warmup_from + (start - warmup_from) * step / max(warmup, 1)
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Weight-decayed matrices vs undecayed biases, norms, tokens and position embeddings."""
    decay, plain = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (plain if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return [{"params": decay, "decay": True}, {"params": plain, "decay": False, "weight_decay": 0.0}]


# -------------------------------------------------------------------------------------------- trainer


class Pretrainer:
    """Runs one pretraining job in cfg.run_dir; resumes from its checkpoint when there is one."""

    def __init__(self, cfg: PretrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        if env.is_main:  # before the images are read: an unusable out_dir is a one-line error, not a late traceback
            make_output_dir(cfg.run_dir, "out_dir/name")
        self.device = resolve_device("auto", env)
        index = read_index(cfg.data.shards)
        self.images, self.labels, self.classes = load_images(cfg, index)
        self.dataset = index.dataset
        torch.manual_seed(cfg.optim.seed)  # identical initial weights on every rank
        spec = get_spec(cfg.model.backbone)
        vit = build_student_vit(cfg.model.backbone, cfg.model.image_size, cfg.model.drop_path)
        head = (DINOHead(spec.embed_dim, cfg.dino.out_dim, cfg.dino.hidden_dim, cfg.dino.bottleneck_dim)
                if cfg.dino.weight > 0 else None)
        evidence = (EvidenceNet(len(self.classes), spec.patch_size, cfg.labels.evidence_width)
                    if cfg.labels.fold is not None else None)
        self.student = Student(vit, head, evidence, cfg.dino.local_crops).to(self.device)
        self.teacher_vit = copy.deepcopy(vit).to(self.device).requires_grad_(False).eval()
        self.teacher_head = (copy.deepcopy(head).to(self.device).requires_grad_(False).eval()
                             if head is not None else None)
        self.dino_loss = DINOLoss(cfg.dino.out_dim, cfg.dino.student_temp, cfg.dino.center_momentum).to(self.device)
        # Without the DINO loss nothing reads the CLS output, so the last block's attention output/MLP and the final
        # norm get no gradient: DDP must be told (their grads stay None, as in one process: no update, no decay).
        self.module: nn.Module = (DistributedDataParallel(self.student, find_unused_parameters=head is None)
                                  if env.distributed else self.student)
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=cfg.optim.lr)
        self.augment = MultiCropAugment(cfg)
        self.step = 0
        self.writer = None
        self.fixed = self.images[:8]
        logger.info("pretraining %s at %d px on %d images (%s), label classes %s, world %d",
                    cfg.model.backbone, cfg.model.image_size, len(self.images), cfg.data.shards,
                    self.classes if evidence is not None else "unused", env.world_size)

    # -- state
    def state_dict(self) -> dict[str, Any]:
        state = {"student": self.student.state_dict(), "teacher_vit": self.teacher_vit.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "dino_center": self.dino_loss.center.clone(),
                 "step": self.step, "config": asdict(self.cfg), "format": FORMAT, "dataset": self.dataset,
                 "world_size": self.env.world_size}
        if self.teacher_head is not None:
            state["teacher_head"] = self.teacher_head.state_dict()
        return state

    def _resume(self) -> None:
        path = self.cfg.run_dir / CHECKPOINT
        if not path.exists():
            return
        state = load_checkpoint(path)
        if state.get("format") != FORMAT:
            raise FSCSError(f"{path} is not a pretraining checkpoint; pick another run name or delete it")
        if state.get("dataset") not in (None, self.dataset):
            raise FSCSError(f"pretraining checkpoint '{path}' (step {state.get('step', '?')}) was made on dataset "
                            f"'{state['dataset']}', but data.shards holds '{self.dataset}'; point data.shards at the "
                            "original shards or start a new run (another name= or out_dir=)")
        warnings = check_pretrain_resume(state.get("config", {}), asdict(self.cfg), path)
        saved_ws = int(state.get("world_size", self.env.world_size))
        if saved_ws != self.env.world_size:  # each step's images and batch are drawn per rank
            warnings.append(f"the number of processes changed from {saved_ws} to {self.env.world_size} (each step's "
                            "images and the images per step change)")
        for warning in warnings:
            logger.warning("resuming %s: %s; the result will differ from an uninterrupted run", path, warning)
        self.student.load_state_dict(state["student"])
        self.teacher_vit.load_state_dict(state["teacher_vit"])
        if self.teacher_head is not None:
            self.teacher_head.load_state_dict(state["teacher_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dino_loss.center.copy_(state["dino_center"])
        self.step = int(state["step"])
        logger.info("resumed %s at step %d", path, self.step)

    def _save(self) -> None:
        if self.env.is_main:
            save_checkpoint(self.cfg.run_dir / CHECKPOINT, self.state_dict())

    # -- one step
    def _schedules(self, step: int) -> dict[str, float]:
        o, d = self.cfg.optim, self.cfg.dino
        return {"lr": cosine_schedule(o.lr, o.min_lr, step, o.steps, o.warmup_steps),
                "wd": cosine_schedule(o.weight_decay, o.weight_decay_end, step, o.steps),
                "momentum": cosine_schedule(d.momentum, 1.0, step, o.steps),
                "teacher_temp": (d.warmup_teacher_temp + (d.teacher_temp - d.warmup_teacher_temp)
                                 * min(1.0, step / max(d.warmup_teacher_temp_steps, 1)))}

    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step
        seed = step_seed(cfg.optim.seed, step, self.env.rank)
        torch.manual_seed(seed)  # drop-path and any other global draws
        gen = torch.Generator().manual_seed(seed)
        idx = batch_indices(len(self.images), step, cfg.optim.batch_size, self.env.rank, self.env.world_size,
                            cfg.optim.seed)
        views = {k: v.to(self.device) for k, v in self.augment(self.images[idx], gen).items()}
        labels = self.labels[idx].to(self.device)
        sched = self._schedules(step)
        for group in self.optimizer.param_groups:
            group["lr"] = sched["lr"]
            if group["decay"]:
                group["weight_decay"] = sched["wd"]
        self.student.train()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.optim.precision == "bf16")
        with autocast:
            out = self.module(views)
            terms: dict[str, torch.Tensor] = {}
            teacher_out: list[torch.Tensor] = []
            if self.teacher_head is not None:
                with torch.no_grad():
                    globs = torch.cat([views["full"], views["crop"]])
                    teacher_out = list(self.teacher_head(vit_forward(self.teacher_vit, globs)[0]).chunk(2))
                terms["dino"] = cfg.dino.weight * self.dino_loss(out["dino"], teacher_out, sched["teacher_temp"])
            if "evidence" in out:
                lab = label_losses(out["evidence"], out["cos"], labels, cfg.labels.mask_offset,
                                   cfg.labels.mask_temperature, cfg.labels.topk, cfg.labels.normalize_target)
                terms["mil"] = cfg.labels.mil_weight * lab["mil"]
                terms["mask"] = cfg.labels.weight * lab["mask"]
            loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.student.head is not None and step < cfg.dino.freeze_prototypes_steps:
            self.student.head.prototypes.grad = None
        if cfg.optim.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.student.parameters(), cfg.optim.clip_grad)
        self.optimizer.step()
        with torch.no_grad():
            m = sched["momentum"]
            pairs = [(self.student.vit, self.teacher_vit)]
            if self.teacher_head is not None:
                pairs.append((self.student.head, self.teacher_head))
            for src, dst in pairs:
                for ps, pt in zip(src.parameters(), dst.parameters()):
                    pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            if teacher_out:
                self.dino_loss.update_center(teacher_out)
        self.step += 1
        area = (out["cos"].detach().float() > cfg.labels.mask_offset).float().mean()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()},
                "mask_area": float(area), **sched}

    # -- logging
    @torch.no_grad()
    def attention_images(self) -> torch.Tensor:
        """[8, 3, S, 2S]: the fixed images beside the teacher's CLS-key cosine map (grey, min-max per image)."""
        size = self.cfg.model.image_size
        x = F.interpolate(self.fixed.float() / 255.0, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        norm = (x - self.augment.mean) / self.augment.std
        _, q, k = vit_forward(self.teacher_vit, norm.to(self.device))
        patch = self.teacher_vit.patch_embed.patch_size[0]
        cos = cls_key_cosine(q, k, (size // patch, size // patch)).cpu()
        low = cos.flatten(1).amin(1)[:, None, None]
        high = cos.flatten(1).amax(1)[:, None, None]
        heat = (cos - low) / (high - low).clamp_min(1e-6)
        heat = F.interpolate(heat[:, None], size=(size, size), mode="nearest").expand(-1, 3, -1, -1)
        return torch.cat([x, heat.clamp(0, 1)], dim=-1)

    def export(self) -> Path:
        meta = {"format": PRETRAIN_FORMAT, "backbone": self.cfg.model.backbone,
                "image_size": str(self.cfg.model.image_size), "step": str(self.step), "dataset": self.dataset,
                "novel_folds": json.dumps(novel_folds(self.cfg)),
                "config": json.dumps(asdict(self.cfg))}
        path = export_backbone(self.teacher_vit, self.cfg.export_path, meta)
        logger.info("exported the teacher backbone to %s", path)
        return path

    def fit(self) -> dict[str, Any]:
        """Train to optim.steps (or stop_at); export the teacher at the end. Returns a summary."""
        from fscs.progress import progress_bar

        cfg = self.cfg
        if self.env.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(cfg.run_dir)
        self._resume()  # a refused resume leaves pretrain_config.yaml and tb/ as they were
        if self.env.is_main:
            write_text_atomic(cfg.run_dir / "pretrain_config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            from torch.utils.tensorboard import SummaryWriter

            # events of a killed attempt after its checkpoint (all of them without one)
            self.writer = SummaryWriter(str(cfg.run_dir / "tb"), purge_step=self.step + 1)
        end = min(cfg.optim.steps, cfg.stop_at) if cfg.stop_at else cfg.optim.steps
        t0, start, last = time.time(), self.step, {}
        bar = progress_bar(total=cfg.optim.steps, initial=self.step, disable=not self.env.is_main,
                           desc=f"pretrain {cfg.name}")
        decision = Decision()
        with CheckpointRequests() as requests:  # SIGUSR1: checkpoint; SIGTERM/SIGUSR2: checkpoint, then stop
            while self.step < end:
                last = self.train_step()
                decision = requests.poll(self.device, diverged=not math.isfinite(last["loss"]))  # collective
                if decision.diverged:  # before any save, on every rank: the checkpoint keeps the last finite one
                    bar.close()
                    terms = ", ".join(f"{k} {last[k]:.4g}" for k in ("dino", "mil", "mask") if k in last)
                    raise FSCSError(
                        f"pretraining loss is not finite at step {self.step} on some process (here loss "
                        f"{last['loss']:.4g}: {terms}); nothing exported and nothing saved from this step "
                        "on; lower optim.lr, set optim.clip_grad > 0 or use optim.precision=fp32 and start "
                        f"again under another name (or delete {cfg.run_dir})")
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", area=f"{last['mask_area']:.2f}")
                if self.writer is not None:
                    if self.step % cfg.log_every == 0 or self.step == end:
                        for key, value in last.items():
                            self.writer.add_scalar(f"pretrain/{key}", value, self.step)
                    if cfg.image_every and (self.step % cfg.image_every == 0 or self.step == end):
                        self.writer.add_images("attention/teacher_cls_key_cosine", self.attention_images(),
                                               self.step)
                if decision.save or self.step % cfg.ckpt_every == 0 or self.step == end:
                    self._save()
                if decision.stop:
                    logger.warning("%s received: checkpoint at step %d, then stop", decision.signal_name,
                                   self.step)
                    break
        bar.close()
        seconds = time.time() - t0
        summary = {"steps": self.step, "steps_this_run": self.step - start, "seconds": round(seconds, 1),
                   "images_per_second": round((self.step - start) * cfg.optim.batch_size * self.env.world_size
                                              / max(seconds, 1e-9), 1),
                   "world_size": self.env.world_size, "last": last,
                   "status": "interrupted" if decision.stop else "completed" if self.step >= cfg.optim.steps
                   else "stopped", "exit_code": 128 + decision.signum if decision.stop else 0}
        if self.step >= cfg.optim.steps and self.env.is_main:
            summary["export"] = str(self.export())
        if self.env.is_main:
            path = cfg.run_dir / "pretrain_summary.json"
            before = json.loads(path.read_text()) if self.step == start and path.is_file() else {}
            # a rerun of a finished run (it only re-exports) keeps the record of the attempt that trained
            if before.get("status") == summary["status"] == "completed" and before.get("steps") == self.step:
                summary = {**before, "export": summary["export"]}
            write_text_atomic(path, json.dumps(summary, indent=2))
            if self.writer is not None:
                self.writer.close()
        return summary


PRETRAIN_RESUME_FREE = ("name", "out_dir", "export", "log_every", "image_every", "ckpt_every", "stop_at",
                        "optim.steps", "data.shards")
"""Keys a resumed pretraining may change (data.shards: the same images may have moved)."""
PRETRAIN_RESUME_MUST_MATCH = ("data.exclude_folds", "data.load_size", "data.max_images", "data.split", "dino.", "labels.",
                              "model.")
"""Keys (or sections) whose change breaks the checkpoint (other architecture) or what the backbone may have
seen (a fold excluded so that its classes stay novel): an error."""


def check_pretrain_resume(saved: dict[str, Any], config: dict[str, Any], where: Path) -> list[str]:
    """Refuse a pretraining checkpoint made with another architecture, label fold or excluded folds (one-line
    FSCSError naming the key and the fix); return warnings for other changed keys."""
    return compare_configs(flat_config(saved), flat_config(config), what=f"pretraining checkpoint '{where}'",
                           must_match=PRETRAIN_RESUME_MUST_MATCH, free=PRETRAIN_RESUME_FREE)


def run_pretrain(cfg: PretrainConfig, env: DistEnv) -> dict[str, Any]:
    """Pretrain (resuming when cfg.run_dir holds a checkpoint) and export; see Pretrainer."""
    return Pretrainer(cfg, env).fit()

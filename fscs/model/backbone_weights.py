"""Backbone weight files: DINO/timm state dicts read into timm layout, checked and fitted to a model
(pos_embed resampling), and the pretraining scope `fscs pretrain` records in its exports."""
from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from fscs.errors import FSCSError
from fscs.model.backbone_specs import BACKBONES, BackboneSpec, PosResample

# the logger name of these lines before they moved out of fscs/model/backbone.py: the log reads as before
logger = logging.getLogger("fscs.model.backbone")

_WRAPPER_KEYS = ("teacher", "student", "model", "state_dict", "module")
_DROPPED_PREFIXES = ("head.", "fc_norm.", "mask_token", "pre_logits.")


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int,
                       method: PosResample) -> torch.Tensor:
    """Resample absolute position embeddings [1, P + M*M, D] to [1, P + gh*gw, D] (P prefix entries kept).

    "dino": as DINO/DINOv2's interpolate_pos_encoding: bicubic, align_corners=False, with
    scale_factor=(g + 0.1) / M (the scale, not the output size, sets the sampling positions).
    "timm": timm's resample_abs_pos_embed (bicubic to size=(gh, gw), antialias on), as timm's loader does and
    as DINOv2's register models do (interpolate_offset=0.0, interpolate_antialias=True).
    """
    num_old = pos_embed.shape[1] - num_prefix_tokens
    old = math.isqrt(num_old)
    if old * old != num_old:
        raise ValueError(f"pos_embed has {num_old} patch entries, not a square grid")
    gh, gw = new_grid
    if (old, old) == (gh, gw):
        return pos_embed
    if method == "timm":
        return resample_abs_pos_embed(pos_embed, new_size=[gh, gw], old_size=[old, old],
                                      num_prefix_tokens=num_prefix_tokens)
    if method != "dino":
        raise ValueError(f"unknown pos_embed resampling method {method!r}")
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = patch.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / old, (gw + 0.1) / old), mode="bicubic",
                         align_corners=False)
    if tuple(grid.shape[-2:]) != (gh, gw):
        raise RuntimeError(f"DINO pos_embed interpolation gave {tuple(grid.shape[-2:])}, wanted {(gh, gw)}")
    patch = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


PRETRAIN_FORMAT = "fscs-backbone/1"
"""safetensors metadata 'format' of the files `fscs pretrain` exports."""


def pretraining_scope(path: str | os.PathLike) -> dict[str, Any] | None:
    """What a backbone file made by `fscs pretrain` never saw: {"dataset": shard-set name or None, "novel_folds":
    sorted folds none of whose classes reached pretraining (images or labels)}. None for any other file.

    Read from the safetensors metadata ("dataset", "novel_folds"; older files: data.exclude_folds and
    labels.fold of the recorded "config"). The shipped asset predates "dataset": it is fscs.assets'.
    """
    import json

    from fscs import assets

    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != PRETRAIN_FORMAT:
            return None
        if "novel_folds" in meta:
            folds = {int(f) for f in json.loads(meta["novel_folds"])}
        else:
            cfg = json.loads(meta.get("config", "{}"))
            folds = {int(f) for f in cfg.get("data", {}).get("exclude_folds", [])}
            if cfg.get("labels", {}).get("fold") is not None:
                folds.add(int(cfg["labels"]["fold"]))
    except Exception as exc:  # noqa: BLE001 - an unreadable record is a one-line error, not a traceback
        raise FSCSError(f"backbone weights file {path}: unreadable fscs pretrain metadata ({exc}); re-export it "
                        "with fscs pretrain") from exc
    dataset = meta.get("dataset")
    if dataset is None and path.resolve() == assets.DEFAULT_BACKBONE_WEIGHTS.resolve():
        dataset = assets.DEFAULT_BACKBONE_DATASET
    return {"dataset": dataset, "novel_folds": sorted(folds)}


def _strip(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix):]
    return key


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a backbone state dict (DINO/DINOv2 .pth, timm .pth or .safetensors) into timm key layout.

    Unwraps {"teacher"/"student"/"model"/"state_dict": ...}, strips "module." prefixes, keeps only the
    "backbone."-prefixed tensors when there are any (prefix stripped), drops projection/classifier heads
    and DINOv2's mask_token, and converts the DINOv2 register layout to timm's.
    """
    path = Path(path)
    fix = "pass a DINO .pth or timm .pth/.safetensors backbone file, or no weights for random init"
    if not path.is_file():
        raise FSCSError(f"backbone weights file {path} {'is a directory' if path.is_dir() else 'not found'}; "
                        f"{fix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path), device="cpu")
        else:
            # DINO training checkpoints also hold the run's argparse.Namespace.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure becomes one user-facing line
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise FSCSError(f"backbone weights file {path} could not be read safely ({reason}); {fix}") from exc
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if isinstance(fmt, str) and fmt.startswith("fscs-"):  # one of the harness's own checkpoints
        what = ("a `fscs pretrain` training state; pass the backbone.safetensors that run exported"
                if fmt.startswith("fscs-pretrain") else
                "a `fscs train` checkpoint (the head only, no backbone weights); pass the backbone weights "
                "file that run was trained with (its model.weights)")
        raise FSCSError(f"backbone weights file {path} is {what}")
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise FSCSError(f"backbone weights file {path} holds no tensors under {list(obj)[:6]}; {fix}")
        obj = inner
    if not isinstance(obj, dict):
        raise FSCSError(f"backbone weights file {path} is not a state dict ({type(obj).__name__}); {fix}")
    tensors = {_strip(key, "module."): v for key, v in obj.items() if torch.is_tensor(v)}
    if any(key.startswith("backbone.") for key in tensors):  # DINO teacher/student, Lightning checkpoints
        tensors = {key[len("backbone."):]: v for key, v in tensors.items() if key.startswith("backbone.")}
    state = {key: v for key, v in tensors.items() if not key.startswith(_DROPPED_PREFIXES)}
    if len(state) < len(tensors):
        logger.info("backbone weights %s: ignored %d head/extra tensors", path, len(tensors) - len(state))
    if "register_tokens" in state:  # DINOv2 layout -> timm no_embed_class layout (CLS pos folded into CLS)
        lacking = [key for key in ("cls_token", "pos_embed") if key not in state]
        if lacking:
            raise FSCSError(f"backbone weights file {path} has DINOv2 register_tokens but no {lacking[0]}; "
                            f"{fix}")
        state["reg_token"] = state.pop("register_tokens")
        pos = state.pop("pos_embed")
        state["cls_token"] = state["cls_token"] + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
    return state


def _architecture(state: dict[str, torch.Tensor]) -> tuple[int, int, int, int, bool] | None:
    """(embed_dim, patch, depth, register tokens, LayerScale) of a timm-layout ViT state dict, or None."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    regs = state["reg_token"].shape[1] if "reg_token" in state and state["reg_token"].ndim == 3 else 0
    return proj.shape[0], proj.shape[-1], depth, regs, "blocks.0.ls1.gamma" in state


def _fitting_backbones(state: dict[str, torch.Tensor]) -> list[str]:
    """Registered backbones whose shape (width, patch, depth, registers, LayerScale) a state dict has.

    LayerScale is read off the registers: the registered DINOv2 models have both, the others neither.
    """
    arch = _architecture(state)
    return [] if arch is None else [
        s.name for s in BACKBONES.values()
        if (s.embed_dim, s.patch_size, s.depth, s.num_reg_tokens, s.num_reg_tokens > 0) == arch]


def fit_state_dict(state: dict[str, torch.Tensor], model: nn.Module, spec: BackboneSpec,
                   source: str, pos_resample: PosResample | None = None) -> dict[str, torch.Tensor]:
    """Check every key and shape, then resample pos_embed to `model`'s grid (by `pos_resample`, default the
    spec's rule); misfits raise FSCSError.

    Keys and the other shapes are checked first, so weights of another architecture (registers or not,
    other width, patch or depth) are named as such instead of failing on the pos_embed layout; the error
    names the registered backbone the weights fit, when one does.
    """
    state = dict(state)
    fits = [name for name in _fitting_backbones(state) if name != spec.name]
    made_for = f"weights made for '{spec.name}' (model.weights=PATH, or null for random init)"
    fix = (f"these weights fit backbone '{fits[0]}': pick it (model.backbone={fits[0]}) or use {made_for}"
           if fits else f"use {made_for} or pick the backbone name these weights belong to")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        regs = (f" (no register tokens in the file: '{spec.name}' needs a release with "
                f"{spec.num_reg_tokens} registers)" if missing == ["reg_token"] else "")
        raise FSCSError(f"backbone weights file {source}: missing keys {missing[:4]}, unexpected keys "
                        f"{unexpected[:4]} ({len(missing)}/{len(unexpected)} in all){regs}; {fix}")
    for key, value in state.items():
        if key != "pos_embed" and value.shape != expected[key].shape:
            raise FSCSError(f"backbone weights file {source}: key {key} has shape {tuple(value.shape)}, "
                            f"model wants {tuple(expected[key].shape)}; {fix}")
    if "pos_embed" in state and model.pos_embed is not None:
        num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        try:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], tuple(model.patch_embed.grid_size),
                                                    num_prefix, pos_resample or spec.pos_resample)
        except (ValueError, RuntimeError) as exc:
            shape = tuple(state["pos_embed"].shape)
            raise FSCSError(f"backbone weights file {source}: key pos_embed {shape} does not fit "
                            f"({exc}); {fix}") from exc
        if state["pos_embed"].shape != expected["pos_embed"].shape:
            raise FSCSError(f"backbone weights file {source}: key pos_embed has shape "
                            f"{tuple(state['pos_embed'].shape)} after resampling, model wants "
                            f"{tuple(expected['pos_embed'].shape)}; {fix}")
    return state

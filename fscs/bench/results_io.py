"""Result files, written atomically: result JSON with its manifest, records and panels; saved predictions."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fscs.atomic import write_atomic_with, write_bytes_atomic, write_text_atomic
from fscs.data.episodes import EpisodeSpec


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as indented JSON at `path`, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def clear_predictions(out_dir: Path) -> int:
    """Remove the episode files an earlier `--save-predictions` run left in `out_dir` (so the folder holds
    one run's predictions only); returns how many episodes were removed."""
    old = sorted(Path(out_dir).glob("episode_*.json")) if Path(out_dir).is_dir() else []
    for f in old:
        f.unlink(missing_ok=True)
        f.with_suffix(".png").unlink(missing_ok=True)
    return len(old)


def save_prediction(out_dir: Path, spec: EpisodeSpec, prob: torch.Tensor, decision: torch.Tensor,
                    pred: torch.Tensor) -> None:
    """episode_NNNNNN.json (manifest entry, presence probability and decision per way) + episode_NNNNNN.png
    (label map at the original query size: 0 background, k = way k), so every metric can be recomputed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"episode_{spec.index:06d}"
    label_map = Image.fromarray(pred.numpy().astype(np.uint8), mode="L")
    write_atomic_with(Path(f"{stem}.png"), lambda fh: label_map.save(fh, format="PNG"))
    entry = {"episode": spec.to_dict(), "presence_prob": [round(float(x), 6) for x in prob.tolist()],
             "presence": [bool(x) for x in decision.tolist()], "mask": f"{stem.name}.png",
             "mask_values": "0 = background, k = k-th way (classes[k-1])"}
    write_json_atomic(Path(f"{stem}.json"), entry)


def write_result(result: dict[str, Any], path: Path, manifest_dir: Path | None = None) -> dict[str, Any]:
    """Write an evaluation result as `path` (JSON) with its side files; returns the JSON written.

    The manifest goes to `manifest_dir/<hash16>.json` (default: path's folder/manifests) and is referenced,
    artifacts go next to the JSON: `<stem>.records.npz` (per-episode metric records) and
    `<stem>.panels/*.png`; the JSON refers to them by paths relative to its own folder.
    """
    res = dict(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = res.pop("manifest", None)
    art = res.pop("artifacts", None)
    mdir = manifest_dir or path.parent / "manifests"
    if manifest is not None:
        mpath = mdir / f"{res['manifest_hash'][:16]}.json"
        if not mpath.exists():
            write_json_atomic(mpath, manifest)
        res["manifest_file"] = os.path.relpath(mpath, path.parent)
    if art is not None:
        rec_path = path.with_name(path.stem + ".records.npz")
        write_atomic_with(rec_path, lambda fh: np.savez_compressed(fh, records=art["records"],
                                                                   columns=np.array(art["record_columns"])))
        res["records"] = {"file": rec_path.name, "columns": list(art["record_columns"])}
        pdir = path.with_name(path.stem + ".panels")
        keep = {f"{p['kind']}-{p['index']:06d}.png" for p in art["panels"]}
        for old in pdir.glob("*.png") if pdir.is_dir() else []:  # panels of an earlier result at this path
            if old.name not in keep:
                old.unlink(missing_ok=True)
        listed = []
        for p in art["panels"]:
            name = f"{p['kind']}-{p['index']:06d}.png"
            write_bytes_atomic(pdir / name, p["png"])
            listed.append({k: v for k, v in p.items() if k != "png"} | {"file": f"{pdir.name}/{name}"})
        res["panels"] = listed
    write_json_atomic(path, res)
    return res

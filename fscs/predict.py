"""`fscs predict`: which support classes are in new images and where (JSON, mask, overlay, contact sheet).

The model side (support scanning, feature cache, Predictor) and the run; the files it writes are made in
`fscs.predict_output`.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fscs.atomic import make_output_dir, remove_stale_tmp, write_atomic_with, write_text_atomic
from fscs.bench.runs import load_run
from fscs.data.transforms import mask_foreground, open_image, resize_mask, to_tensor_image, upright_rgb
from fscs.data.sources.folder_pixels import turned_hint
from fscs.errors import FSCSError
from fscs.model.correlation import correlation
from fscs.model.fscs_model import EpisodeFeatures, EpisodeOutput, FSCSModel
from fscs.predict_output import class_colour, unique_names, write_index_html, write_query

logger = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
REGIMES = ("auto", "weak", "full", "mixed")
_READ_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError)
SUPPORT_SIDE = 2048
"""Support images over Pillow's ~179 MP limit are read with this longer side (the model sees far fewer)."""


def read_image(path: Path, max_side: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 [h, w, 3] upright, its full (H, W)): an image over Pillow's ~179 MP limit is read downscaled to
    max_side (`upright_rgb`); raises the PIL/OS error for unreadable files (and for one over ~537 MP)."""
    with open_image(path) as im:
        return upright_rgb(im, max_side)


def read_rgb(path: Path, max_side: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] (EXIF orientation applied; see `read_image`)."""
    return read_image(path, max_side)[0]


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


@dataclass
class SupportClass:
    """One support class: images [K] of uint8 [H, W, 3], binary masks uint8 {0,1} [H, W] or None, files."""

    name: str
    files: list[Path] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)


def _support_mask(img_path: Path, shape: tuple[int, ...], read_shape: tuple[int, ...] | None = None
                  ) -> np.ndarray | None:
    """`<stem>.mask.png` beside the image or `masks/<stem>.png` in its class folder (nonzero = object); the
    file must have the image's full size `shape`, it is returned at `read_shape` (default `shape`)."""
    stem = img_path.stem
    for folder, name in ((img_path.parent, f"{stem}.mask.png"), (img_path.parent / "masks", f"{stem}.png")):
        cand = folder / name
        if not cand.is_file() and folder.is_dir():  # b.MASK.PNG is skipped as an image: it is b's mask
            cand = next((f for f in folder.iterdir() if f.name.lower() == name.lower() and f.is_file()), cand)
        if cand.is_file():
            try:
                with open_image(cand) as im:
                    mask = mask_foreground(im)  # alpha where it varies, else grey > 0
            except _READ_ERRORS as exn:
                logger.warning("%s: unreadable support mask (%s); ignored", cand, exn)
                return None
            if mask.shape != shape[:2]:
                logger.warning("%s: mask %s differs from its image %s; ignored%s", cand, mask.shape, shape[:2],
                               turned_hint(mask.shape, shape))
                return None
            if not mask.any():  # a support image shows its class: an empty mask is a broken file, not a label
                logger.warning("%s: the mask marks no pixel; ignored (pseudo-mask used instead)", cand)
                return None
            if read_shape is not None and tuple(read_shape[:2]) != mask.shape:  # a downscaled large image
                mask = np.asarray(Image.fromarray(mask).resize(read_shape[1::-1], Image.NEAREST))
            return mask
    return None


def scan_support(support_dir: str | Path, max_side: int = SUPPORT_SIDE) -> list[SupportClass]:
    """Support folder: one sub-folder per class with a few images (+ optional masks); bad images skipped;
    images over Pillow's ~179 MP limit are read with their longer side max_side."""
    root = Path(support_dir)
    dirs = sorted(d for d in (root.iterdir() if root.is_dir() else ()) if d.is_dir() and d.name[0] != ".")
    if not dirs:
        raise FSCSError(f"{root}: --support must be a folder with one sub-folder of images per class")
    classes = []
    for d in dirs:
        sc = SupportClass(d.name)
        for p in sorted(p for p in d.iterdir() if _is_image(p) and not p.name.lower().endswith(".mask.png")):
            try:
                img, full = read_image(p, max_side)
            except _READ_ERRORS as exn:
                logger.warning("%s: unreadable support image (%s); skipped", p, exn)
                continue
            sc.files.append(p)
            sc.images.append(img)
            sc.masks.append(_support_mask(p, full, img.shape))
        if not sc.files:
            raise FSCSError(f"{d}: support class {d.name!r} has no readable images; add a few or remove the "
                            "folder")
        classes.append(sc)
    if len(classes) > 254:
        raise FSCSError(f"{root}: {len(classes)} support classes; masks hold at most 254, split the support "
                        "folder")
    return classes


def expand_queries(patterns: Iterable[str]) -> list[Path]:
    """Query arguments (files, folders searched recursively but without `*.mask.png`, globs) -> unique image
    files in order; a file reached twice (absolute and relative path, overlapping globs, a symlink) is
    predicted once, under the first spelling."""
    out: dict[Path, Path] = {}  # resolved -> as given
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():  # without the `*.mask.png` masks of a folder laid out like --support
            found = sorted(f for f in p.rglob("*")
                           if _is_image(f) and not f.name.lower().endswith(".mask.png"))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(pat, recursive=True) if _is_image(Path(f)))
            if not found:
                logger.warning("query %r: no such file, folder or matching image; skipped", pat)
        for f in found:
            out.setdefault(f.resolve(), f)
    return list(out.values())


class FeatureCache:
    """Backbone features of support images on disk, keyed by sha256(file bytes) + backbone identity."""

    KEYS = ("tokens", "q", "k")

    def __init__(self, root: str | Path, identity: dict[str, Any]) -> None:
        self.root = Path(root)
        self.tag = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        make_output_dir(self.root / self.tag, "--cache")

    def _path(self, file: Path) -> Path:
        return self.root / self.tag / f"{hashlib.sha256(file.read_bytes()).hexdigest()}.pt"

    def get(self, file: Path) -> dict[str, torch.Tensor] | None:
        path = self._path(file)
        if not path.is_file():
            return None
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exn:  # noqa: BLE001 - a damaged cache entry is recomputed
            logger.warning("%s: unreadable cache entry (%s); recomputing", path, type(exn).__name__)
            return None
        if not isinstance(feats, dict) or not all(isinstance(feats.get(k), torch.Tensor) for k in self.KEYS):
            # another tool's (or an older fscs's) file under this name: recomputed, not a KeyError later
            logger.warning("%s: cache entry lacks %s; recomputing", path, "/".join(self.KEYS))
            return None
        return feats

    def put(self, file: Path, feats: dict[str, torch.Tensor]) -> None:
        cpu = {k: v.detach().cpu().clone() for k, v in feats.items()}  # own storage: not the whole batch's
        write_atomic_with(self._path(file), lambda fh: torch.save(cpu, fh))


@dataclass
class EncodedClass:
    """Frozen support features of one class (K shots, size S): tokens [K, L, 1+T, D], q/k [K, h, 1+T, dh],
    masks [K, S, S] float {0,1} (GT where has_gt, reference pseudo-mask elsewhere), has_gt [K] bool."""

    tokens: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    masks: torch.Tensor
    has_gt: torch.Tensor


class Predictor:
    """A trained run plus an encoded support set: support features are computed once (optionally cached on
    disk) and every query is decoded as a C-way K-shot episode against all support classes."""

    def __init__(self, run_dir: str | Path, support: str | Path | Sequence[SupportClass], *,
                 device: str = "auto", regime: str = "auto", cache_dir: str | Path | None = None,
                 batch_size: int = 8, max_pairs: int | None = None) -> None:
        if regime not in REGIMES:
            raise FSCSError(f"--regime {regime!r}: use one of {', '.join(REGIMES)}")
        if re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", device) is None:
            raise FSCSError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise FSCSError(f"--device {device}: no CUDA device is visible; use --device cpu (or auto)")
        if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
            raise FSCSError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                            f"use cuda:0..cuda:{torch.cuda.device_count() - 1} or auto")
        if (cache_dir is not None and isinstance(support, (str, Path))
                and Path(cache_dir).resolve().is_relative_to(Path(support).resolve())):
            raise FSCSError(f"--cache {cache_dir} is inside --support {support}, whose every sub-folder is a "
                            "class (the next run would stop at a class of cache files); put the cache elsewhere")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
        loaded = load_run(run_dir)
        self.run, self.checkpoint_sha256 = loaded.cfg, loaded.checkpoint_sha256
        self.model: FSCSModel = loaded.model.to(self.device).eval()
        self.size = self.model.image_size
        self.regime = loaded.cfg.train.regime if regime == "auto" else regime
        if self.regime == "mixed" and self.model.enhancer is None:  # before any output is touched
            raise FSCSError(f"--regime mixed: run {run_dir} was trained {loaded.cfg.train.regime} and has no "
                            "pseudo-mask enhancer; use --regime full or weak (or a run trained "
                            "train.regime=mixed)")
        self.classes = scan_support(support) if isinstance(support, (str, Path)) else list(support)
        bb = self.model.backbone
        pair_bytes = 4 * bb.num_heads * bb.num_layers * bb.grid[0] * bb.grid[1] * 145
        self.max_pairs = max_pairs or max(1, (256 << 20) // pair_bytes)  # ~256 MiB of correlation per step
        cache = FeatureCache(cache_dir, bb.identity) if cache_dir is not None else None
        self.encoded = [self._encode_class(sc, batch_size, cache) for sc in self.classes]
        n_gt = sum(int(e.has_gt.sum()) for e in self.encoded)
        n_all = sum(len(e.has_gt) for e in self.encoded)
        if self.regime == "weak" and n_gt:
            logger.info("run regime weak: %d support masks ignored (pass --regime full to use them)", n_gt)
        elif self.regime in ("full", "mixed") and n_gt < n_all:
            kind = "attention" if self.regime == "full" else "enhanced"
            logger.warning("regime %s: %d of %d support images have no mask; using %s pseudo-masks for them",
                           self.regime, n_all - n_gt, n_all, kind)

    @torch.no_grad()
    def _encode_class(self, sc: SupportClass, batch_size: int, cache: FeatureCache | None) -> EncodedClass:
        parts: list[dict[str, torch.Tensor] | None] = [cache.get(f) if cache else None for f in sc.files]
        todo = [i for i, p in enumerate(parts) if p is None]
        for s in range(0, len(todo), max(1, batch_size)):
            idx = todo[s:s + batch_size]
            x = torch.stack([to_tensor_image(sc.images[i], self.size) for i in idx]).to(self.device)
            out = self.model.features(x)
            for j, i in enumerate(idx):
                parts[i] = {"tokens": out.tokens[j], "q": out.q[j], "k": out.k[j]}
                if cache:
                    cache.put(sc.files[i], parts[i])
        stack = {key: torch.stack([p[key] for p in parts]).to(self.device).float()  # type: ignore[index]
                 for key in FeatureCache.KEYS}
        grid, size = self.model.backbone.grid, (self.size, self.size)
        masks = self.model.distiller.support_masks(stack["q"], stack["k"], grid, size).float()
        has_gt = torch.tensor([m is not None for m in sc.masks])
        for i, m in enumerate(sc.masks):
            if m is not None:
                masks[i] = resize_mask(m, self.size).float().to(self.device)
        return EncodedClass(stack["tokens"], stack["q"], stack["k"], masks, has_gt.to(self.device))

    @torch.no_grad()
    def predict_tensors(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] (normalised) -> presence probability [B, C] and mask log-probs [B, C, 2, S, S].

        Classes with equal shot counts are decoded together, chunked so one step holds <= max_pairs
        (query, support) pairs; each class is an independent way of the same C-way episode.
        """
        feats = self.model.features(images.to(self.device))
        b, c, s = images.shape[0], len(self.encoded), self.size
        presence, logits = torch.zeros(b, c), torch.zeros(b, c, 2, s, s)
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(self.encoded):
            groups.setdefault(len(e.has_gt), []).append(i)
        for k, idxs in groups.items():
            qb = max(1, min(b, self.max_pairs // k))
            nc = max(1, self.max_pairs // (qb * k))
            for q0 in range(0, b, qb):
                for c0 in range(0, len(idxs), nc):
                    chunk = idxs[c0:c0 + nc]
                    out = self._decode(feats.tokens[q0:q0 + qb], feats.k[q0:q0 + qb], chunk, k)
                    presence[q0:q0 + qb, chunk] = out.cls_logits.float().softmax(-1)[..., 1].cpu()
                    logits[q0:q0 + qb, chunk] = out.mask_logits.float().cpu()
        return presence, logits

    def _decode(self, q_tok: torch.Tensor, q_k: torch.Tensor, chunk: list[int], k: int) -> EpisodeOutput:
        """Queries (tokens [b, L, 1+T, D], keys [b, h, 1+T, dh]) against the classes `chunk` (K = k each)."""
        b, n, enc = q_tok.shape[0], len(chunk), [self.encoded[i] for i in chunk]

        def per_pair(t: torch.Tensor) -> torch.Tensor:  # [n*K, ...] -> [b*n*K, ...], query-major
            return t.unsqueeze(0).expand(b, *t.shape).reshape(b * t.shape[0], *t.shape[1:])

        s_tok, s_q, s_k = (torch.cat([getattr(e, a) for e in enc]) for a in ("tokens", "q", "k"))
        q_rep = q_tok.unsqueeze(1).expand(b, n * k, *q_tok.shape[1:]).reshape(b * n * k, *q_tok.shape[1:])
        bb = self.model.backbone
        corr = correlation(q_rep, per_pair(s_tok), bb.num_heads, bb.grid, bb.grid)
        feats = EpisodeFeatures(b, n, k, (self.size, self.size), corr, per_pair(s_q), per_pair(s_k), q_k)
        masks = torch.stack([e.masks for e in enc]).unsqueeze(0).expand(b, n, k, self.size, self.size)
        has = torch.stack([e.has_gt for e in enc]).unsqueeze(0).expand(b, n, k)
        if self.regime == "full":
            return self.model.decode_episode(feats, masks, "full")
        if self.regime == "mixed" and bool(has.any()):
            return self.model.decode_episode(feats, masks, "mixed", support_has_gt=has)
        return self.model.decode_episode(feats, None, self.regime)


def _previous_outputs(out: Path) -> list[Path]:
    """The per-query files an earlier `fscs predict` into `out` listed in its summary.json (existing ones)."""
    try:
        previous = json.loads((out / "summary.json").read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [out / name for name in previous
            if isinstance(name, str) and Path(name).name == name and (out / name).is_file()]


def _remove_previous_outputs(out: Path) -> None:
    """Remove the per-query files an earlier `fscs predict` into `out` listed in its summary.json, so the
    folder holds one run's predictions (other files there are left alone)."""
    gone = 0
    for path in _previous_outputs(out):
        path.unlink()
        gone += 1
    for table in ("index.html", "predictions.csv"):  # they listed the files just removed
        (out / table).unlink(missing_ok=True)
    if gone:
        logger.info("%s: removed %d files of the previous prediction run", out, gone)


def run_predict(run_dir: str | Path, support: str | Path, queries: Sequence[str], out_dir: str | Path, *,
                batch_size: int = 8, threshold: float = 0.5, device: str = "auto", regime: str = "auto",
                cache_dir: str | Path | None = None, max_side: int = 1024, progress: bool = True
                ) -> dict[str, Any]:
    """Predict every query image into `out_dir`: per query `<name>.json`, `<name>.mask.png` (0 = background,
    i = class i of classes.json), `<name>.overlay.png`; plus classes.json, predictions.csv, summary.json and
    index.html. Unreadable queries are logged and listed as skipped."""
    from fscs.progress import progress_bar

    if not 0.0 <= threshold <= 1.0 or batch_size < 1 or max_side < 0:
        raise FSCSError(f"--threshold {threshold} must be in [0, 1], --batch-size {batch_size} >= 1 and "
                        f"--max-side {max_side} >= 0 (0 = original size)")
    paths = expand_queries(queries)
    ours = {p.resolve() for p in _previous_outputs(Path(out_dir))}  # `--query new/ --out new/pred`, rerun
    if ours and any(p.resolve() in ours for p in paths):
        logger.info("%s: the previous prediction's masks and overlays there are not queries", out_dir)
        paths = [p for p in paths if p.resolve() not in ours]
    if not paths:
        raise FSCSError(f"--query {' '.join(queries)}: no images found; pass image files, folders or quoted "
                        "globs")
    if isinstance(support, (str, Path)) and Path(out_dir).resolve().is_relative_to(Path(support).resolve()):
        raise FSCSError(f"--out {out_dir} is inside --support {support}, whose every sub-folder is a class; "
                        "write the predictions elsewhere")
    t0 = time.time()
    created = [d for d in (Path(out_dir), *Path(out_dir).parents) if not d.exists()]  # innermost first
    out = make_output_dir(out_dir, "--out")  # before the model is loaded and the supports encoded
    try:
        pred = Predictor(run_dir, support, device=device, regime=regime, cache_dir=cache_dir,
                         batch_size=batch_size)
    except BaseException:  # a bad run or support folder: no empty --out left behind
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty (another process wrote there): kept
                break
        raise
    remove_stale_tmp(out)  # files of a killed earlier run
    _remove_previous_outputs(out)
    names = unique_names(paths)
    planned = sorted(f"{n}{ext}" for n in names for ext in (".json", ".mask.png", ".overlay.png"))
    # listed before the first is written: a rerun after an interrupted run removes what it left
    write_text_atomic(out / "summary.json", json.dumps({"complete": False, "queries": len(paths),
                                                        "out": str(out), "files": planned}, indent=2))
    colours = [class_colour(i) for i in range(len(pred.classes))]
    palette = np.array([(0, 0, 0), *colours] + [(0, 0, 0)] * (255 - len(colours)), dtype=np.uint8)
    classes = [{"id": i, "name": sc.name, "color": "#{:02x}{:02x}{:02x}".format(*colours[i - 1]),
                "support": [str(f) for f in sc.files], "support_masks": sum(m is not None for m in sc.masks)}
               for i, sc in enumerate(pred.classes, start=1)]
    meta = {"format": "fscs-predict/1", "run": str(run_dir), "checkpoint_sha256": pred.checkpoint_sha256,
            "backbone": pred.model.backbone.identity, "regime": pred.regime, "threshold": threshold,
            "mask_values": "0 = background, i = classes[i - 1].id", "classes": classes}
    write_text_atomic(out / "classes.json", json.dumps(meta, indent=2))
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    bar = progress_bar(total=len(paths), unit="img", desc="predict", disable=not progress)

    def flush(batch: list[tuple[Path, str, np.ndarray, tuple[int, int]]]) -> None:
        x = torch.stack([to_tensor_image(b[2], pred.size) for b in batch])
        presence, logits = pred.predict_tensors(x)
        for (path, name, image, full), p, lg in zip(batch, presence, logits):
            records.append(write_query(out, name, path, image, p, lg, classes, palette, threshold, max_side,
                                       full))
        bar.update(len(batch))

    read_side = max(max_side, pred.size) if max_side else 0  # images over ~179 MP: read downscaled
    batch: list[tuple[Path, str, np.ndarray, tuple[int, int]]] = []
    for path, name in zip(paths, names):
        try:
            batch.append((path, name, *read_image(path, read_side)))
        except _READ_ERRORS as exn:
            logger.warning("%s: unreadable query image (%s); skipped", path, exn)
            skipped.append({"image": str(path), "error": f"{type(exn).__name__}: {exn}"})
            bar.update(1)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["image", "present"] + [c["name"] for c in classes])
    for r in records:
        probs = [f"{c['probability']:.4f}" for c in r["classes"]]
        writer.writerow([r["image"], ";".join(r["present"]), *probs])
    write_text_atomic(out / "predictions.csv", table.getvalue())
    write_index_html(out, records, classes, skipped, meta)
    summary = {"complete": True, "queries": len(paths), "predicted": len(records), "skipped": skipped,
               "seconds": round(time.time() - t0, 2), "device": str(pred.device), "out": str(out),
               "files": sorted({f for r in records for f in (f"{r['name']}.json", r["mask"], r["overlay"])})}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    logger.info("predicted %d images (%d skipped) in %.1f s -> %s", len(records), len(skipped),
                summary["seconds"], out / "index.html")
    return summary

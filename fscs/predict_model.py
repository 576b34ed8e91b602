"""`fscs predict`'s model side: a trained run plus encoded support classes (features cached on disk), decoding
queries as C-way K-shot episodes."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fscs.atomic import make_output_dir, write_atomic_with
from fscs.bench.runs import load_run
from fscs.data.transforms import resize_mask, to_tensor_image
from fscs.errors import FSCSError
from fscs.model.correlation import correlation
from fscs.model.fscs_model import EpisodeFeatures, EpisodeOutput, FSCSModel
from fscs.predict_inputs import SupportClass, scan_support

# the logger name of these lines before they moved out of fscs/predict.py: the log reads as before
logger = logging.getLogger("fscs.predict")

REGIMES = ("auto", "weak", "full", "mixed")


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

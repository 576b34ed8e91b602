"""Files shipped inside the package: the offline default backbone made by `fscs pretrain` (see README.md here)."""
from __future__ import annotations

import logging
from pathlib import Path

from fscs.errors import FSCSError

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parent
DEFAULT_BACKBONE = "fscs_vit_mini_patch8"
"""Registry name of the shipped backbone (fscs.model.backbone_specs.BACKBONES)."""
DEFAULT_BACKBONE_WEIGHTS = ASSET_DIR / f"{DEFAULT_BACKBONE}.safetensors"
DEFAULT_BACKBONE_DATASET = "synthetic-5i"
"""Shard set (index.json 'dataset') the shipped backbone was pretrained on, without any fold-0 class; its file
predates the 'dataset' metadata key that `fscs pretrain` now writes."""
DEFAULT_IMAGE_SIZE = 128
"""Input size the shipped backbone is measured and used at (pretrained at 96 px; pos_embed resampled)."""
DEFAULT_MASK_RULE = "otsu_border"
"""Pseudo-mask rule for the shipped backbone (its CLS-key cosine is not calibrated to the reference 0.4 cut)."""
PREFIX = "asset:"


def resolve_weights(value: str | None) -> str | None:
    """A weights setting -> a file path: 'asset:NAME' is NAME inside fscs/assets; anything else is unchanged.

    Unknown assets raise FSCSError listing the shipped files.
    """
    if value is None or not str(value).startswith(PREFIX):
        return value
    path = ASSET_DIR / str(value)[len(PREFIX):]
    if not path.is_file():
        shipped = sorted(p.name for p in ASSET_DIR.glob("*.safetensors"))
        raise FSCSError(f"weights '{value}': no such file in {ASSET_DIR}; shipped: {', '.join(shipped) or 'none'}")
    return str(path)

"""`fscs pretrain`'s export: the teacher ViT as a safetensors file, byte-identical for identical weights and metadata."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch.nn as nn

from fscs.atomic import write_bytes_atomic


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors bytes with the JSON header's keys sorted (padded with spaces to 8 bytes).

    safetensors writes the metadata in a random order on every call, so the file's sha256 (the backbone identity
    `fscs train` records and checks) changed on every export of the same weights; sorted, equal weights and
    metadata give equal bytes. Tensor offsets are relative to the data section, which is kept as is.
    """
    size = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + size:]


def export_backbone(vit: nn.Module, path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write the ViT's state dict (timm keys, fp32) as safetensors atomically, byte-identical for identical
    weights and metadata; FrozenBackbone loads it."""
    from safetensors.torch import save

    path = Path(path)
    state = {k: v.detach().float().contiguous().clone() for k, v in vit.state_dict().items()}
    blob = canonical_safetensors(save(state, metadata=metadata))
    write_bytes_atomic(path, blob)  # the temporary goes away on any error
    return path

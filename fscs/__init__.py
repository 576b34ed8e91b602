"""fscs: weakly-supervised few-shot classification & segmentation harness (CST with a frozen ViT)."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["FSCSModel", "__version__"]


def __getattr__(name: str):
    if name == "FSCSModel":  # lazy: `import fscs` stays cheap for the CLI
        from fscs.model.fscs_model import FSCSModel

        return FSCSModel
    raise AttributeError(name)

"""Load checkpoint files from strangers without executing code from them."""
from __future__ import annotations

import logging
import pickle
import types
from pathlib import Path
from typing import Any

import torch

from fscs.errors import FSCSError

logger = logging.getLogger(__name__)


class _Opaque:
    """Stands in for any class a checkpoint names that we do not trust (e.g. Lightning's AttributeDict)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses are rebuilt item by item
        self.__dict__.setdefault("items", {})[key] = value


_ALLOWED_MODULE_PREFIXES = ("torch", "collections", "numpy.core.multiarray", "numpy._core.multiarray", "numpy")
_ALLOWED_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bool", "slice"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only torch/collections/numpy data types; everything else becomes an inert _Opaque."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _ALLOWED_BUILTINS:
            return super().find_class(module, name)
        if module.startswith(_ALLOWED_MODULE_PREFIXES) and not _is_callable_danger(module, name):
            return super().find_class(module, name)
        logger.debug("checkpoint names %s.%s: replaced by an inert placeholder", module, name)
        return _Opaque


def _is_callable_danger(module: str, name: str) -> bool:
    """Block names in allowed modules that can run arbitrary code when called."""
    return name in {"load", "loads", "eval", "exec", "system", "compile", "__import__"} or module in {
        "torch.hub", "torch.serialization", "numpy.testing", "torch.utils.cpp_extension"
    }


_restricted = types.ModuleType("fscs_restricted_pickle")
_restricted.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted.load = pickle.load  # type: ignore[attr-defined]
_restricted.__name__ = "fscs_restricted_pickle"


def load_untrusted(path: Path) -> Any:
    """torch.load with weights_only=True; if the file holds other objects (hyper-parameters, argparse
    namespaces), fall back to a restricted unpickler that materialises tensors and plain containers only
    and replaces every other class with an inert placeholder — no code from the file ever runs."""
    if not path.is_file():
        raise FSCSError(f"checkpoint '{path}' {'is a directory' if path.is_dir() else 'not found'}; pass the path "
                        "of an existing .ckpt/.pth file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        logger.info("%s holds non-tensor objects; loading it with the restricted unpickler", path)
    except Exception as exc:  # noqa: BLE001 - corrupt file, wrong format
        raise FSCSError(f"cannot read checkpoint '{path}' ({type(exc).__name__}); is it a PyTorch file?") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted)
    except Exception as exc:  # noqa: BLE001
        raise FSCSError(f"cannot read checkpoint '{path}' safely ({type(exc).__name__}: {exc})") from None

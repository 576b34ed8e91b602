"""Shared test settings: offline hub, deterministic seeds, few threads."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


def import_script(relpath: str, name: str):
    """Import a repository script that is not a package module (launchers/, benchmarks/) under `name`;
    yields it registered in sys.modules (dataclasses and pickling need that) and unregisters it after."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def slurm_launcher():
    """launchers/slurm.py imported as `fscs_slurm_launcher`."""
    yield from import_script("launchers/slurm.py", "fscs_slurm_launcher")


@pytest.fixture(scope="module")
def slurm_settings(slurm_launcher):
    """launchers/slurm_settings.py (presets, merged settings, submitit parameters), as slurm.py imports it."""
    import importlib

    return importlib.import_module("slurm_settings")


@pytest.fixture(scope="module")
def slurm_commands(slurm_launcher):
    """launchers/slurm_commands.py (--sweep expansion, a command's config), as slurm.py imports it."""
    import importlib

    return importlib.import_module("slurm_commands")


@pytest.fixture(scope="module")
def slurm_task(slurm_launcher):
    """launchers/slurm_task.py (FscsTask: what runs inside the job), as slurm.py imports it."""
    import importlib

    return importlib.import_module("slurm_task")


@pytest.fixture(scope="module")
def cls_plateau():
    """benchmarks/quality/cls_plateau.py imported as `fscs_cls_plateau`."""
    yield from import_script("benchmarks/quality/cls_plateau.py", "fscs_cls_plateau")

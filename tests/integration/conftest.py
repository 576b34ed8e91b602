"""Fixtures for integration tests that need real services (a private SLURM cluster)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # also works with --import-mode=importlib
    sys.path.insert(0, _HERE)

from slurm_cluster import LocalSlurm, missing_binaries  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # Harmless if pyproject registers it too; keeps runs free of PytestUnknownMarkWarning.
    config.addinivalue_line("markers", "slurm: needs a private local SLURM cluster (slurm_cluster fixture)")


def _unavailable(reason: str) -> None:
    """Skip locally, but never silently in CI: there the SLURM tests must run."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI=true: SLURM tests must not be skipped; run .ci/install-services.sh)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started, private single-node SLURM cluster (with accounting), shared by the session."""
    missing = missing_binaries()
    if missing:
        _unavailable(f"SLURM/munge/MariaDB binaries not installed: {', '.join(missing)}")
    if os.geteuid() != 0:
        _unavailable("LocalSlurm needs root (slurmd launches jobs; tested as root only)")
    with LocalSlurm() as cluster:
        yield cluster

"""Shared fixtures: the real datasets, in ``$IMAML_SEG_DATA`` or else ``<repo>/../shared/data``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _missing(reason: str) -> None:
    """Fail in CI (real-data tests must run there), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so real-data tests must not be skipped)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The folder holding the real datasets; fails in CI and skips elsewhere if it is missing."""
    root = Path(os.environ.get("IMAML_SEG_DATA") or REPO.parent / "shared" / "data")
    if not root.is_dir():
        _missing(f"real data not found at {root} (set IMAML_SEG_DATA)")
    return root


@pytest.fixture(scope="session")
def real_dataset(real_data_root: Path) -> Callable[[str], Path]:
    """``real_dataset('Kvasir-SEG')`` -> its folder; fails in CI and skips elsewhere if missing."""

    def get(name: str) -> Path:
        folder = real_data_root / name
        if not folder.is_dir():
            _missing(f"real dataset {name} not found at {folder}")
        return folder

    return get

"""Fixtures of the data tests (helpers that write files live in ``datafiles.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.datafiles import generic_tree


@pytest.fixture
def generic(tmp_path: Path) -> Path:
    """A small valid generic dataset folder."""
    return generic_tree(tmp_path / "toy")

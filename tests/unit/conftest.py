"""Fixtures and helpers shared by the unit tests of the dataset library."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from nsml_datasets._work import remove_tree


@pytest.fixture()
def work() -> Iterator[Path]:
    """A scratch folder removed after the test, pass or fail (read-only files included)."""
    path = Path(tempfile.mkdtemp(prefix="nsml-datasets-test-"))
    try:
        yield path
    finally:
        remove_tree(path)


def sha(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def write(root: Path, files: dict[str, bytes]) -> Path:
    """Create *files* (relative path -> content) under *root*; return *root*."""
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root

"""Fixtures for tests against real parts: one hub, one image per test session."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The image and the hub are shared with the browser tests: tests/hub_fixtures.py, loaded by
# tests/conftest.py, so that one test session starts one hub.
from tests.hub_fixtures import IMAGE, proxy_available  # noqa: F401


def wait_for(predicate: Any, timeout: float = 60, interval: float = 0.5, what: str = "") -> Any:
    """Poll *predicate* until it returns something truthy; fail with *what* after *timeout*."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: {last!r}")


@pytest.fixture()
def work() -> Iterator[Path]:
    """A scratch folder, removed after the test even where a test made parts read-only."""
    path = Path(tempfile.mkdtemp(prefix="nsml-ds-it-"))
    try:
        yield path
    finally:
        for p in path.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(path, ignore_errors=True)

"""Fixtures for tests against real parts: one hub, one image per test session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# The image and the hub are shared with the browser tests: tests/hub_fixtures.py, loaded by
# tests/conftest.py, so that one test session starts one hub.
from tests.hub_fixtures import IMAGE, proxy_available  # noqa: F401

if TYPE_CHECKING:
    from tests.integration.hubproc import HubProcess

NSML_AGENT = str(Path(sys.executable).parent / "nsml-agent")


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
        remove_tree(path)


def remove_tree(path: Path) -> None:
    """Remove *path*, also where a test (or a dataset cache) made parts of it read-only."""
    for p in path.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def agent_node(
    hub: HubProcess, name: str, env: Mapping[str, str], args: Sequence[str] = ()
) -> Iterator[Path]:
    """A real ``nsml-agent`` for node *name* of *hub* (its token an admin's; *env* adds to
    its environment, e.g. its GPU probe; *args* to its command line), registered before this
    yields its dataset cache folder. Afterwards the agent is stopped, the node marked
    ``down`` (nothing more is placed there) and the cache removed, also when the test failed.
    """
    cache = Path(tempfile.mkdtemp(prefix="nsml-agent-cache-"))
    full = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
    full.update(NSML_API_URL=hub.nsml_api, NSML_TOKEN=hub.user_token("admin"), **env)
    log = open(hub.state_dir / f"agent-{name}.log", "ab")
    proc = subprocess.Popen(
        [NSML_AGENT, "--name", name, "--cache-dir", str(cache), *args],
        env=full,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    admin = hub.user_token("admin")
    try:
        wait_for(
            lambda: hub.nsml("GET", f"nodes/{name}", admin).status_code == 200,
            timeout=30,
            what=f"the agent of {name} registered",
        )
        yield cache
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        r = hub.nsml("PATCH", f"nodes/{name}", admin, json={"state": "down"})
        assert r.status_code in (200, 404), r.text
        remove_tree(cache)

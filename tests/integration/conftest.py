"""Fixtures for tests against real parts: one hub, one image per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, service_missing
from tests.integration.hubproc import HubProcess

IMAGE = os.environ.get("NSML_NOTEBOOK_IMAGE", "jupyter-nsml/singleuser:latest")
BUILD_SCRIPT = REPO / "hub_config" / "images" / "build.sh"


def proxy_available() -> str | None:
    local = REPO / ".cache" / "proxy" / "node_modules" / ".bin" / "configurable-http-proxy"
    if local.exists():
        return str(local)
    return shutil.which("configurable-http-proxy")


@pytest.fixture(scope="session")
def singleuser_image(docker_client: Any) -> str:
    """The offline-built notebook image, built (incrementally) if it is missing or stale."""
    if not BUILD_SCRIPT.exists():
        service_missing("docker", f"{BUILD_SCRIPT} is missing")
    r = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--image", IMAGE],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    if r.returncode != 0:
        pytest.fail(f"image build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return IMAGE


@pytest.fixture(scope="session")
def hub(docker_client: Any, singleuser_image: str) -> Iterator[HubProcess]:
    """One real jupyterhub process (proxy, the `nsml` managed service) for the whole session."""
    if proxy_available() is None:
        service_missing(
            "hub", "configurable-http-proxy is not installed (scripts/test.sh installs it)"
        )
    state = Path(tempfile.mkdtemp(prefix="nsml-hub-"))
    prefix = f"nsmltest{os.getpid()}"
    h = HubProcess(
        state,
        env_overrides={"NSML_CONTAINER_PREFIX": prefix, "NSML_NOTEBOOK_IMAGE": singleuser_image},
    )
    try:
        h.start()
        yield h
    finally:
        try:
            if h.proc is not None:
                for user in h.admin("GET", "/users").json():
                    if user.get("server") or user.get("pending"):
                        h.admin("DELETE", f"/users/{user['name']}/server")
        except Exception:
            pass
        h.stop()
        for c in docker_client.containers.list(all=True, filters={"name": prefix}):  # type: ignore[attr-defined]
            c.remove(force=True)
        shutil.rmtree(state, ignore_errors=True)


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

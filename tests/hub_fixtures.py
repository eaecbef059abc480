"""The notebook image and the one real hub of a test session, shared by every test folder.

Integration tests (``tests/integration``) and browser tests (``tests/browser``) use the same
``hub``: ``tests/conftest.py`` imports these fixtures, so a session that runs both starts one
hub. The hub's containers and home volumes carry the session's own prefix and are removed at
the end, whatever the tests did.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.hubproc import HubProcess

REPO = Path(__file__).resolve().parent.parent
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
    from tests.conftest import service_missing  # tests/conftest.py imports this module

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


def unique_prefix(kind: str) -> str:
    """A container and volume prefix no other run on this engine has: a test machine's PIDs
    repeat across runs (a fresh PID namespace each time) while its engine may keep what a
    killed run left behind, so the PID alone does not tell runs apart."""
    return f"{kind}{os.getpid()}{secrets.token_hex(3)}"


def remove_deployment(docker_client: Any, prefix: str) -> None:
    """Remove the containers and home volumes of the hub whose prefix is *prefix*."""
    for c in docker_client.containers.list(all=True, sparse=True, filters={"name": prefix}):
        c.remove(force=True)
    for v in docker_client.volumes.list(filters={"label": f"nsml.deployment={prefix}"}):
        v.remove(force=True)


SHARED: dict[str, HubProcess] = {}  # the session's hub while it runs (for the report hooks)


@pytest.fixture(scope="session")
def hub(docker_client: Any, singleuser_image: str) -> Iterator[HubProcess]:
    """One real jupyterhub process (proxy, the `nsml` managed service) for the whole session."""
    from tests.conftest import service_missing

    if proxy_available() is None:
        service_missing(
            "hub", "configurable-http-proxy is not installed (scripts/test.sh installs it)"
        )
    state = Path(tempfile.mkdtemp(prefix="nsml-hub-"))
    prefix = unique_prefix("nsmltest")
    h = HubProcess(
        state,
        env_overrides={"NSML_CONTAINER_PREFIX": prefix, "NSML_NOTEBOOK_IMAGE": singleuser_image},
    )
    try:
        h.start()
        SHARED["hub"] = h
        yield h
    finally:
        SHARED.pop("hub", None)
        stop_all_servers(h)
        h.stop()
        remove_deployment(docker_client, prefix)
        shutil.rmtree(state, ignore_errors=True)


def stop_all_servers(h: HubProcess) -> list[str]:
    """Ask *h* to stop every server that runs or is starting (best effort: a hub that is
    already gone is left as it is); the users whose servers were asked to stop."""
    asked: list[str] = []
    try:
        if h.proc is not None:
            for user in h.admin("GET", "/users").json():
                if user.get("server") or user.get("pending"):
                    h.admin("DELETE", f"/users/{user['name']}/server")
                    asked.append(user["name"])
    except Exception:
        pass
    return asked


def _admin_token(h: Any) -> str:
    token = getattr(h, "_snapshot_admin_token", None)
    if token is None:
        token = h.user_token("admin")
        h._snapshot_admin_token = token
    return str(token)


def active_allocations(h: Any) -> dict[int, str]:
    """The allocations that hold resources on *h*'s nodes now (what the scheduler counts,
    whether or not a placement request still names them) and the requests that wait for
    some, read from its database."""
    import sqlite3

    db = sqlite3.connect(f"file:{h.state_dir / 'nsml.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT a.id, a.holder, a.user_name, n.name, a.cpu_milli, a.memory_mib, "
            "a.gpu_indices, a.created FROM allocations a JOIN nodes n ON n.id = a.node_id "
            "WHERE a.state = 'active' ORDER BY a.id"
        ).fetchall()
        waiting = db.execute(
            "SELECT id, holder, user_name, spec, created FROM placement_requests "
            "WHERE state = 'waiting' ORDER BY id"
        ).fetchall()
    finally:
        db.close()
    out = {
        r[0]: f"allocation {r[0]} since {r[7]}: {r[2]} {r[1]} on {r[3]}, {r[4]} milli-CPU, "
        f"{r[5]} MiB, GPUs {r[6]}"
        for r in rows
    }
    for r in waiting:  # negative keys: they will hold resources once placed
        out[-r[0]] = f"waiting request {r[0]} since {r[4]}: {r[2]} {r[1]} {r[3]}"
    return out


def hub_snapshot(h: Any) -> str:
    """What the shared hub holds now: its nodes, the active allocations, the waiting placement
    requests and the tail of its log (the hub's and the NSML service's lines). A failed test
    that used the hub carries this in its report, so a run on a machine that is gone can still
    say why work waited."""
    parts: list[str] = []
    try:
        admin = _admin_token(h)
        for n in h.nsml("GET", "nodes", admin).json().get("nodes", []):
            held = sum(g.get("allocated_milli", 0) for g in n.get("gpus", [])) / 1000
            parts.append(
                f"node {n.get('name')}: {n.get('state')}, {n.get('cpu_milli')} milli-CPU, "
                f"{held:g} of {len(n.get('gpus', []))} GPUs held, heartbeat "
                f"{n.get('heartbeat_age_s')} s ago"
            )
        parts.extend(v for k, v in active_allocations(h).items() if k > 0)
        waiting = h.nsml("GET", "placements?all=1&state=waiting", admin).json()
        for p in waiting.get("placements", []):
            parts.append(
                f"waiting {p.get('id')} since {p.get('created')}: {p.get('user')} "
                f"{p.get('holder')} {p.get('request')} ({p.get('reason')})"
            )
    except Exception as e:  # the hub may be what failed
        parts.append(f"(no snapshot from the service: {e!r})")
    parts.append("-- hub log, last 150 lines --")
    parts.append(h.log_tail(150))
    return "\n".join(parts)


# Allocations a test module left holding on the shared hub: {module: descriptions}.
LEFT_HOLDING: dict[str, list[str]] = {}
_MODULE_START: dict[str, set[int]] = {}  # the active allocation ids when a module began


def _shared_hub(item: pytest.Item) -> Any:
    """The session's hub when it runs and *item* uses it (else None)."""
    h = SHARED.get("hub")
    if h is None or h.proc is None or "hub" not in getattr(item, "fixturenames", ()):
        return None
    return h


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    """Before a module's first test on the shared hub: note what the hub holds."""
    module = item.nodeid.split("::")[0]
    if "hub" in getattr(item, "fixturenames", ()) and module not in _MODULE_START:
        h = _shared_hub(item)
        with contextlib.suppress(Exception):  # a hub not started yet holds nothing
            _MODULE_START[module] = set(active_allocations(h)) if h is not None else set()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """After a module's last test (its module fixtures gone too): name the allocations the
    module left on the shared hub, which the next tests there would wait for."""
    module = item.nodeid.split("::")[0]
    h = SHARED.get("hub")
    last = nextitem is None or nextitem.nodeid.split("::")[0] != module
    if last and h is not None and nextitem is None:  # the hub stops in this teardown: look now
        h = None
        with contextlib.suppress(Exception):
            _note_left(module, active_allocations(SHARED["hub"]))
    result = yield
    if last and module in _MODULE_START and h is not None and h.proc is not None:
        with contextlib.suppress(Exception):
            _note_left(module, active_allocations(h))
    return result


def _note_left(module: str, now: dict[int, str]) -> None:
    left = [v for k, v in now.items() if k not in _MODULE_START.get(module, set(now))]
    if left:
        LEFT_HOLDING[module] = left


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    """A failed test that used the shared ``hub`` gets :func:`hub_snapshot` in its report."""
    report = yield
    h = _shared_hub(item)
    if h is not None and report.failed and report.when == "call":
        report.sections.append(("shared hub at the failure", hub_snapshot(h)))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if LEFT_HOLDING:
        terminalreporter.section("work left holding the shared hub's resources")
        for nodeid, held in LEFT_HOLDING.items():
            terminalreporter.write_line(nodeid)
            for line in held:
                terminalreporter.write_line(f"    {line}")

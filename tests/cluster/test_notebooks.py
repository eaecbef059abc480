"""Notebook servers on the node the scheduler chose, through that node's engine (over TLS)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.testbed import Testbed
from tests.integration.conftest import wait_for
from tests.integration.test_spawner import (
    active_placement,
    container_env,
    placements,
    ready,
    spawn,
    stopped,
)

SMALL = {"cpu": 0.5, "memory": "512M"}


@pytest.fixture()
def servers(testbed: Testbed) -> Iterator[list[str]]:
    """Users whose servers (and placements) are removed after the test, pass or fail."""
    hub = testbed.hub
    names: list[str] = []
    yield names
    for name in names:
        hub.admin("DELETE", f"/users/{name}/server")
    for name in names:
        try:
            wait_for(lambda n=name: stopped(hub, n), timeout=60, what=f"{name} stopped")
        finally:
            token = hub.user_token(name)
            for p in placements(hub, name):
                if p["state"] in ("waiting", "placed"):
                    hub.nsml("DELETE", f"placements/{p['id']}", token)


def notebook(testbed: Testbed, node: str, user: str) -> list[object]:
    """*user*'s notebook containers on *node* (found by the spawner's label)."""
    return [
        c
        for c in testbed.docker(node).containers.list(
            all=True, filters={"label": f"nsml.user={user}"}
        )
        if c.name.startswith(testbed.prefix)
    ]


def test_a_notebook_server_starts_on_node_b_with_its_gpus_and_limits(
    testbed: Testbed, servers: list[str]
) -> None:
    hub, user = testbed.hub, "cl-nb-alice"
    servers.append(user)
    with testbed.only("node-b"):
        r = spawn(hub, user, gpus=2, **SMALL)
        assert r.status_code in (201, 202), r.text
        wait_for(lambda: ready(hub, user), timeout=120, what=f"{user} ready\n{testbed.logs()}")
    placed = active_placement(hub, user)
    assert placed["allocation"]["node"] == "node-b", placed
    # Read back from each engine: node B runs it, nodes A and C do not.
    (c,) = notebook(testbed, "node-b", user)
    assert notebook(testbed, "node-a", user) == []
    assert notebook(testbed, "node-c", user) == []
    env = container_env(c)
    gpus = [str(i) for i in placed["allocation"]["gpu_indices"]]
    assert env["NVIDIA_VISIBLE_DEVICES"].split(",") == gpus
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["NSML_NODE"] == "node-b"
    host = c.attrs["HostConfig"]  # type: ignore[attr-defined]
    assert host["NetworkMode"] == "host"
    assert host["Memory"] == 512 * 1024 * 1024 and host["NanoCpus"] == 500_000_000
    # The hub reaches the server it started on node B.
    assert hub.admin("GET", f"/users/{user}").json()["servers"][""]["ready"] is True

    hub.admin("DELETE", f"/users/{user}/server")
    wait_for(lambda: stopped(hub, user), timeout=60, what=f"{user} stopped")
    assert notebook(testbed, "node-b", user) == []
    released = hub.nsml("GET", f"placements/{placed['id']}", hub.user_token(user)).json()
    assert released["state"] == "released", released

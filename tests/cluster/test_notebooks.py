"""Notebook servers on the node the scheduler chose, through that node's engine (over TLS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.testbed import Testbed
from tests.integration.conftest import wait_for
from tests.integration.test_datasets import user as ds_user
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


def notebook(testbed: Testbed, node: str, user: str) -> list[Any]:
    """*user*'s notebook containers on *node* (found by the spawner's label)."""
    return [
        c
        for c in testbed.docker(node).containers.list(
            all=True, filters={"label": f"nsml.user={user}"}
        )
        if c.name.startswith(testbed.prefix)
    ]


def test_a_notebook_server_starts_on_node_b_with_its_gpus_limits_and_dataset(
    testbed: Testbed, servers: list[str], tmp_path: Path
) -> None:
    hub, user = testbed.hub, "cl-nb-alice"
    servers.append(user)
    data = tmp_path / "nb-data"
    data.mkdir()
    (data / "hello.txt").write_text("from the store\n")
    alice = ds_user(hub, user)
    assert alice.nsml("dataset", "push", "cl-nb-data", str(data)).stdout.strip() == "cl-nb-data@1"
    with testbed.only("node-b"):
        r = spawn(hub, user, gpus=2, datasets=["cl-nb-data"], **SMALL)
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
    host = c.attrs["HostConfig"]
    assert host["NetworkMode"] == "host"
    assert host["Memory"] == 512 * 1024 * 1024 and host["NanoCpus"] == 500_000_000
    # The dataset: fetched by node B's agent into its cache, mounted read-only under /data.
    (mount,) = [m for m in c.attrs["Mounts"] if m["Destination"] == "/data/cl-nb-data"]
    assert mount["RW"] is False
    assert Path(mount["Source"]).is_relative_to(testbed.agents["node-b"].cache_dir), mount
    got = c.exec_run(["cat", "/data/cl-nb-data/hello.txt"], user="1000")
    assert got.exit_code == 0 and got.output == b"from the store\n", got
    denied = c.exec_run(["sh", "-c", "echo x > /data/cl-nb-data/new.txt"], user="root")
    assert denied.exit_code != 0 and b"Read-only file system" in denied.output
    # The hub reaches the server it started on node B.
    assert hub.admin("GET", f"/users/{user}").json()["servers"][""]["ready"] is True

    hub.admin("DELETE", f"/users/{user}/server")
    wait_for(lambda: stopped(hub, user), timeout=60, what=f"{user} stopped")
    assert notebook(testbed, "node-b", user) == []
    released = hub.nsml("GET", f"placements/{placed['id']}", hub.user_token(user)).json()
    assert released["state"] == "released", released

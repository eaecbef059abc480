"""Datasets on the nodes: read-only mounts in notebook containers, node caches, locality.

Real hub, real Docker engine, the real NSML server (and, for the eviction test, a second
``nsml-server`` with a small cache budget), and a real ``nsml-agent`` process for a remote node.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import requests

from tests.integration.conftest import agent_node, wait_for
from tests.integration.hubproc import HubProcess, ServerProcess, virtual_node_heartbeat
from tests.integration.test_datasets import User, make_folder, store_dir, tree, user
from tests.integration.test_hub import assert_json_error
from tests.integration.test_spawner import container_env, placements, ready, spawn, stopped

pytestmark = [pytest.mark.hub, pytest.mark.docker]

MIB = 1 << 20
NSML_AGENT = str(Path(sys.executable).parent / "nsml-agent")


@pytest.fixture()
def notebook_users(hub: HubProcess) -> Iterator[list[str]]:
    """Users whose servers and placements are removed after the test, pass or fail."""
    names: list[str] = []
    yield names
    for name in names:
        hub.admin("DELETE", f"/users/{name}/server")
    for name in names:
        wait_for(lambda n=name: stopped(hub, n), timeout=60, what=f"{name} stopped")
        token = hub.user_token(name)
        for p in placements(hub, name):
            if p["state"] in ("waiting", "placed"):
                hub.nsml("DELETE", f"placements/{p['id']}", token)


def notebook_container(hub: HubProcess, docker_client: Any, name: str) -> Any:
    prefix = hub.env_overrides["NSML_CONTAINER_PREFIX"]
    found = [
        c
        for c in docker_client.containers.list(all=True, filters={"label": f"nsml.user={name}"})
        if c.name.startswith(prefix)
    ]
    assert len(found) == 1, [c.name for c in found]
    return found[0]


def mark_down(hub: HubProcess, node: str) -> None:
    """Take a node a test added out of service (nothing more is placed there)."""
    r = hub.nsml("PATCH", f"nodes/{node}", hub.user_token("admin"), json={"state": "down"})
    assert r.status_code in (200, 404), r.text


def one_file_dataset(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    (root / "data.bin").write_bytes(os.urandom(size))
    return root


def place(u: User, holder: str, datasets: list[str], **body: Any) -> dict[str, Any]:
    r = u.api(
        "POST",
        "placements",
        json={
            "holder": holder,
            "cpu": 0.1,
            "memory": "64M",
            "datasets": datasets,
            "wait_s": 20,
            **body,
        },
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def mounts(u: User, pid: int, wait_s: float = 60) -> Any:
    return u.api("POST", f"placements/{pid}/mounts", params={"wait_s": wait_s})


# ---- the local node: notebook servers --------------------------------------------------------


def test_a_notebook_server_sees_its_dataset_read_only_under_data(
    hub: HubProcess, work: Path, notebook_users: list[str], docker_client: Any
) -> None:
    alice = user(hub, "dm-alice")
    notebook_users.append(alice.name)
    folder = make_folder(work / "src", n_small=6, large=(1 * MIB,))
    assert alice.nsml("dataset", "push", "nb-data", str(folder)).stdout.strip() == "nb-data@1"
    extra = one_file_dataset(work / "extra", 1000)
    alice.nsml("dataset", "push", "nb-extra", str(extra))
    (extra / "data.bin").write_bytes(b"second version")
    assert alice.nsml("dataset", "push", "nb-extra", str(extra)).stdout.strip() == "nb-extra@2"

    # Several datasets per server, each at the version asked for.
    r = spawn(hub, alice.name, cpu=0.5, memory="512M", datasets=["nb-data", "nb-extra@1"])
    assert r.status_code in (201, 202), r.text
    wait_for(lambda: ready(hub, alice.name), timeout=90, what="the server with a dataset ready")
    c = notebook_container(hub, docker_client, alice.name)
    assert container_env(c)["NSML_DATASETS"] == "nb-data@1,nb-extra@1"
    one = c.exec_run(["cat", "/data/nb-extra/data.bin"], user="1000").output
    assert len(one) == 1000, "version 1, not the latest"

    listing = c.exec_run(["find", "/data/nb-data", "-type", "f"], user="1000")
    assert listing.exit_code == 0, listing.output
    seen = sorted(p.removeprefix("/data/nb-data/") for p in listing.output.decode().split())
    assert seen == sorted(tree(folder))
    got = c.exec_run(["cat", "/data/nb-data/part0/f000.txt"], user="1000").output
    assert got == (folder / "part0" / "f000.txt").read_bytes()

    for cmd in (
        "echo x > /data/nb-data/new.txt",
        "echo x >> /data/nb-data/part0/f000.txt",
        "rm /data/nb-data/big0.bin",
        "mkdir /data/nb-data/dir",
    ):
        out = c.exec_run(["sh", "-c", cmd], user="root")
        assert out.exit_code != 0, cmd
        assert b"Read-only file system" in out.output, (cmd, out.output)
    mount = [m for m in c.attrs["Mounts"] if m["Destination"] == "/data/nb-data"]
    assert len(mount) == 1 and mount[0]["RW"] is False, c.attrs["Mounts"]

    # The local node caches it (hard links to the store) and reports it as locality.
    node = hub.nsml("GET", "nodes/local-test", alice.token).json()
    assert node["datasets"].get("nb-data@1") == sum(len(b) for b, _ in tree(folder).values())
    cache = hub.nsml("GET", "dataset-store", hub.user_token("admin")).json()["cache"]
    entry = {e["key"]: e for e in cache["entries"]}["nb-data@1"]
    assert len(entry["holders"]) == 1 and entry["holders"][0].startswith("allocation:")

    # In use: it cannot be removed while the server runs; after the server stops it can.
    r = alice.api("DELETE", "datasets/nb-data")
    assert "in use by dm-alice:notebook" in assert_json_error(r, 409, "in_use")["message"]
    hub.admin("DELETE", f"/users/{alice.name}/server")
    wait_for(lambda: stopped(hub, alice.name), timeout=60, what="server stopped")

    def released() -> bool:
        c = hub.nsml("GET", "dataset-store", hub.user_token("admin")).json()["cache"]
        return {e["key"]: e for e in c["entries"]}["nb-data@1"]["holders"] == []

    wait_for(released, timeout=30, what="the cache released the server's hold")
    assert alice.api("DELETE", "datasets/nb-data").status_code == 200


def test_another_user_cannot_mount_a_private_dataset_and_nothing_is_allocated(
    hub: HubProcess, work: Path, notebook_users: list[str]
) -> None:
    owner, other = user(hub, "dm-owner"), user(hub, "dm-other")
    notebook_users.append(other.name)
    owner.nsml("dataset", "push", "private-nb", str(make_folder(work / "src", 2, ())))
    r = spawn(hub, other.name, cpu=0.5, memory="512M", datasets=["private-nb"])
    assert r.status_code == 400, (r.status_code, r.text)
    assert "No dataset 'private-nb' that you can read" in r.json()["message"]
    wait_for(lambda: stopped(hub, other.name), timeout=30, what="no server")
    assert placements(hub, other.name) == []
    # A placement asked directly fails the same way.
    r = other.api("POST", "placements", json={"holder": "x", "datasets": ["private-nb@1"]})
    assert_json_error(r, 404, "not_found")


# ---- eviction under a small budget -----------------------------------------------------------


@pytest.fixture()
def small_cache_server(hub: HubProcess) -> Iterator[ServerProcess]:
    """A second NSML server with its own database and a local node whose cache holds 3.5 MiB."""
    srv = ServerProcess(
        hub,
        f"sqlite:///{hub.state_dir / 'small-cache.sqlite'}",
        "small-cache",
        args=[
            "--node-name",
            "cache-node",
            f"--NSMLServer.dataset_cache_bytes={int(3.5 * MIB)}",
            "--NSMLServer.dataset_reconcile_interval=0.2",
            "--NSMLServer.heartbeat_interval=1",
        ],
        local_node=True,
    )
    srv.start()
    try:
        admin = hub.user_token("admin")
        wait_for(
            lambda: (
                requests.get(
                    f"{srv.api}/nodes/cache-node",
                    headers={"Authorization": f"token {admin}"},
                    timeout=10,
                ).status_code
                == 200
            ),
            timeout=30,
            what="the small-cache node registered",
        )
        yield srv
    finally:
        srv.stop()


def test_the_node_cache_evicts_least_recently_used_and_never_what_is_held(
    hub: HubProcess, work: Path, small_cache_server: ServerProcess
) -> None:
    srv = small_cache_server
    alice = user(hub, "dm-evictor")
    admin = hub.user_token("admin")

    def api(method: str, path: str, token: str = alice.token, **kw: Any) -> Any:
        return requests.request(
            method,
            f"{srv.api}/{path}",
            headers={"Authorization": f"token {token}"},
            timeout=60,
            **kw,
        )

    def push(name: str, size: int) -> None:
        env = {**alice.env, "NSML_API_URL": srv.api + "/"}
        folder = one_file_dataset(work / name, size)
        r = subprocess.run(
            [str(Path(sys.executable).parent / "nsml"), "dataset", "push", name, str(folder)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and r.stdout.strip() == f"{name}@1", r.stderr

    def entries() -> list[dict[str, Any]]:
        return list(api("GET", "dataset-store", admin).json()["cache"]["entries"])

    def cached() -> list[str]:
        return sorted(e["key"] for e in entries())

    def ask(holder: str, name: str) -> tuple[int, Any]:
        r = api(
            "POST",
            "placements",
            json={"holder": holder, "cpu": 0.1, "memory": "64M", "datasets": [name], "wait_s": 20},
        )
        assert r.status_code == 201, r.text
        pid = int(r.json()["id"])
        return pid, api("POST", f"placements/{pid}/mounts", params={"wait_s": 30})

    def hold(holder: str, name: str) -> int:
        pid, m = ask(holder, name)
        assert m.status_code == 200, m.text
        return pid

    def release(pid: int) -> None:
        mine = f"allocation:{api('GET', f'placements/{pid}').json()['allocation']['id']}"
        assert api("DELETE", f"placements/{pid}").status_code == 200
        wait_for(
            lambda: not any(mine in e["holders"] for e in entries()),
            timeout=15,
            what=f"placement {pid}'s hold released",
        )

    for name in ("d1", "d2", "d3", "d4"):
        push(name, MIB)
    push("big", 2 * MIB + MIB // 2 + 4096)
    push("huge", 4 * MIB)

    release(hold("j1", "d1"))
    release(hold("j2", "d2"))
    p3 = hold("j3", "d3")  # held from here on
    assert cached() == ["d1@1", "d2@1", "d3@1"]
    release(hold("j4", "d4"))  # evicts d1, the least recently used
    assert cached() == ["d2@1", "d3@1", "d4@1"]
    release(hold("j5", "d2"))  # a use: d2 is now more recent than d4
    release(hold("j6", "d1"))  # evicts d4, not d2, and never the held d3
    assert cached() == ["d1@1", "d2@1", "d3@1"]

    # big needs d3's room too: refused, naming what holds it; nothing is evicted.
    p7, m = ask("j7", "big")
    body = assert_json_error(m, 409, "dataset_cache")
    assert "no room for big@1" in body["message"] and "d3@1" in body["message"], body
    assert cached() == ["d1@1", "d2@1", "d3@1"]
    release(p7)
    # Larger than the whole cache: can never be cached on this node.
    p8, m = ask("j8", "huge")
    assert "can never be cached here" in assert_json_error(m, 409, "dataset_cache")["message"]
    release(p8)
    # Once d3 is released, big fits: everything else goes, least recently used first.
    release(p3)
    release(hold("j9", "big"))
    assert cached() == ["big@1"]
    wait_for(
        lambda: (
            api("GET", "nodes/cache-node").json()["datasets"]
            == {"big@1": 2 * MIB + MIB // 2 + 4096}
        ),
        timeout=10,
        what="the node reports its cache as locality",
    )


# ---- a remote node: the agent downloads with hash checks --------------------------------------


@pytest.fixture()
def remote_agent(hub: HubProcess) -> Iterator[tuple[str, Path]]:
    """An ``nsml-agent`` for node ``xds-remote`` (one virtual GPU of its own model).

    Nodes these tests add sort after the hub's own ``local-test`` (the placement reasons other
    tests read list nodes by name) and are marked ``down`` afterwards, so that nothing else is
    placed on them.
    """
    env = {"NSML_VIRTUAL_GPUS": "1", "NSML_VIRTUAL_GPU_MODEL": "XDS-Remote-GPU"}
    args = ["--docker-url", "tcp://xds-remote.invalid:2376", "--cache-bytes", str(64 * MIB)]
    args += ["--interval", "1", "--holds-interval", "0.2"]
    with agent_node(hub, "xds-remote", env, args) as cache:
        yield "xds-remote", cache


def test_a_remote_node_downloads_the_version_with_hash_checks_and_releases_it(
    hub: HubProcess, work: Path, remote_agent: tuple[str, Path]
) -> None:
    node, cache = remote_agent
    alice = user(hub, "dm-remote-user")
    folder = make_folder(work / "src", n_small=8, large=(2 * MIB,))
    alice.nsml("dataset", "push", "far-data", str(folder))
    placed = place(alice, "far-job", ["far-data"], gpus=1, gpu_models=["XDS-Remote-GPU"])
    try:
        assert placed["allocation"]["node"] == node
        first = mounts(alice, placed["id"], wait_s=0)
        assert first.status_code in (200, 202), first.text
        if first.status_code == 202:
            assert first.json()["state"] == "preparing"
        r = mounts(alice, placed["id"], wait_s=30)
        assert r.status_code == 200, r.text
        (m,) = r.json()["mounts"]
        assert m["ref"] == "far-data@1" and m["container_path"] == "/data/far-data"
        path = Path(m["host_path"])
        assert path.is_relative_to(cache), (path, cache)
        assert tree(path) == tree(folder)
        assert all(
            not (p.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            for p in path.rglob("*")
            if p.is_file()
        ), "cached files are read-only"
        wait_for(
            lambda: (
                "far-data@1" in hub.nsml("GET", f"nodes/{node}", alice.token).json()["datasets"]
            ),
            timeout=15,
            what="the remote node reports the cached version",
        )
    finally:
        alice.api("DELETE", f"placements/{placed['id']}")

    def released() -> bool:
        index = json.loads((cache / "index.json").read_text())
        return index["entries"]["far-data@1"]["holders"] == []

    wait_for(released, timeout=20, what="the agent released the ended allocation's hold")


def test_a_remote_node_refuses_a_blob_whose_bytes_do_not_match(
    hub: HubProcess, work: Path, remote_agent: tuple[str, Path]
) -> None:
    _, cache = remote_agent
    alice = user(hub, "dm-remote-corrupt")
    folder = one_file_dataset(work / "src", MIB + 17)
    alice.nsml("dataset", "push", "rotten-data", str(folder))
    digest = blake3.blake3((folder / "data.bin").read_bytes()).hexdigest()
    blob = store_dir(hub) / "blobs" / digest[:2] / digest[2:]
    original, mode = blob.read_bytes(), blob.stat().st_mode
    blob.chmod(0o644)
    blob.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])  # never the same byte
    placed = place(alice, "rotten-job", ["rotten-data"], gpus=1, gpu_models=["XDS-Remote-GPU"])
    try:
        body = assert_json_error(mounts(alice, placed["id"], wait_s=30), 409, "dataset_cache")
        assert "corrupt" in body["message"] and digest in body["message"], body
        assert not (cache / "entries" / "rotten-data@1").exists()
    finally:
        alice.api("DELETE", f"placements/{placed['id']}")
        blob.write_bytes(original)
        blob.chmod(stat.S_IMODE(mode))


# ---- locality ---------------------------------------------------------------------------------


def test_the_scheduler_prefers_the_node_that_caches_the_dataset(
    hub: HubProcess, work: Path
) -> None:
    alice = user(hub, "dm-locality")
    alice.nsml("dataset", "push", "loc-data", str(one_file_dataset(work / "src", 3 * MIB)))
    size = alice.json("dataset", "info", "loc-data@1")["bytes"]
    nodes = ("xds-loc-a", "xds-loc-b")
    try:
        _prefer_cached(hub, alice, nodes, size)
    finally:
        for n in nodes:
            mark_down(hub, n)


def _prefer_cached(hub: HubProcess, alice: User, nodes: tuple[str, str], size: int) -> None:
    admin = hub.user_token("admin")
    for cached_on in nodes:
        for n in nodes:
            hb = virtual_node_heartbeat(n, gpus=2)
            for g in hb["gpus"]:
                g["model"] = "XDS-Loc-GPU"
            hb["datasets"] = {"loc-data@1": size} if n == cached_on else {}
            assert hub.nsml("PUT", f"nodes/{n}/heartbeat", admin, json=hb).status_code == 200
        placed = place(alice, f"loc-{cached_on}", ["loc-data"], gpus=1, gpu_models=["XDS-Loc-GPU"])
        try:
            assert placed["allocation"]["node"] == cached_on, placed
        finally:
            alice.api("DELETE", f"placements/{placed['id']}")

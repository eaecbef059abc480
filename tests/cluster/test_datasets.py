"""Datasets across nodes: data-local placement, versions fetched by the chosen node's agent
with hash checks, and eviction that stays on its own node."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from tests.cluster.testbed import Testbed
from tests.integration.conftest import wait_for
from tests.integration.test_datasets import User, tree, user

MIB = 1 << 20


@pytest.fixture()
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nsml-cl-ds-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def one_file(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.bin").write_bytes(os.urandom(size))
    return folder


def place(u: User, holder: str, datasets: list[str], gpus: float = 1) -> dict[str, Any]:
    r = u.api(
        "POST",
        "placements",
        json={
            "holder": holder,
            "gpus": gpus,
            "cpu": 0.1,
            "memory": "64M",
            "datasets": datasets,
            "wait_s": 20,
        },
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def mounted(u: User, pid: int) -> dict[str, Any]:
    """The placement's dataset mounts once its node has them (agents fetch them)."""
    r = u.api("POST", f"placements/{pid}/mounts", params={"wait_s": 60})
    assert r.status_code == 200, r.text
    return dict(r.json())


def release(u: User, pid: int) -> None:
    assert u.api("DELETE", f"placements/{pid}").status_code == 200


def cache_on(tb: Testbed, node: str) -> Path:
    return tb.agents[node].cache_dir


def cached_keys(tb: Testbed, node: str) -> set[str]:
    """What *node*'s agent holds, from its own cache index on disk."""
    index = cache_on(tb, node) / "index.json"
    if not index.exists():
        return set()
    return set(json.loads(index.read_text())["entries"])


def reported(tb: Testbed, node: str) -> dict[str, int]:
    return dict(tb.node(node)["datasets"])


def cache_only_on(tb: Testbed, u: User, node: str, ref: str) -> None:
    """Have *node* (only) cache *ref*: a placement pinned there by draining the others."""
    with tb.only(node):
        p = place(u, f"warm-{node}-{ref}", [ref])
    assert p["allocation"]["node"] == node
    try:
        mounted(u, p["id"])
    finally:
        release(u, p["id"])
    wait_for(
        lambda: ref in reported(tb, node),
        timeout=30,
        what=f"{node} reports {ref} cached",
    )


def test_the_next_session_asking_for_a_dataset_goes_to_the_node_that_caches_it(
    testbed: Testbed, work: Path
) -> None:
    tb = testbed
    alice = user(tb.hub, "cl-ds-local")
    alice.nsml("dataset", "push", "cl-near", str(one_file(work / "near", 2 * MIB)))
    alice.nsml("dataset", "push", "cl-far", str(one_file(work / "far", 2 * MIB)))
    cache_only_on(tb, alice, "node-b", "cl-near@1")
    cache_only_on(tb, alice, "node-c", "cl-far@1")
    for node in tb.nodes:  # equal fragmentation: every GPU of every node is free
        assert all(g["allocated_milli"] == 0 for g in tb.node(node)["gpus"]), node
    assert [n for n in tb.nodes if "cl-near@1" in reported(tb, n)] == ["node-b"]
    assert [n for n in tb.nodes if "cl-far@1" in reported(tb, n)] == ["node-c"]

    for ref, where in (("cl-near", "node-b"), ("cl-far", "node-c")):
        p = place(alice, f"loc-{ref}", [ref])
        try:
            assert p["allocation"]["node"] == where, p
        finally:
            release(alice, p["id"])


def test_a_second_version_is_fetched_by_the_chosen_node_s_agent_with_hash_checks(
    testbed: Testbed, work: Path
) -> None:
    tb = testbed
    alice = user(tb.hub, "cl-ds-versions")
    folder = one_file(work / "v", MIB)
    assert alice.nsml("dataset", "push", "cl-ver", str(folder)).stdout.strip() == "cl-ver@1"
    cache_only_on(tb, alice, "node-b", "cl-ver@1")
    (folder / "more.txt").write_text("second version\n")
    assert alice.nsml("dataset", "push", "cl-ver", str(folder)).stdout.strip() == "cl-ver@2"

    with tb.only("node-c"):
        p = place(alice, "ver-2", ["cl-ver"])
    try:
        assert p["allocation"]["node"] == "node-c"
        (m,) = mounted(alice, p["id"])["mounts"]
        assert m["ref"] == "cl-ver@2"
        path = Path(m["host_path"])
        assert path.is_relative_to(cache_on(tb, "node-c")), (path, cache_on(tb, "node-c"))
        assert tree(path) == tree(folder)
        # The agent checked every blob against the version's manifest, which it keeps.
        manifest = json.loads((path.parent / "manifest.json").read_text())
        assert sorted(e["path"] for e in manifest["entries"]) == ["data.bin", "more.txt"]
        for e in manifest["entries"]:
            assert blake3.blake3((path / e["path"]).read_bytes()).hexdigest() == e["blake3"]
    finally:
        release(alice, p["id"])
    # Each node has what was fetched there, and nothing else.
    assert "cl-ver@2" in cached_keys(tb, "node-c") and "cl-ver@1" not in cached_keys(tb, "node-c")
    assert "cl-ver@1" in cached_keys(tb, "node-b") and "cl-ver@2" not in cached_keys(tb, "node-b")


def test_eviction_on_one_node_does_not_touch_the_others(testbed: Testbed, work: Path) -> None:
    tb = testbed
    alice = user(tb.hub, "cl-ds-evict")
    for name in ("cl-ev1", "cl-ev2"):
        alice.nsml("dataset", "push", name, str(one_file(work / name, 3 * MIB)))
    cache_only_on(tb, alice, "node-b", "cl-ev1@1")
    before_b = tree(cache_on(tb, "node-b") / "entries" / "cl-ev1@1" / "data")
    agent = tb.agents["node-c"]
    budget = agent.cache_bytes
    agent.stop()
    agent.cache_bytes = sum(len(b) for b, _ in before_b.values()) + MIB  # room for one of them
    agent.start()
    try:
        cache_only_on(tb, alice, "node-c", "cl-ev1@1")
        cache_only_on(tb, alice, "node-c", "cl-ev2@1")  # evicts cl-ev1@1 on node C
        assert "cl-ev1@1" not in cached_keys(tb, "node-c")
        assert "cl-ev2@1" in cached_keys(tb, "node-c")
        wait_for(
            lambda: "cl-ev1@1" not in reported(tb, "node-c"),
            timeout=30,
            what="node-c reports the eviction",
        )
        # Node B keeps its copy, byte for byte, and still reports it.
        assert "cl-ev1@1" in cached_keys(tb, "node-b")
        assert tree(cache_on(tb, "node-b") / "entries" / "cl-ev1@1" / "data") == before_b
        assert "cl-ev1@1" in reported(tb, "node-b")
    finally:
        agent.stop()
        agent.cache_bytes = budget
        agent.start()
        tb.wait_nodes_up(["node-c"])

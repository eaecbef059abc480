"""The multi-node test bed, started once per test session (see ``tests/cluster/testbed.py``).

Three nodes: ``node-a`` (the default Docker engine, the hub's own node), ``node-b`` and
``node-c`` (Docker engines of their own, reached over TCP+TLS, each with an ``nsml-agent``),
a real PostgreSQL and a real hub. Torn down at the end of the session, also after failures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.testbed import Testbed, TestbedUnavailable, cluster, why_unavailable

#: nodes of the session's test bed
ENGINES = 3
GPUS_PER_NODE = 4
GPU_MODEL = "TB-V100"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder runs on the test bed: mark it ``cluster`` (and what it uses)."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            for mark in ("cluster", "hub", "db", "docker"):
                item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture(scope="session")
def testbed(singleuser_image: str, postgres_url: str, docker_client: Any) -> Iterator[Testbed]:
    """The session's cluster: three nodes, PostgreSQL, a hub; torn down even on failure."""
    from tests.conftest import service_missing

    why = why_unavailable()
    if why:
        service_missing("cluster", why)
    try:
        cm = cluster(
            ENGINES,
            image=singleuser_image,
            db_url=postgres_url,
            gpus_per_node=GPUS_PER_NODE,
            gpu_model=GPU_MODEL,
            # node loss is lostnode's part; here a node is down only when a test says so
            server_args=["--NSMLServer.node_timeout=60"],
        )
        tb = cm.__enter__()
    except TestbedUnavailable as e:
        service_missing("cluster", str(e))
        raise
    try:
        yield tb
    finally:
        cm.__exit__(None, None, None)

"""Two NSML servers on one PostgreSQL: no GPU given twice under load, and a warm standby that
takes over scheduling when the leader is killed."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.integration.hubproc import HubProcess, ServerProcess, virtual_node_heartbeat

pytestmark = [pytest.mark.hub, pytest.mark.db, pytest.mark.docker]

NODES = 6
GPUS_PER_NODE = 8


def fresh_database(postgres_url: str, name: str) -> str:
    admin = create_engine(
        postgres_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


def heartbeat(name: str) -> dict[str, Any]:
    return virtual_node_heartbeat(name, gpus=GPUS_PER_NODE)


@pytest.fixture()
def servers(hub: HubProcess, postgres_url: str) -> Iterator[list[ServerProcess]]:
    db_url = fresh_database(postgres_url, f"nsml_standby_{os.getpid()}")
    procs = [
        ServerProcess(hub, db_url, name, args=["--NSMLServer.node_timeout=3600"])
        for name in ("server-a", "server-b")
    ]
    try:
        for p in procs:
            p.start()
        admin = hub.user_token("admin")
        for i in range(NODES):
            r = requests.put(
                f"{procs[0].api}/nodes/n{i}/heartbeat",
                json=heartbeat(f"n{i}"),
                headers={"Authorization": f"token {admin}"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
        yield procs
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            if p.log_path.exists() and os.environ.get("NSML_TEST_SHOW_LOGS"):
                print(p.log_path.read_text()[-5000:])


def ledger_is_consistent(db_url: str) -> dict[str, int]:
    """Every GPU's counter equals what its active allocations hold, and never exceeds 1000.

    Read in one snapshot (REPEATABLE READ): the leader may commit placements meanwhile, and
    separate statements would see counters and allocations from different moments.
    """
    engine = create_engine(db_url, isolation_level="REPEATABLE READ", poolclass=NullPool)
    held: dict[tuple[int, int], int] = {}
    with engine.connect() as conn, conn.begin():
        holders = conn.execute(
            text(
                "SELECT holder, count(*) FROM allocations WHERE state = 'active' "
                "GROUP BY holder HAVING count(*) > 1"
            )
        ).all()
        assert holders == [], f"holders with two active allocations: {holders}"
        for node_id, indices, milli in conn.execute(
            text(
                "SELECT node_id, gpu_indices, gpu_milli_per_gpu FROM allocations "
                "WHERE state = 'active'"
            )
        ):
            for i in json.loads(indices) if isinstance(indices, str) else indices:
                held[(node_id, i)] = held.get((node_id, i), 0) + milli
        over = {k: v for k, v in held.items() if v > 1000}
        assert over == {}, f"over-allocated GPUs: {over}"
        for node_id, index, allocated in conn.execute(
            text('SELECT node_id, "index", allocated_milli FROM gpus')
        ):
            assert allocated == held.get((node_id, index), 0), (node_id, index)
        states = dict(
            conn.execute(
                text("SELECT state, count(*) FROM placement_requests GROUP BY state")
            ).all()
        )
    engine.dispose()
    return states


def test_200_requests_against_two_servers_never_over_allocate(
    hub: HubProcess, servers: list[ServerProcess]
) -> None:
    users = [f"load-{i}" for i in range(20)]
    tokens = {u: hub.user_token(u) for u in users}
    rng = random.Random(7)
    shapes = [0.25, 0.5, 1, 1, 1, 2, 4]

    def one(i: int) -> tuple[int, dict[str, Any]]:
        user = users[i % len(users)]
        server = servers[i % 2]
        body = {
            "holder": f"job-{i}",
            "gpus": rng.choice(shapes),
            "cpu": 1,
            "memory": "4G",
            "wait_s": 3,
        }
        r = requests.post(
            f"{server.api}/placements",
            json=body,
            headers={"Authorization": f"token {tokens[user]}"},
            timeout=60,
        )
        return r.status_code, r.json()

    with cf.ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(one, range(200)))
    codes = [c for c, _ in answers]
    assert all(c in (200, 201, 202) for c in codes), sorted(set(codes))
    placed = [a for c, a in answers if a["state"] == "placed"]
    waiting = [a for c, a in answers if a["state"] == "waiting"]
    assert len(placed) + len(waiting) == 200
    assert placed, "some requests must fit"
    states = ledger_is_consistent(servers[0].db_url)
    assert states.get("placed", 0) == len(placed)

    # Release everything placed: the waiting requests get their turn, still never over capacity.
    for a in placed:
        requests.delete(
            f"{servers[0].api}/placements/{a['id']}",
            headers={"Authorization": f"token {tokens[a['user']]}"},
            timeout=30,
        )
    # Wait until the waiting requests that now fit are placed (the count stops changing).
    deadline, last, stable_since = time.monotonic() + 60, -1, time.monotonic()
    while time.monotonic() < deadline:
        states = ledger_is_consistent(servers[0].db_url)
        if states.get("placed", 0) != last:
            last, stable_since = states.get("placed", 0), time.monotonic()
        elif last > 0 and time.monotonic() - stable_since > 1.5:
            break
        time.sleep(0.25)
    assert states.get("placed", 0) > 0, states
    assert states.get("released", 0) == len(placed)


def test_the_standby_takes_over_within_5_seconds_of_a_sigkill(
    hub: HubProcess, servers: list[ServerProcess]
) -> None:
    leader = next(p for p in servers if p.health()["leader"])
    standby = next(p for p in servers if p is not leader)
    token = hub.user_token("failover")
    headers = {"Authorization": f"token {token}"}
    stop = threading.Event()
    answers: list[dict[str, Any]] = []

    def load() -> None:
        i = 0
        while not stop.is_set() and i < 400:
            i += 1
            try:
                r = requests.post(
                    f"{standby.api}/placements",
                    headers=headers,
                    timeout=30,
                    json={
                        "holder": f"f-{i}",
                        "gpus": 0.25,
                        "cpu": 0.1,
                        "memory": "64M",
                        "wait_s": 10,
                    },
                )
                answers.append(r.json())
            except requests.RequestException as e:  # pragma: no cover - reported below
                answers.append({"error": repr(e)})
            time.sleep(0.02)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(1.5)
    killed_at = time.monotonic()
    leader.kill()  # SIGKILL: no resignation, the lease must lapse
    # The next request after the kill is placed by the standby.
    r = requests.post(
        f"{standby.api}/placements",
        headers=headers,
        timeout=30,
        json={"holder": "after-kill", "gpus": 1, "cpu": 0.1, "memory": "64M", "wait_s": 10},
    )
    takeover = time.monotonic() - killed_at
    stop.set()
    t.join(60)
    assert r.status_code == 201, r.text
    assert standby.health()["leader"] is True
    print(f"\ntakeover: next request placed {takeover:.2f} s after SIGKILL of the leader")
    assert takeover < 5.0
    assert not [a for a in answers if "error" in a], answers[:3]
    # Nothing lost: every request is placed; nothing duplicated: the ledger is consistent.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        states = ledger_is_consistent(standby.db_url)
        if states.get("waiting", 0) == 0:
            break
        time.sleep(0.5)
    assert states.get("waiting", 0) == 0, states
    assert states.get("failed", 0) == 0, states

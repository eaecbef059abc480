"""Node loss, as a specification: when a silent node's work is given up, what becomes of a
lost session, which containers the orphan sweep removes, and the fence that keeps released
GPUs from new work until the sweep ran."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from nsml_server import ledger, nodes
from nsml_server.db import Database, check_schema
from nsml_server.models import Allocation, Gpu, Node
from nsml_server.node_loss import (
    LABEL_ALLOCATION,
    LABEL_ATTEMPT,
    LABEL_SESSION_ID,
    SessionView,
    Verdict,
    node_verdict,
    orphan_reason,
    plan_lost_session,
    release_lost_allocations,
)
from nsml_server.scheduler import SnapshotCache
from nsml_server.schemas import Heartbeat

T0 = datetime(2026, 1, 1, 12, 0, 0)
TIMEOUT, GRACE = 45.0, 60.0


@pytest.mark.parametrize(
    ("silent_s", "verdict"),
    [
        (0, Verdict.ALIVE),
        (44.9, Verdict.ALIVE),
        (45, Verdict.LATE),  # down: no new work, but its work is still its own
        (104.9, Verdict.LATE),
        (105, Verdict.GONE),  # timeout + grace: unconfirmed work is given up
        (10_000, Verdict.GONE),
    ],
    ids=lambda v: str(v),
)
def test_a_node_is_late_after_the_timeout_and_gone_after_the_grace(
    silent_s: float, verdict: Verdict
) -> None:
    hb = T0 - timedelta(seconds=silent_s)
    assert node_verdict(hb, T0, TIMEOUT, GRACE) is verdict


def test_a_node_never_heard_from_is_gone() -> None:
    assert node_verdict(None, T0, TIMEOUT, GRACE) is Verdict.GONE


def test_with_no_grace_a_node_is_gone_as_soon_as_it_is_down() -> None:
    assert node_verdict(T0 - timedelta(seconds=45), T0, TIMEOUT, 0) is Verdict.GONE


CAUSE = "node node-b lost (no heartbeat)"


@pytest.mark.parametrize(
    ("case", "kw", "requeue", "attempt", "load_from", "event"),
    [
        (
            "not asked to restart: lost",
            {"restart_on_lost": False, "attempt": 1, "last_checkpoint": "7"},
            False,
            1,
            None,
            "node node-b lost (no heartbeat); session lost",
        ),
        (
            "asked: requeued as the next attempt from its last checkpoint",
            {"restart_on_lost": True, "attempt": 1, "last_checkpoint": "7"},
            True,
            2,
            "u/mnist/3/7",
            "node node-b lost (no heartbeat); session requeued as attempt 2 from checkpoint 7",
        ),
        (
            "asked, no checkpoint saved: it loads what the attempt loaded (a fork's parent)",
            {"restart_on_lost": True, "attempt": 2, "load_from": "u/mnist/1/best"},
            True,
            3,
            "u/mnist/1/best",
            "node node-b lost (no heartbeat); session requeued as attempt 3 loading u/mnist/1/best",
        ),
        (
            "asked, nothing to load: it starts over",
            {"restart_on_lost": True, "attempt": 1},
            True,
            2,
            None,
            "node node-b lost (no heartbeat); session requeued as attempt 2 from the start "
            "(it saved no checkpoint)",
        ),
        (
            "asked, but at the attempt limit: lost",
            {"restart_on_lost": True, "attempt": 3, "last_checkpoint": "7"},
            False,
            3,
            None,
            "node node-b lost (no heartbeat); session lost",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_a_lost_session_is_requeued_only_when_asked_and_within_the_limit(
    case: str,
    kw: dict[str, object],
    requeue: bool,
    attempt: int,
    load_from: str | None,
    event: str,
) -> None:
    args: dict[str, object] = {"last_checkpoint": None, "load_from": None, **kw}
    plan = plan_lost_session(name="u/mnist/3", cause=CAUSE, max_attempts=3, **args)  # type: ignore[arg-type]
    assert (plan.requeue, plan.attempt, plan.event) == (requeue, attempt, event)
    if requeue:
        assert plan.load_from == load_from
    else:
        assert plan.message.startswith("Node node-b lost (no heartbeat); the session's outcome")
        assert plan.message.endswith("nsml resume u/mnist/3")
        assert ("3 attempts, the limit" in plan.message) == bool(kw["restart_on_lost"])


def labels(sid: int, attempt: int) -> dict[str, str]:
    return {LABEL_SESSION_ID: str(sid), LABEL_ATTEMPT: str(attempt)}


RUNNING = SessionView("running", 2, "node-b", "c-current")


@pytest.mark.parametrize(
    ("case", "container_labels", "cid", "sessions", "allocs", "why"),
    [
        ("the running session's container", labels(1, 2), "c-current", {1: RUNNING}, {}, None),
        (
            "a container of a session starting there now",
            labels(1, 2),
            "c-new",
            {1: SessionView("preparing", 2, "node-b", None)},
            {},
            None,
        ),
        ("a deleted session's", labels(9, 1), "c", {}, {}, "its session was deleted"),
        (
            "a lost session's",
            labels(1, 2),
            "c",
            {1: SessionView("lost", 2, "node-b", None)},
            {},
            "its session is lost",
        ),
        (
            "an earlier attempt's (requeued elsewhere)",
            labels(1, 1),
            "c-old",
            {1: RUNNING},
            {},
            "its session moved on to attempt 2",
        ),
        (
            "the same attempt, now on another node",
            labels(1, 2),
            "c",
            {1: SessionView("running", 2, "node-a", "c-a")},
            {},
            "its session runs on node-a",
        ),
        (
            "a second container of the running attempt",
            labels(1, 2),
            "c-other",
            {1: RUNNING},
            {},
            "its session follows another container",
        ),
        (
            "a notebook server's, allocation active",
            {LABEL_ALLOCATION: "5"},
            "n",
            {},
            {5: "node-b"},
            None,
        ),
        (
            "a notebook server's, allocation released",
            {LABEL_ALLOCATION: "5"},
            "n",
            {},
            {},
            "its allocation was released",
        ),
        ("a container without the platform's ids", {"other": "x"}, "x", {}, {}, None),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_the_sweep_removes_only_containers_of_work_the_platform_no_longer_runs_there(
    case: str,
    container_labels: dict[str, str],
    cid: str,
    sessions: dict[int, SessionView],
    allocs: dict[int, str],
    why: str | None,
) -> None:
    assert orphan_reason(container_labels, cid, "node-b", sessions, allocs) == why


# ---- the fence, on a real database -----------------------------------------------------------


def heartbeat() -> Heartbeat:
    return Heartbeat.model_validate(
        {
            "backend": "docker",
            "docker_url": "tcp://node:2376",
            "cpu_milli": 8000,
            "memory_mib": 16384,
            "gpu_probe": {"kind": "virtual", "enabled": True},
            "gpus": [
                {"index": i, "uuid": f"GPU-{i}", "model": "V100", "memory_total_mib": 16384}
                for i in range(2)
            ],
        }
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'nsml.sqlite'}"
    database = Database(url)
    check_schema(database.engine, url)
    with database.session() as s:
        nodes.apply_heartbeat(s, "node-b", heartbeat(), T0)
    yield database
    database.dispose()


def reserve(db: Database, holder: str) -> int:
    with db.session() as s:
        return ledger.reserve(
            s,
            holder=holder,
            user_name="alice",
            node_name="node-b",
            gpu_indices=[0],
            gpu_milli_per_gpu=1000,
            cpu_milli=1000,
            memory_mib=1024,
            now=T0,
        ).id


class Releases:
    """Stands in for the scheduler: these allocations have no placement request, so the
    ledger releases them and the scheduler is never asked."""

    def release(self, s: object, row: object) -> bool:  # pragma: no cover - no requests here
        raise AssertionError("allocations made without a request are released by the ledger")


def gpu0(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(Gpu.allocated_milli).where(Gpu.index == 0)) or 0)


def test_a_gone_nodes_notebook_allocation_is_released_once_and_the_node_fenced(
    db: Database,
) -> None:
    aid = reserve(db, "alice:notebook")
    with db.session() as s:
        nodes.mark_silent_nodes_down(s, T0 + timedelta(seconds=50), timedelta(seconds=TIMEOUT))
        late = release_lost_allocations(s, Releases(), T0 + timedelta(seconds=50), TIMEOUT, GRACE)
    assert late == [] and gpu0(db) == 1000, "a late node keeps its work"
    for _ in range(2):  # the check runs again and again: released once
        with db.session() as s:
            gone = release_lost_allocations(
                s, Releases(), T0 + timedelta(seconds=106), TIMEOUT, GRACE
            )
        assert gone in (["alice:notebook"], [])
    assert gpu0(db) == 0, "the GPU went back once (a CHECK forbids below zero)"
    with db.session() as s:
        alloc = s.get(Allocation, aid)
        assert alloc is not None and alloc.state == "released"
        node = s.scalar(select(Node).where(Node.name == "node-b"))
        assert node is not None and node.needs_sweep


def test_session_allocations_are_left_to_the_runner(db: Database) -> None:
    reserve(db, "alice:session/mnist/1")
    with db.session() as s:
        nodes.mark_silent_nodes_down(s, T0 + timedelta(seconds=200), timedelta(seconds=TIMEOUT))
        assert (
            release_lost_allocations(s, Releases(), T0 + timedelta(seconds=200), TIMEOUT, 0) == []
        )
    assert gpu0(db) == 1000


def test_a_fenced_node_that_is_back_up_gets_nothing_until_swept(db: Database) -> None:
    aid = reserve(db, "alice:notebook")
    with db.session() as s:
        nodes.mark_silent_nodes_down(s, T0 + timedelta(seconds=50), timedelta(seconds=TIMEOUT))
    with db.session() as s:
        assert ledger.release(s, aid, T0 + timedelta(seconds=51))
    with db.session() as s:  # released while down: fenced, whoever released it
        nodes.apply_heartbeat(s, "node-b", heartbeat(), T0 + timedelta(seconds=60))
    with db.session() as s:
        node = s.scalar(select(Node).where(Node.name == "node-b"))
        assert node is not None and node.state == "up" and node.needs_sweep
        snap = SnapshotCache().build(s)
        assert snap.nodes[0].state.value == "down", "the scheduler sees it unavailable"
    with pytest.raises(ledger.Conflict):
        reserve(db, "bob:notebook")
    with db.session() as s:
        s.execute(Node.__table__.update().values(needs_sweep=False))  # what the sweep does
    assert reserve(db, "bob:notebook") > 0


def test_releasing_on_an_up_node_does_not_fence_it(db: Database) -> None:
    aid = reserve(db, "alice:notebook")
    with db.session() as s:
        assert ledger.release(s, aid, T0)
        node = s.scalar(select(Node).where(Node.name == "node-b"))
        assert node is not None and not node.needs_sweep


# ---- what users and the hub see --------------------------------------------------------------


def test_nsml_run_and_the_magic_take_restart_on_lost() -> None:
    from nsml.cli import build_parser

    args = build_parser().parse_args(["run", "--restart-on-lost", "--gpus", "1", "train.py"])
    assert args.restart_on_lost is True and args.script == "train.py"
    assert build_parser().parse_args(["run", "train.py"]).restart_on_lost is False


def test_status_says_the_attempt_and_what_it_loads() -> None:
    from nsml.cli_session import status_text
    from tests.unit.test_cli_messages import status

    text = status_text(
        status(state="running", attempt=2, restart_on_lost=True, load_from="alice/_/1/7")
    )
    assert "attempt   2 (requeued if its node is lost), loading alice/_/1/7" in text
    assert "attempt" not in status_text(status())


def test_a_notebook_server_lost_with_its_node_says_so_and_survives_a_hub_restart() -> None:
    from nsml_spawner.spec import LastExit, node_lost_exit

    ended = node_lost_exit("node-b", "no heartbeat for 50s")
    assert ended.reason == "node_lost" and ended.exit_code != 0
    assert "node node-b was lost (no heartbeat for 50s)" in ended.message
    assert "Start it again" in ended.message
    assert LastExit.from_state(ended.to_state()) == ended


def test_evaluation_allocations_are_left_to_their_runner(db: Database) -> None:
    reserve(db, "alice:evaluation/12")
    with db.session() as s:
        nodes.mark_silent_nodes_down(s, T0 + timedelta(seconds=200), timedelta(seconds=TIMEOUT))
        assert (
            release_lost_allocations(s, Releases(), T0 + timedelta(seconds=200), TIMEOUT, 0) == []
        )
    assert gpu0(db) == 1000

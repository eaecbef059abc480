"""The service's live event stream: what each caller may see, in order, resumable.

A real SQLite database with the server's schema; the broker's reading task runs on a real
event loop, as in the server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from nsml_server.db import Database, check_schema
from nsml_server.events import EventBroker, StreamEvent, Subscriber, add_notice, sse_frame
from nsml_server.models import Dataset, Submission, TrainingSession
from nsml_server.sessions import add_event, create_session

NOW = datetime(2026, 12, 1, 12, 0, 0)


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    check_schema(database.engine, database.url, auto_upgrade=True)
    try:
        yield database
    finally:
        database.dispose()


def new_session(db: Database, user: str) -> int:
    with db.session() as s:
        row = create_session(
            s,
            user=user,
            datasets=[],
            values={
                "code_digest": "0" * 64,
                "entry": "t.py",
                "image": "i",
                "resources": {"gpus": 2},
            },
            now=NOW,
        )
        add_event(s, row, "state", "queued", NOW, state="queued")
        s.commit()
        return row.id


def change(db: Database, sid: int, state: str, message: str, exit_code: int | None = None) -> None:
    with db.session() as s:
        row = s.get(TrainingSession, sid)
        assert row is not None
        row.state = state
        row.exit_code = exit_code
        add_event(s, row, "state", message, NOW, state=state)
        s.commit()


def run(test: Callable[[EventBroker], Awaitable[None]], db: Database) -> None:
    async def main() -> None:
        await test(EventBroker(db, lambda: NOW, poll_interval_s=0.01))

    asyncio.run(main())


async def take(sub: Subscriber, n: int) -> list[StreamEvent]:
    out = []
    for _ in range(n):
        ev = await asyncio.wait_for(sub.get(), 20)
        assert ev is not None, f"the stream ended after {out}"
        out.append(ev)
    return out


def test_each_user_gets_only_their_own_sessions_events_with_the_session_state_now(
    db: Database,
) -> None:
    a, b = new_session(db, "alice"), new_session(db, "bob")

    async def test(broker: EventBroker) -> None:
        alice = await broker.subscribe("alice")
        bob = await broker.subscribe("bob")
        admin_all = await broker.subscribe("root", everyone=True)
        change(db, b, "running", "running on node-a")
        change(db, a, "failed", "exit code 3", exit_code=3)
        [ev] = await take(alice, 1)
        assert ev.type == "session" and ev.user == "alice"
        assert ev.data["session"] == "alice/_/1" and ev.data["state"] == "failed"
        now = ev.data["now"]
        assert now["state"] == "failed" and now["exit_code"] == 3 and now["gpus"] == 2.0
        [evb] = await take(bob, 1)
        assert evb.data["state"] == "running" and evb.id is not None and evb.id < (ev.id or 0)
        assert [e.data["session"] for e in await take(admin_all, 2)] == [
            "bob/_/1",
            "alice/_/1",
        ]
        assert alice.queue.empty() and bob.queue.empty()
        for sub in (alice, bob, admin_all):
            broker.unsubscribe(sub)

    run(test, db)


def test_a_team_sessions_events_reach_the_teams_members_live_and_on_replay(db: Database) -> None:
    shared, own = new_session(db, "carl"), new_session(db, "carl")
    with db.session() as s:
        row = s.get(TrainingSession, shared)
        assert row is not None
        row.visibility, row.team = "team", "vision"
        s.commit()

    async def test(broker: EventBroker) -> None:
        member = await broker.subscribe("dora", teams=frozenset({"vision", "nlp"}))
        outsider = await broker.subscribe("emil", teams=frozenset({"nlp"}))
        change(db, own, "running", "carl's own session: not the team's")
        change(db, shared, "running", "the team session runs")
        [ev] = await take(member, 1)
        assert (ev.data["session"], ev.data["state"], ev.team) == ("carl/_/1", "running", "vision")
        assert member.queue.empty() and outsider.queue.empty()
        until = broker.last_event_id
        replayed = broker.replay("dora", False, 0, until, frozenset({"vision"}))
        assert {e.data["session"] for e in replayed} == {"carl/_/1"}, replayed
        assert broker.replay("emil", False, 0, until, frozenset({"nlp"})) == []
        for sub in (member, outsider):
            broker.unsubscribe(sub)

    run(test, db)


def test_a_reconnecting_client_replays_what_it_missed_and_only_its_own(db: Database) -> None:
    a, b = new_session(db, "alice"), new_session(db, "bob")  # event ids 1, 2
    change(db, a, "running", "running")  # 3
    change(db, b, "running", "running")  # 4
    change(db, a, "completed", "done", exit_code=0)  # 5
    broker = EventBroker(db, lambda: NOW)
    got = broker.replay("alice", False, 1, 5)
    assert [e.id for e in got] == [3, 5]
    assert [e.data["state"] for e in got] == ["running", "completed"]
    assert all(e.data["now"]["state"] == "completed" for e in got)
    assert [e.id for e in broker.replay("root", True, 0, 4)] == [1, 2, 3, 4]
    assert broker.replay("alice", False, 5, 5) == []


def test_the_frame_is_one_event_of_text_event_stream() -> None:
    text = sse_frame(StreamEvent("session", "u", {"a": "x\ny"}, 7))
    assert text == 'id: 7\nevent: session\ndata: {"a":"x\\ny"}\n\n'
    assert sse_frame(StreamEvent("credit", "u", {})) == "event: credit\ndata: {}\n\n"


def test_submission_changes_reach_their_owner(db: Database) -> None:
    sid = new_session(db, "alice")
    with db.session() as s:
        ds = Dataset(name="mnist", owner="alice", created=NOW)
        s.add(ds)
        s.flush()
        sub = Submission(
            dataset_id=ds.id,
            dataset_ref="mnist@1",
            test_digest="0" * 64,
            user_name="alice",
            session_id=sid,
            session_name="alice/_/1",
            checkpoint="c1",
            checkpoint_sha256="0" * 64,
            code_digest="0" * 64,
            entry="t.py",
            image="i",
            submitted=NOW,
        )
        s.add(sub)
        s.commit()
        sub_id = sub.id

    def move(state: str, score: float | None = None) -> None:
        with db.session() as s:
            row = s.get(Submission, sub_id)
            assert row is not None
            row.state, row.public_score, row.private_score = state, score, 0.5
            s.commit()

    async def test(broker: EventBroker) -> None:
        alice = await broker.subscribe("alice")  # the queued submission is known from here
        bob = await broker.subscribe("bob")
        move("running")
        [ev] = await take(alice, 1)
        assert ev.type == "submission" and ev.data["state"] == "running" and ev.id is None
        move("scored", 0.93)
        [ev] = await take(alice, 1)
        assert ev.data["state"] == "scored" and ev.data["score"] == 0.93
        assert "private_score" not in json.dumps(ev.data)
        assert bob.queue.empty()
        broker.unsubscribe(alice)
        broker.unsubscribe(bob)

    run(test, db)


def test_credit_changes_written_to_the_ledger_reach_their_user_only(db: Database) -> None:
    from nsml_server.credits import grant

    async def test(broker: EventBroker) -> None:
        alice = await broker.subscribe("alice")
        bob = await broker.subscribe("bob")
        with db.session() as s:  # as any server writes them (an admin's grant, a charge)
            grant(s, "alice", 50_000, "opening", "admin", NOW)
            grant(s, "alice", -8_500, "course fee", "admin", NOW)
            s.commit()
        [ev] = await take(alice, 1)
        assert ev.type == "credit"
        assert ev.data["balance"] == 41.5 and ev.data["change"] == 41.5
        assert ev.data["reason"] == "course fee" and ev.data["user"] == "alice"
        with db.session() as s:
            grant(s, "alice", 500, "refund", "admin", NOW)
            s.commit()
        [ev] = await take(alice, 1)
        assert ev.data["balance"] == 42.0 and ev.data["change"] == 0.5
        assert bob.queue.empty()
        broker.unsubscribe(alice)
        broker.unsubscribe(bob)

    run(test, db)


def test_a_notice_reaches_its_user_only_as_one_frame_from_every_server_process(
    db: Database,
) -> None:
    """A notice written by one process (the billing leader) reaches the user's streams on
    every process: here two brokers, as two server processes have, on one database."""

    async def test(broker: EventBroker) -> None:
        other = EventBroker(db, lambda: NOW, poll_interval_s=0.01)  # another process's
        alice = await broker.subscribe("alice")
        bob = await broker.subscribe("bob")
        alice_there = await other.subscribe("alice")
        with db.session() as s:
            add_notice(s, "alice", "notebook server stopping: out of credits", "in 120 s", NOW)
        for sub in (alice, alice_there):
            [ev] = await take(sub, 1)
            frame = sse_frame(ev)
            assert frame.startswith("event: notice\ndata: {") and frame.endswith("}\n\n"), frame
            assert ev.data["subject"] == "notebook server stopping: out of credits"
            assert (ev.data["message"], ev.data["level"]) == ("in 120 s", "warning")
            assert ev.data["at"].startswith("2026-12-01T12:00:00"), ev.data
        assert bob.queue.empty()
        for b, sub in ((broker, alice), (broker, bob), (other, alice_there)):
            b.unsubscribe(sub)

    run(test, db)


def test_a_subscriber_that_falls_behind_is_cut_off_not_buffered_forever() -> None:
    async def main() -> None:
        sub = Subscriber("alice", False, queue_max=3)
        for i in range(10):
            sub.offer(StreamEvent("session", "alice", {}, i))
        assert sub.overflowed and sub.closed
        got = []
        while (ev := await sub.get()) is not None:
            got.append(ev.id)
        assert got == [0, 1, 2]

    asyncio.run(main())


def test_the_reading_task_stops_when_the_last_subscriber_leaves(db: Database) -> None:
    async def test(broker: EventBroker) -> None:
        sub = await broker.subscribe("alice")
        task = broker._task
        assert task is not None and not task.done()
        broker.unsubscribe(sub)
        await asyncio.wait_for(task, 20)
        assert broker.subscribers == set()

    run(test, db)

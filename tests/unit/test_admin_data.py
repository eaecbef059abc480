"""The admin panel's database side: what it changes writes an audit row in the same
transaction; what it reads for the charts and the sessions page. SQLite, migrated."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from gpu_scheduler.agent import collect_heartbeat
from gpu_scheduler.probe import VirtualProbe
from nsml_server import audit, nodes
from nsml_server.admin import data
from nsml_server.admin.handlers import policy_values
from nsml_server.db import Database, check_schema
from nsml_server.models import SessionEvent, SessionGpuUse
from nsml_server.schemas import Heartbeat
from nsml_server.sessions import create_session

T0 = datetime(2026, 12, 1, 12, 0)


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    check_schema(d.engine, d.url, auto_upgrade=True)
    with d.session() as s:
        hb = Heartbeat.model_validate(
            collect_heartbeat(VirtualProbe(2), backend="local", docker_url=None, images=[])
        )
        nodes.apply_heartbeat(s, "node-a", hb, T0)
    yield d
    d.dispose()


def audit_rows(db: Database) -> list[tuple[str, str, str, dict[str, object]]]:
    with db.session() as s:
        return [
            (e.actor, e.action, e.target, audit.detail_of(e)) for e in reversed(audit.recent(s))
        ]


def test_draining_and_undraining_a_node_are_audited(db: Database) -> None:
    with db.session() as s:
        data.set_node_state(s, "node-a", "draining", "root", T0)
    with db.session() as s:
        assert nodes.get_node(s, "node-a").state == "draining"  # type: ignore[union-attr]
        data.set_node_state(s, "node-a", "up", "root", T0 + timedelta(seconds=5))
    assert audit_rows(db) == [
        ("root", "node.state", "node:node-a", {"before": "up", "after": "draining"}),
        ("root", "node.state", "node:node-a", {"before": "draining", "after": "up"}),
    ]


@pytest.mark.parametrize(
    ("name", "state", "says", "status"),
    [
        ("node-a", "sleeping", "valid states: up, draining, down", 400),
        ("node-z", "draining", "No node named 'node-z'", 404),
    ],
)
def test_a_bad_node_change_is_refused_and_not_audited(
    db: Database, name: str, state: str, says: str, status: int
) -> None:
    with db.session() as s, pytest.raises(data.AdminError, match=says) as e:
        data.set_node_state(s, name, state, "root", T0)
    assert e.value.status == status
    assert audit_rows(db) == []


def test_stopping_a_session_asks_the_runner_once_and_is_audited(db: Database) -> None:
    with db.session() as s:
        row = create_session(
            s,
            user="alice",
            datasets=["mnist"],
            values={"code_digest": "0" * 64, "entry": "t.py", "image": "i", "resources": {}},
            now=T0,
        )
        row.state, row.node, row.gpu_ids, row.started = "running", "node-a", ["1"], T0
        name = row.name
    with db.session() as s:
        listed = data.running_sessions(s)
        assert [(w.name, w.user, w.state, w.node) for w in listed] == [
            (name, "alice", "running", "node-a")
        ]
        data.stop_session(s, name, "root", T0)
        data.stop_session(s, name, "root", T0)  # a second click: no second notice
    with db.session() as s:
        assert data.running_sessions(s)[0].stop_requested
        notices = [e.message for e in s.scalars(select(SessionEvent))]
    assert notices.count("stop requested by root (admin)") == 1
    assert [r[1:3] for r in audit_rows(db)] == [("session.stop", f"session:{name}")] * 2
    with db.session() as s, pytest.raises(data.AdminError, match="No session named"):
        data.stop_session(s, "alice/mnist/99", "root", T0)


def test_use_samples_come_from_the_sessions_gpu_use_series(db: Database) -> None:
    epoch = datetime(1970, 1, 1)
    t = (T0 - epoch).total_seconds()
    with db.session() as s:
        row = create_session(
            s,
            user="alice",
            datasets=[],
            values={"code_digest": "0" * 64, "entry": "t.py", "image": "i", "resources": {}},
            now=T0,
        )
        s.flush()
        s.add(
            SessionGpuUse(
                session_id=row.id,
                gpu_ids=[0, 1],
                samples=[
                    {"t": t - 7200, "w": 10, "u": [5, 5], "m": [1, 1]},  # before the window
                    {"t": t, "w": 10, "u": [50, 70], "m": [1, 1]},
                ],
            )
        )
    with db.session() as s:
        got = data.use_samples(s, T0 - timedelta(hours=1))
    assert [(u.t, u.w, list(u.util)) for u in got] == [(t, 10.0, [50.0, 70.0])]


def test_the_policy_form_is_read_in_credits_and_names_the_bad_field() -> None:
    form = {
        "gpu_hour": "2",
        "cpu_hour": "0.1",
        "memory_gb_hour": "0",
        "warn_threshold": "5",
        "interval_s": "60",
        "admission_min_hours": "0.5",
        "by_model": "NVIDIA H200 = 4\n\nNVIDIA A100-SXM4-80GB = 2.5\n",
    }
    assert policy_values(form) == {
        "gpu_hour_milli": 2000,
        "cpu_hour_milli": 100,
        "memory_gb_hour_milli": 0,
        "warn_threshold_milli": 5000,
        "interval_s": 60,
        "admission_min_hours": 0.5,
        "gpu_hour_milli_by_model": {"NVIDIA H200": 4000, "NVIDIA A100-SXM4-80GB": 2500},
    }
    with pytest.raises(ValueError, match="Credits per CPU-hour: 'lots' is not a number"):
        policy_values({**form, "cpu_hour": "lots"})
    with pytest.raises(ValueError, match="line 1: write MODEL = CREDITS"):
        policy_values({**form, "by_model": "H200 costs 4"})
    with pytest.raises(ValueError, match="Billing interval"):
        policy_values({**form, "interval_s": "1.5"})

"""Setting a balance is exact: the difference is computed from the balance read under a lock
in the transaction that writes it, so a charge that lands meanwhile waits and is kept (never
undone by a stale difference). On SQLite and, where a server runs, PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from nsml_server import credits
from nsml_server.credits import CreditError
from nsml_server.db import Database
from nsml_server.models import AuditEntry, User
from tests.unit.dbs import BOTH, empty_database

T0 = datetime(2026, 12, 1, 9, 0, 0)


@pytest.fixture(params=BOTH)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    database = empty_database(request, tmp_path)
    with database.session() as s:
        credits.ensure_user(s, "alice", T0, 10_000)
    yield database
    database.dispose()


def balance(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(User.credits_milli).where(User.name == "alice")) or 0)


def test_setting_a_balance_grants_the_difference_with_ledger_and_audit_rows(
    db: Database,
) -> None:
    with db.session() as s:
        entry = credits.set_balance(s, "alice", 25_500, "thesis", "root", T0)
        assert (entry.amount_milli, entry.reason) == (15_500, "set to 25.500: thesis")
    assert balance(db) == 25_500
    with db.session() as s:
        entry = credits.set_balance(s, "alice", 0, "", "root", T0)
        assert (entry.amount_milli, entry.reason) == (-25_500, "set to 0.000")
        assert [a.action for a in s.scalars(select(AuditEntry))] == ["credits.grant"] * 2
        assert credits.mismatched_balances(s) == []
    assert balance(db) == 0


@pytest.mark.parametrize(
    ("target", "account", "status", "words"),
    [
        (-1, "alice", 400, "below zero"),
        (10_000, "alice", 400, "alice already has 10.000 credits"),
        (5, "nobody", 404, "No user named 'nobody'"),
    ],
)
def test_setting_a_balance_refused(
    db: Database, target: int, account: str, status: int, words: str
) -> None:
    with pytest.raises(CreditError) as e, db.session() as s:
        credits.set_balance(s, account, target, "x", "root", T0)
    assert e.value.status == status and words in e.value.message
    assert balance(db) == 10_000


def test_a_set_waits_for_a_charge_in_flight_and_reaches_its_target_exactly(
    db: Database,
) -> None:
    """A charge written but not yet committed when the admin sets the balance: the set
    waits for it and computes the difference from the balance after it (a difference read
    before the charge commits would leave the balance one charge short of the target)."""
    in_flight, commit_charge = threading.Event(), threading.Event()
    entries: list[int] = []

    def charge() -> None:
        with db.session() as s:
            credits.post(
                s, account="alice", amount_milli=-1_000, kind="charge", reason="session",
                actor="billing", now=T0,
            )  # fmt: skip
            in_flight.set()
            commit_charge.wait(30)

    def set_it() -> None:
        with db.session() as s:
            entries.append(
                credits.set_balance(s, "alice", 50_000, "top up", "root", T0).amount_milli
            )

    charger = threading.Thread(target=charge)
    charger.start()
    assert in_flight.wait(30)
    setter = threading.Thread(target=set_it)
    setter.start()
    time.sleep(0.5)
    assert entries == []  # waiting for the charge's transaction
    commit_charge.set()
    charger.join(30)
    setter.join(30)
    assert entries == [41_000]  # from the 9,000 the charge left
    assert balance(db) == 50_000
    with db.session() as s:
        assert credits.mismatched_balances(s) == []

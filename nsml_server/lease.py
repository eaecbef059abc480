"""Leader election over the database: one lease row, renewed by its holder, taken over when
it lapses.

The leader schedules; any number of standby servers serve the API and wait. The lease's
``epoch`` grows at every change of holder; the scheduler writes its decisions in the same
transaction as :func:`fence`, so a former leader that was paused or partitioned past its
lease cannot commit a placement after another server took over.

Clocks: expiry times are written by the servers' own clocks, so servers sharing a database
need synchronised clocks (NTP); the lease's ``ttl_s`` should dwarf their skew.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import Database
from .models import Lease

log = logging.getLogger("nsml_server.lease")

SCHEDULER = "scheduler"


class LostLease(Exception):
    """This server no longer holds the lease; its pending decisions must not be written."""


class LeaderLease:
    """One server's view of the lease *name*.

    Call :meth:`tick` every ``ttl_s / 3`` or so: it renews the lease while held, or takes it
    over once it has lapsed, and returns whether this server leads.
    """

    def __init__(
        self,
        db: Database,
        holder: str,
        *,
        name: str = SCHEDULER,
        ttl_s: float = 3.0,
        now: Callable[[], datetime],
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0 seconds, not {ttl_s}")
        self.db = db
        self.holder = holder
        self.name = name
        self.ttl = timedelta(seconds=ttl_s)
        self.now = now
        self.epoch: int | None = None

    @property
    def is_leader(self) -> bool:
        return self.epoch is not None

    def _ensure_row(self) -> None:
        with self.db.session() as s:
            if s.get(Lease, self.name) is not None:
                return
        try:
            with self.db.session() as s:
                s.add(Lease(name=self.name, holder="", epoch=0, expires_at=datetime(1970, 1, 1)))
        except IntegrityError:
            pass  # another server created it first

    def tick(self) -> bool:
        """Renew or acquire; True when this server holds the lease afterwards."""
        now = self.now()
        expires = now + self.ttl
        if self.epoch is not None:
            with self.db.session() as s:
                r = s.execute(
                    update(Lease)
                    .where(
                        Lease.name == self.name,
                        Lease.holder == self.holder,
                        Lease.epoch == self.epoch,
                        Lease.expires_at >= now,
                    )
                    .values(expires_at=expires, renewed_at=now)
                )
                if cast(CursorResult[Any], r).rowcount == 1:
                    return True
            log.warning("lost the %s lease (epoch %s)", self.name, self.epoch)
            self.epoch = None
        self._ensure_row()
        with self.db.session() as s:
            r = s.execute(
                update(Lease)
                .where(Lease.name == self.name, Lease.expires_at < now)
                .values(
                    holder=self.holder, epoch=Lease.epoch + 1, expires_at=expires, renewed_at=now
                )
            )
            if cast(CursorResult[Any], r).rowcount != 1:
                return False
            epoch = s.scalar(select(Lease.epoch).where(Lease.name == self.name))
        self.epoch = int(epoch or 0)
        log.info("%s now leads %s (epoch %d)", self.holder, self.name, self.epoch)
        return True

    def fence(self, s: Session) -> int:
        """In the caller's transaction: confirm the lease is still ours; return the epoch.

        Raises :class:`LostLease` otherwise (the caller's transaction must roll back).
        """
        if self.epoch is None:
            raise LostLease(f"{self.holder} does not hold the {self.name} lease")
        now = self.now()
        r = s.execute(
            update(Lease)
            .where(
                Lease.name == self.name,
                Lease.holder == self.holder,
                Lease.epoch == self.epoch,
                Lease.expires_at >= now,
            )
            .values(renewed_at=now)
        )
        if cast(CursorResult[Any], r).rowcount != 1:
            self.epoch = None
            raise LostLease(f"{self.holder} lost the {self.name} lease")
        return self.epoch

    def resign(self) -> None:
        """Give the lease up now (clean shutdown), so that a standby takes over at once."""
        if self.epoch is None:
            return
        with self.db.session() as s:
            s.execute(
                update(Lease)
                .where(
                    Lease.name == self.name, Lease.holder == self.holder, Lease.epoch == self.epoch
                )
                .values(expires_at=datetime(1970, 1, 1))
            )
        log.info("%s resigned the %s lease (epoch %d)", self.holder, self.name, self.epoch)
        self.epoch = None

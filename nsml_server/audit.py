"""The audit log: every admin action (a grant, a policy change, a level, a drain ...), who did
it, to what, when, with its details.

Rows are only ever added; the admin panel and the API read them newest first.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import AuditEntry

log = logging.getLogger("nsml_server.audit")


def record(
    s: Session, actor: str, action: str, target: str, detail: dict[str, Any], now: datetime
) -> AuditEntry:
    """Add one audit row in the caller's transaction (so the action and its record commit or
    roll back together) and log it. *detail* must be JSON-serialisable (``default=str`` turns
    dates and the like into text)."""
    entry = AuditEntry(
        actor=actor,
        action=action,
        target=target,
        detail=json.dumps(detail, sort_keys=True, default=str),
        created=now,
    )
    s.add(entry)
    s.flush()
    log.info("audit %d: %s %s %s %s", entry.id, actor, action, target, entry.detail)
    return entry


def recent(s: Session, limit: int = 100, before_id: int | None = None) -> list[AuditEntry]:
    """The newest *limit* rows, newest first; with *before_id*, those older than that row
    (pass the last id of a page to get the next page)."""
    q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(max(0, limit))
    if before_id is not None:
        q = q.where(AuditEntry.id < before_id)
    return list(s.scalars(q))


def detail_of(entry: AuditEntry) -> dict[str, Any]:
    """An entry's details as a dict (an unreadable one as ``{"raw": text}``)."""
    try:
        value = json.loads(entry.detail)
    except ValueError:
        return {"raw": entry.detail}
    return value if isinstance(value, dict) else {"value": value}

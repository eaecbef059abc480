"""Small text formatting shared by the ``nsml`` CLI's verbs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any


def print_json(obj: Any) -> None:
    """*obj* as indented, key-sorted JSON on stdout (the ``--json`` output)."""
    print(json.dumps(obj, indent=2, sort_keys=True))


def ago(iso: str | None, none: str = "never") -> str:
    """``3m ago`` for an ISO time in UTC (whole units, rounded down); *none* for no time."""
    if not iso:
        return none
    t = datetime.fromisoformat(iso.rstrip("Z")).replace(tzinfo=UTC)
    s = max(0, int((datetime.now(UTC) - t).total_seconds()))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit} ago"
    return f"{s}s ago"

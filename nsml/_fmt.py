"""Small text formatting shared by the ``nsml`` CLI's verbs and the ``%nsml`` magics."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
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


def human(n: int | float | None) -> str:
    """``1.5 GiB``, ``320.0 KiB``, ``12 B``; ``-`` for no size."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def text_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """*rows* as aligned text columns under a header; *columns* are ``(key, title)``.

    A missing or ``None`` cell is shown as ``-``; ``0`` is shown as ``0``.
    """
    cells = [[title for _, title in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else str(r.get(k)) for k, _ in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def is_virtual(node: Mapping[str, Any], gpu: Mapping[str, Any]) -> bool:
    """Whether *gpu* of *node* is a virtual GPU (an inventory for trying the platform on a
    machine without GPUs), not a device."""
    probe = node.get("gpu_probe") or {}
    return bool(gpu.get("virtual")) or probe.get("kind") == "virtual"


def gpu_rows(nodes: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """One row per GPU of *nodes* (as ``GET api/nodes`` lists them) for ``gpustat``: node,
    state, GPU index, model (``(virtual)`` for virtual GPUs), GPUs allocated, memory and
    utilization (``-`` when the node does not report it; virtual GPUs never do). A node
    without GPUs is one row that says why."""
    rows: list[dict[str, str]] = []
    for n in nodes:
        for g in n.get("gpus") or []:
            virtual = is_virtual(n, g)
            util = g.get("utilization_pct")
            used = g.get("memory_used_mib")
            total = g.get("memory_total_mib")
            rows.append(
                {
                    "node": str(n["name"]),
                    "state": str(n["state"]),
                    "gpu": str(g["index"]),
                    "model": str(g["model"]) + (" (virtual)" if virtual else ""),
                    "allocated": f"{(g.get('allocated_milli') or 0) / 1000:g}",
                    "memory": (
                        f"{total} MiB" if virtual or used is None else f"{used}/{total} MiB"
                    ),
                    "util": "-" if util is None or virtual else f"{util}%",
                }
            )
        if not n.get("gpus"):
            probe = n.get("gpu_probe") or {}
            reason = f" ({probe['reason']})" if probe.get("reason") else ""
            rows.append(
                {"node": str(n["name"]), "state": str(n["state"]), "model": f"no GPUs{reason}"}
            )
    return rows


def pair_args(args: Sequence[str]) -> list[tuple[str, str | None]]:
    """A script's arguments as ``(name, value)``: ``--lr 0.1`` and ``--lr=0.1`` are
    ``("--lr", "0.1")``, a flag followed by another option is ``("--flag", None)``, and a
    positional argument is ``("#1", "data.csv")`` (numbered from 1)."""
    out: list[tuple[str, str | None]] = []
    i, position = 0, 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and len(a) > 1 and not _is_number(a):
            if "=" in a and a.startswith("--"):
                name, value = a.split("=", 1)
                out.append((name, value))
                i += 1
            elif i + 1 < len(args) and (not args[i + 1].startswith("-") or _is_number(args[i + 1])):
                out.append((a, args[i + 1]))
                i += 2
            else:
                out.append((a, None))
                i += 1
        else:
            position += 1
            out.append((f"#{position}", a))
            i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        return not math.isnan(float(text)) or text.lower().lstrip("+-") == "nan"
    except ValueError:
        return False


def args_table(a: Sequence[str], b: Sequence[str]) -> list[tuple[str, str, str]]:
    """The arguments that differ between two argument lists: ``(name, value in a, value in
    b)``, in the order they first appear; ``-`` where one side lacks it, ``(flag)`` for an
    option without a value. A name given twice compares all its values, joined by ``, ``."""

    def values(args: Sequence[str]) -> dict[str, str]:
        out: dict[str, list[str]] = {}
        for name, value in pair_args(args):
            out.setdefault(name, []).append("(flag)" if value is None else value)
        return {k: ", ".join(v) for k, v in out.items()}

    va, vb = values(a), values(b)
    names = list(dict.fromkeys([*va, *vb]))
    return [(n, va.get(n, "-"), vb.get(n, "-")) for n in names if va.get(n) != vb.get(n)]

"""The admin panel's pure part: what the pages and charts show, from plain values.

No database, no tornado, no clock: the handlers load rows, pass plain values and an explicit
time here, and render what comes back. Tested table-driven in ``tests/unit/test_admin_views.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Interval:
    """Something that held GPUs from *start* to *end* (``None``: still holds them)."""

    start: datetime
    end: datetime | None
    gpus: float
    kind: str = "other"


def allocation_steps(
    intervals: Iterable[Interval], start: datetime, end: datetime, kind: str | None = None
) -> tuple[list[datetime], list[float]]:
    """GPUs held over ``[start, end]`` as a step series (the value holds until the next time).

    Only intervals of *kind* count when it is given. The series starts at *start* with what
    was held then and ends at *end* with what is held then; every change in between is one
    point. Holdings that end at or before *start*, or begin after *end*, do not count.
    """
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    deltas: dict[datetime, float] = {}
    level = 0.0
    for iv in intervals:
        if kind is not None and iv.kind != kind:
            continue
        stop = iv.end if iv.end is not None else end
        if stop <= start or iv.start > end or stop <= iv.start:
            continue
        if iv.start <= start:
            level += iv.gpus
        else:
            deltas[iv.start] = deltas.get(iv.start, 0.0) + iv.gpus
        if stop < end:
            deltas[stop] = deltas.get(stop, 0.0) - iv.gpus
    times = [start]
    values = [_tidy(level)]
    for t in sorted(deltas):
        level += deltas[t]
        if t == start:
            values[0] = _tidy(level)
            continue
        times.append(t)
        values.append(_tidy(level))
    times.append(end)
    values.append(values[-1])
    return times, values


def _tidy(x: float) -> float:
    """Round away float noise from sums of shares (0.1 + 0.2 ...)."""
    return round(x, 6) + 0.0


@dataclass(frozen=True)
class UseSample:
    """One GPU-use sample of a session: *t* seconds since the epoch, covering *w* seconds,
    utilisation in percent of each of its GPUs (``session_gpu_use`` rows hold these)."""

    t: float
    w: float
    util: Sequence[float]


def use_buckets(
    samples: Iterable[UseSample], start: float, end: float, bucket_s: float
) -> tuple[list[float], list[float | None], list[float]]:
    """The cluster's GPU use in buckets of *bucket_s* seconds over ``[start, end)``.

    Returns (bucket start times, mean utilisation % of the GPUs that reported in each bucket —
    ``None`` for a bucket no GPU reported in, GPU-seconds reported in each bucket). Each
    sample counts in the bucket its start falls in, weighted by the seconds it covers times
    its GPUs, so a merged (coarser) sample weighs as much as the samples it replaced.
    """
    if bucket_s <= 0 or not math.isfinite(bucket_s):
        raise ValueError(f"bucket_s must be a positive number of seconds, not {bucket_s}")
    n = max(1, math.ceil((end - start) / bucket_s))
    weighted = [0.0] * n
    weight = [0.0] * n
    for smp in samples:
        if not smp.util or smp.t < start or smp.t >= end:
            continue
        k = min(n - 1, int((smp.t - start) // bucket_s))
        w = max(smp.w, 0.0) or 1.0
        weighted[k] += sum(smp.util) * w
        weight[k] += len(smp.util) * w
    times = [start + k * bucket_s for k in range(n)]
    means = [round(weighted[k] / weight[k], 2) if weight[k] else None for k in range(n)]
    return times, means, [round(w, 3) for w in weight]


def usage_by_day(
    intervals: Iterable[Interval], days: int, now: datetime
) -> list[tuple[str, float]]:
    """GPU-hours held per UTC day for the last *days* days (oldest first), today so far last."""
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=days - 1)
    hours = [0.0] * days
    for iv in intervals:
        s = max(iv.start, first)
        e = min(iv.end or now, now)
        while s < e:
            k = (s - first).days
            day_end = first + timedelta(days=k + 1)
            piece = min(e, day_end)
            hours[k] += (piece - s).total_seconds() / 3600 * iv.gpus
            s = piece
    return [
        ((first + timedelta(days=k)).date().isoformat(), round(hours[k], 3)) for k in range(days)
    ]


def holder_kind(holder: str) -> str:
    """What an allocation's holder (``USER:notebook``, ``USER:notebook:NAME``,
    ``USER:session/DATASET/N``, ``USER:evaluation/ID``) is: ``notebook``, ``session``,
    ``evaluation`` or ``other``."""
    rest = holder.split(":", 1)[1] if ":" in holder else holder
    if rest == "notebook" or rest.startswith("notebook:"):
        return "notebook"
    for kind in ("session", "evaluation"):
        if rest.startswith(kind + "/"):
            return kind
    return "other"


def server_name(holder: str) -> str | None:
    """The notebook server a holder names: ``""`` for the default server, the name of a named
    one, ``None`` when the holder is no notebook server."""
    if holder_kind(holder) != "notebook":
        return None
    rest = holder.split(":", 1)[1]
    return rest.split(":", 1)[1] if ":" in rest else ""


def credits_text(milli: int) -> str:
    """Milli-credits as an admin reads them: ``1,234.500``."""
    sign = "-" if milli < 0 else ""
    whole, frac = divmod(abs(milli), 1000)
    return f"{sign}{whole:,}.{frac:03d}"


def parse_credits(text: str) -> int:
    """Credits typed in a form (``12``, ``-3.5``, ``1,000.25``) as milli-credits.

    Raises ValueError with a sentence for the form when it is no number, has more than three
    decimals, or is beyond a billion credits.
    """
    raw = text.strip().replace(",", "").replace("_", "")
    if not raw:
        raise ValueError("Give an amount of credits, e.g. 100 or -2.5.")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"{text.strip()!r} is not a number of credits; e.g. 100 or -2.5."
        ) from None
    if not math.isfinite(value) or abs(value) > 1e9:
        raise ValueError(f"{text.strip()!r} is out of range (at most a billion credits).")
    milli = round(value * 1000)
    if abs(value * 1000 - milli) > 1e-6:
        raise ValueError(f"{text.strip()!r} has more than 3 decimals (a credit is 1000 milli).")
    return milli


def duration_text(seconds: float | None) -> str:
    """``3h 05m``, ``12m``, ``40s``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m"
    return f"{s}s"


def mib_text(mib: float) -> str:
    """``80 GiB``, ``512 MiB``."""
    if mib >= 1024:
        gib = mib / 1024
        return f"{gib:.0f} GiB" if gib >= 10 or gib == int(gib) else f"{gib:.1f} GiB"
    return f"{mib:.0f} MiB"


def detail_lines(detail: Mapping[str, object]) -> list[str]:
    """An audit entry's details as lines for a person: ``key: value``, with a change given
    as ``before``/``after`` objects written as one ``key: old → new`` line per changed key."""
    before, after = detail.get("before"), detail.get("after")
    lines = []
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                lines.append(f"{key}: {_value(before.get(key))} → {_value(after.get(key))}")
        if not lines:
            lines.append("no change")
        rest = {k: v for k, v in detail.items() if k not in ("before", "after")}
    else:
        rest = dict(detail)
    lines += [f"{k}: {_value(v)}" for k, v in sorted(rest.items())]
    return lines


def _value(v: object) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True, default=str)

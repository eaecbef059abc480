"""GPU use over time, per session: the samples every node heartbeat brings, kept bounded, and
the "GPUs idle" notice.

Every heartbeat carries each GPU's utilisation and memory in use, read through the node's
probe (NVML; a programmed :class:`gpu_scheduler.fake_nvml.FakeNVML` in tests). For each
running session of that node whose GPUs all report utilisation, one sample is added to the
session's series (table ``session_gpu_use``). Virtual GPUs report none: their sessions get no
samples, and the API says why.

The series stays bounded and gets coarser as it ages: past ``max_samples`` the older half is
merged pairwise (each sample keeps its start time and the seconds it covers, and the merged
values are the time-weighted means; memory the larger), so a week-long session keeps its
whole history at lower resolution and its recent minutes at full resolution.

A session that holds GPUs which stay at or below ``idle_threshold_pct`` for ``idle_after``
seconds gets one event (``notice``: "GPUs idle for 30 min ..."), once per idle stretch: the
waste NSML's admins once chased by hand.

The pure part (:func:`add_sample`, :func:`compact`, :func:`idle_since`,
:func:`idle_notice_due`) takes plain values and an explicit time; :class:`GpuUseMonitor` is
the shell that loads rows, calls them, and writes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from traitlets import Float, Int, validate
from traitlets.config import LoggingConfigurable

from .models import Node, SessionGpuUse, TrainingSession
from .schemas import GpuUseOut, GpuUseSeries, Heartbeat
from .sessions import add_event, iso

log = logging.getLogger("nsml_server.gpu_use")

Sample = dict[str, Any]
"""``{"t": start (s since the epoch), "w": seconds covered, "u": [% per GPU], "m": [MiB]}``"""


def add_sample(
    samples: Sequence[Sample],
    t: float,
    util: Sequence[float],
    mem: Sequence[float],
    *,
    interval_s: float,
    max_samples: int,
) -> list[Sample]:
    """*samples* with one more (time *t*, covering *interval_s* seconds), compacted to at
    most *max_samples* (:func:`compact`)."""
    out = [*samples, {"t": t, "w": interval_s, "u": list(util), "m": list(mem)}]
    return compact(out, max_samples) if len(out) > max_samples else out


def _merge(a: Sample, b: Sample) -> Sample:
    w = a["w"] + b["w"]
    if len(a["u"]) != len(b["u"]):  # the session's GPUs changed (a resume): keep the newer
        return {**b, "t": a["t"], "w": w}
    return {
        "t": a["t"],
        "w": w,
        "u": [
            (x * a["w"] + y * b["w"]) / w if w else x for x, y in zip(a["u"], b["u"], strict=True)
        ],
        "m": [max(x, y) for x, y in zip(a["m"], b["m"], strict=True)],
    }


def compact(samples: Sequence[Sample], max_samples: int) -> list[Sample]:
    """Merge the older half of *samples* pairwise until at most *max_samples* remain (the
    newest half keeps full resolution). Raises ValueError below 4."""
    if max_samples < 4:
        raise ValueError(f"max_samples must be at least 4, got {max_samples}")
    out = list(samples)
    while len(out) > max_samples:
        old = len(out) // 2
        merged = [_merge(out[i], out[i + 1]) if i + 1 < old else out[i] for i in range(0, old, 2)]
        out = merged + out[old:]
    return out


def idle_since(samples: Sequence[Sample], threshold_pct: float) -> float | None:
    """The start of the trailing run of samples in which every GPU is at or below
    *threshold_pct*; None when the last sample is busy (or there is none)."""
    start = None
    for smp in reversed(samples):
        if smp["u"] and all(u <= threshold_pct for u in smp["u"]):
            start = smp["t"]
        else:
            break
    return start


def idle_notice_due(
    samples: Sequence[Sample],
    now: float,
    *,
    threshold_pct: float,
    idle_after_s: float,
    notified_for: float | None,
) -> float | None:
    """The start of the current idle stretch when it has lasted *idle_after_s* seconds by
    *now* and no notice was given for it yet (*notified_for*: the stretch last notified);
    else None."""
    start = idle_since(samples, threshold_pct)
    if start is None or now - start < idle_after_s:
        return None
    if notified_for is not None and math.isclose(notified_for, start):
        return None
    return start


def _minutes(seconds: float) -> str:
    m = seconds / 60
    return f"{m:.0f} min" if m < 120 else f"{m / 60:.1f} h"


def _epoch(t: datetime) -> float:
    return t.replace(tzinfo=UTC).timestamp()


class GpuUseMonitor(LoggingConfigurable):
    """Keeps each running session's GPU use over time and notices idle GPUs."""

    interval_s = Float(
        10.0,
        help="""Seconds one sample stands for: the node heartbeat interval (the NSML server
        sets it from ``NSMLServer.heartbeat_interval``). Only used to weigh merged samples.""",
    ).tag(config=True)

    max_samples = Int(
        720,
        help="""Most samples kept per session (default 720: two hours at full resolution with
        10 s heartbeats). Past it the older half is merged pairwise, so old use is kept at
        lower resolution; at least 4.""",
    ).tag(config=True)

    idle_after = Float(
        1800.0,
        help="""Seconds a running session's GPUs must stay idle (every GPU at or below
        ``idle_threshold_pct``) before the session gets the event "GPUs idle for N min";
        default 1800 (30 min). One event per idle stretch; 0 turns the notice off.""",
    ).tag(config=True)

    idle_threshold_pct = Float(
        5.0,
        help="""Utilisation (percent, 0-100) at or below which a GPU counts as idle; default 5.""",
    ).tag(config=True)

    @validate("max_samples")
    def _max_samples(self, proposal: Any) -> int:
        v = int(proposal["value"])
        if v < 4:
            raise ValueError(f"GpuUseMonitor.max_samples must be at least 4, not {v}")
        return v

    @validate("idle_threshold_pct")
    def _threshold(self, proposal: Any) -> float:
        v = float(proposal["value"])
        if not 0 <= v <= 100:
            raise ValueError(f"GpuUseMonitor.idle_threshold_pct must be 0 to 100, not {v}")
        return v

    @validate("idle_after", "interval_s")
    def _seconds(self, proposal: Any) -> float:
        v = float(proposal["value"])
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"GpuUseMonitor.{proposal['trait'].name} must be >= 0 s, not {v}")
        return v

    def record(self, s: Session, node: str, hb: Heartbeat, now: datetime) -> int:
        """Add a sample to every running session on *node* whose GPUs all report use in
        *hb*; give the idle notice where it is due. Returns the sessions sampled."""
        by_index = {g.index: g for g in hb.gpus}
        rows = s.scalars(
            select(TrainingSession).where(
                TrainingSession.state == "running", TrainingSession.node == node
            )
        )
        t = _epoch(now)
        sampled = 0
        for row in rows:
            ids = [int(g) for g in row.gpu_ids or [] if str(g).isdigit()]
            reps = [by_index.get(i) for i in ids]
            if not ids or any(r is None or r.utilization_pct is None for r in reps):
                continue  # no GPUs, or virtual ones / a GPU that reports no use
            util = [float(r.utilization_pct or 0) for r in reps if r is not None]
            mem = [float(r.memory_used_mib) for r in reps if r is not None]
            use = s.get(SessionGpuUse, row.id)
            if use is None:
                use = SessionGpuUse(session_id=row.id, samples=[], gpu_ids=ids)
                s.add(use)
            use.samples = add_sample(
                use.samples or [],
                t,
                util,
                mem,
                interval_s=self.interval_s,
                max_samples=self.max_samples,
            )
            use.gpu_ids = ids
            use.updated = now
            sampled += 1
            if self.idle_after <= 0:
                continue
            start = idle_notice_due(
                use.samples,
                t,
                threshold_pct=self.idle_threshold_pct,
                idle_after_s=self.idle_after,
                notified_for=use.idle_notified_for,
            )
            if start is not None:
                use.idle_notified_for = start
                msg = (
                    f"GPUs idle for {_minutes(t - start)}: GPU {','.join(map(str, ids))} on "
                    f"{node} at or below {self.idle_threshold_pct:g}% since "
                    f"{iso(datetime.fromtimestamp(start, UTC).replace(tzinfo=None))}; stop the "
                    "session if it no longer needs them"
                )
                add_event(s, row, "notice", msg, now)
                log.info("%s: %s", row.name, msg)
        return sampled

    def describe(self, s: Session, row: TrainingSession) -> GpuUseOut:
        """The session's GPU use over time, as the API answers it."""
        use = s.get(SessionGpuUse, row.id)
        samples: list[Sample] = list(use.samples) if use is not None else []
        ids = list(use.gpu_ids) if use is not None else [str(g) for g in row.gpu_ids or []]
        note = None
        if not samples:
            note = self._why_none(s, row)
        width = max((len(smp["u"]) for smp in samples), default=0)
        series = [
            GpuUseSeries(
                gpu=str(ids[k]) if k < len(ids) else str(k),
                utilization_pct=[smp["u"][k] if k < len(smp["u"]) else None for smp in samples],
                memory_used_mib=[smp["m"][k] if k < len(smp["m"]) else None for smp in samples],
            )
            for k in range(width)
        ]
        last = samples[-1] if samples else None
        return GpuUseOut(
            session=row.name,
            state=row.state,
            node=row.node,
            t=[smp["t"] for smp in samples],
            seconds=[smp["w"] for smp in samples],
            gpus=series,
            current_utilization_pct=(
                sum(last["u"]) / len(last["u"]) if last and last["u"] else None
            ),
            note=note,
            idle_after_s=self.idle_after,
            idle_threshold_pct=self.idle_threshold_pct,
        )

    def _why_none(self, s: Session, row: TrainingSession) -> str:
        if not row.gpu_ids:
            return "the session holds no GPUs"
        if row.node:
            node = s.scalar(select(Node).where(Node.name == row.node))
            probe: Mapping[str, Any] = (node.gpu_probe if node is not None else None) or {}
            if probe.get("kind") == "virtual":
                return f"virtual GPUs (node {row.node}) report no utilisation"
            if probe.get("kind") == "none":
                why = probe.get("reason") or "NVML disabled"
                return f"node {row.node} cannot read its GPUs: {why}"
        if row.state in ("queued", "preparing"):
            return "no samples yet: the session has not started"
        return "no samples: the node reported no utilisation for the session's GPUs"

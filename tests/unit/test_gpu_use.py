"""GPU use over time: samples from node heartbeats (the probe reading a programmed fake NVML),
a bounded series that gets coarser as it ages, the "GPUs idle" event under an injected clock,
and what `%nsml gpumonitor` draws and `nsml ps` shows."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from gpu_scheduler.agent import collect_heartbeat
from gpu_scheduler.fake_nvml import FakeNVML
from gpu_scheduler.probe import NVMLProbe, VirtualProbe
from nsml_server import nodes
from nsml_server.db import Database, check_schema
from nsml_server.gpu_use import (
    GpuUseMonitor,
    Sample,
    add_sample,
    compact,
    idle_notice_due,
    idle_since,
)
from nsml_server.models import SessionEvent, TrainingSession
from nsml_server.schemas import Heartbeat
from nsml_server.sessions import create_session

T0 = datetime(2026, 1, 1, 12, 0, 0)


def smp(t: float, *u: float, w: float = 10.0) -> Sample:
    return {"t": t, "w": w, "u": list(u), "m": [100.0] * len(u)}


# ---- the pure part ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "threshold", "since"),
    [
        pytest.param([], 5, None, id="no samples"),
        pytest.param([smp(0, 50), smp(10, 3), smp(20, 0)], 5, 10, id="idle since the 2nd"),
        pytest.param([smp(0, 0), smp(10, 90)], 5, None, id="busy now"),
        pytest.param([smp(0, 0, 0), smp(10, 0, 40)], 5, None, id="one GPU of two busy"),
        pytest.param([smp(0, 5), smp(10, 5)], 5, 0, id="at the threshold counts as idle"),
        pytest.param([smp(0, 0), smp(10, 6), smp(20, 1)], 5, 20, id="a blip restarts it"),
    ],
)
def test_idle_since(samples: list[Sample], threshold: float, since: float | None) -> None:
    assert idle_since(samples, threshold) == since


@pytest.mark.parametrize(
    ("now", "notified_for", "due"),
    [
        pytest.param(1000.0, None, None, id="idle 1000 s of 1800: not yet"),
        pytest.param(1800.0, None, 0.0, id="idle 1800 s: due"),
        pytest.param(4000.0, 0.0, None, id="already notified for this stretch"),
        pytest.param(4000.0, -500.0, 0.0, id="notified for an earlier stretch: due again"),
    ],
)
def test_idle_notice_due(now: float, notified_for: float | None, due: float | None) -> None:
    samples = [smp(t, 0) for t in range(0, int(now) + 1, 10)]
    got = idle_notice_due(
        samples, now, threshold_pct=5, idle_after_s=1800, notified_for=notified_for
    )
    assert got == due


def test_the_series_is_bounded_and_old_samples_are_merged_by_time_weight() -> None:
    samples: list[Sample] = []
    for i in range(1000):
        samples = add_sample(
            samples, float(i * 10), [float(i % 100)], [float(i)], interval_s=10, max_samples=64
        )
        assert len(samples) <= 64
    assert sum(s["w"] for s in samples) == pytest.approx(10_000), "every second still covered"
    assert samples[0]["t"] == 0.0 and samples[-1]["t"] == 9990.0
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    assert samples[-1]["w"] == 10.0, "the newest keep full resolution"
    assert samples[0]["w"] > 10.0, "the oldest are merged"


def test_merging_averages_utilisation_by_time_and_keeps_peak_memory() -> None:
    merged = compact([smp(0, 0, w=10), smp(10, 90, w=20), smp(30, 1), smp(40, 1)], 4)
    assert len(merged) == 4
    merged = compact([smp(0, 0, w=10), smp(10, 90, w=20), smp(30, 1), smp(40, 1), smp(50, 1)], 4)
    first = merged[0]
    assert first["t"] == 0 and first["w"] == 30 and first["u"] == [pytest.approx(60.0)]
    with pytest.raises(ValueError, match="at least 4"):
        compact([], 3)


# ---- the monitor, fed by heartbeats read from a programmed fake NVML -----------------------


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    check_schema(d.engine, d.url)
    yield d
    d.dispose()


def running_session(s: Session, node: str, gpu_ids: list[str]) -> TrainingSession:
    row = create_session(
        s,
        user="u",
        datasets=[],
        values={"code_digest": "0" * 64, "entry": "t.py", "image": "i", "resources": {}},
        now=T0,
    )
    row.state, row.node, row.gpu_ids, row.started = "running", node, gpu_ids, T0
    s.flush()
    return row


def heartbeat(probe: Any) -> Heartbeat:
    return Heartbeat.model_validate(
        collect_heartbeat(probe, backend="local", docker_url=None, images=[])
    )


def beat(db: Database, probe: Any, monitor: GpuUseMonitor, now: datetime) -> None:
    with db.session() as s:
        nodes.apply_heartbeat(s, "node-a", heartbeat(probe), now, monitor)


def events(db: Database) -> list[str]:
    with db.session() as s:
        return [e.message for e in s.scalars(select(SessionEvent).order_by(SessionEvent.id))]


def test_gpumonitor_shows_the_programmed_utilisation_curve(db: Database) -> None:
    from nsml_magics.gpumonitor import build_gpu_panel, gpu_columns, summary

    curve0 = [10, 55, 90, 90, 30, 0]
    curve1 = [0, 20, 40, 60, 80, 100]
    nvml = FakeNVML(4)
    nvml.program(1, curve0, [1000, 2000, 3000, 3000, 2000, 500])
    nvml.program(3, curve1)
    probe = NVMLProbe(nvml)
    monitor = GpuUseMonitor(interval_s=10)
    with db.session() as s:
        row = running_session(s, "node-a", ["1", "3"])
        other = running_session(s, "node-b", ["1"])  # another node: not sampled from node-a
        name, other_name = row.name, other.name
    for k in range(len(curve0)):
        beat(db, probe, monitor, T0 + timedelta(seconds=10 * k))
    with db.session() as s:
        row = s.scalars(select(TrainingSession).where(TrainingSession.name == name)).one()
        answer = monitor.describe(s, row).model_dump()
        other = s.scalars(select(TrainingSession).where(TrainingSession.name == other_name)).one()
        assert monitor.describe(s, other).model_dump()["t"] == []
    assert [g["gpu"] for g in answer["gpus"]] == ["1", "3"]
    assert answer["gpus"][0]["utilization_pct"] == curve0
    assert answer["gpus"][1]["utilization_pct"] == curve1
    assert answer["gpus"][0]["memory_used_mib"] == [1000, 2000, 3000, 3000, 2000, 500]
    t0 = T0.replace(tzinfo=UTC).timestamp()
    assert answer["t"] == [t0 + 10 * k for k in range(6)]
    assert answer["current_utilization_pct"] == 50.0
    # What %nsml gpumonitor draws: one line per GPU, the curve as programmed.
    cols = gpu_columns(answer)
    assert cols[0]["util"] == curve0 and cols[1]["util"] == curve1
    layout = build_gpu_panel(answer)
    util_plot = layout.children[0]
    drawn = [r.data_source.data["util"] for r in util_plot.renderers]
    assert drawn == [curve0, curve1]
    assert "GPU 1: now 0%" in summary(answer) and "peak 90%" in summary(answer)


def test_the_idle_event_fires_once_after_30_minutes_under_an_injected_clock(db: Database) -> None:
    nvml = FakeNVML(2)
    probe = NVMLProbe(nvml)
    monitor = GpuUseMonitor(interval_s=60, idle_after=1800, idle_threshold_pct=5)
    with db.session() as s:
        running_session(s, "node-a", ["0"])
    nvml.gpus[0].utilization_pct = 80
    beat(db, probe, monitor, T0)  # busy at first
    nvml.gpus[0].utilization_pct = 2
    minute = timedelta(minutes=1)
    for m in range(1, 31):  # idle from minute 1: 29 minutes idle by minute 30
        beat(db, probe, monitor, T0 + m * minute)
    assert events(db) == []
    beat(db, probe, monitor, T0 + 31 * minute)  # 30 minutes idle
    (msg,) = events(db)
    assert msg.startswith("GPUs idle for 30 min: GPU 0 on node-a at or below 5%"), msg
    for m in range(32, 90):  # still idle: no second event for the same stretch
        beat(db, probe, monitor, T0 + m * minute)
    assert len(events(db)) == 1
    nvml.gpus[0].utilization_pct = 70  # busy again, then idle again: a new stretch
    beat(db, probe, monitor, T0 + 90 * minute)
    nvml.gpus[0].utilization_pct = 0
    for m in range(91, 122):
        beat(db, probe, monitor, T0 + m * minute)
    assert len(events(db)) == 2


@pytest.mark.parametrize(
    ("idle_after", "threshold", "util", "fires"),
    [
        pytest.param(600.0, 5.0, 3, True, id="10 min configured"),
        pytest.param(600.0, 1.0, 3, False, id="3% is busy with a 1% threshold"),
        pytest.param(0.0, 5.0, 0, False, id="0 turns the notice off"),
    ],
)
def test_the_idle_notice_is_configurable(
    db: Database, idle_after: float, threshold: float, util: int, fires: bool
) -> None:
    nvml = FakeNVML(1)
    nvml.gpus[0].utilization_pct = util
    probe = NVMLProbe(nvml)
    monitor = GpuUseMonitor(idle_after=idle_after, idle_threshold_pct=threshold)
    with db.session() as s:
        running_session(s, "node-a", ["0"])
    for m in range(0, 12):
        beat(db, probe, monitor, T0 + timedelta(minutes=m))
    assert bool(events(db)) is fires


def test_virtual_gpus_report_no_use_and_say_so(db: Database) -> None:
    probe = VirtualProbe(2, node_name="node-a")
    monitor = GpuUseMonitor()
    with db.session() as s:
        row = running_session(s, "node-a", ["0"])
        name = row.name
    beat(db, probe, monitor, T0)
    with db.session() as s:
        row = s.scalars(select(TrainingSession).where(TrainingSession.name == name)).one()
        out = monitor.describe(s, row)
    assert out.t == [] and out.note == "virtual GPUs (node node-a) report no utilisation"


@pytest.mark.parametrize(
    ("trait", "value", "said"),
    [
        ("max_samples", 3, "at least 4"),
        ("idle_threshold_pct", 101, "0 to 100"),
        ("idle_after", -1, ">= 0 s"),
    ],
)
def test_bad_settings_are_refused_with_the_value(trait: str, value: float, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        GpuUseMonitor(**{trait: value})


def test_ps_shows_current_gpu_use() -> None:
    from nsml.cli_session import gpu_use_text

    st = {
        "gpu_use": [
            {"index": 0, "utilization_pct": 80, "memory_used_mib": 2048},
            {"index": 1, "utilization_pct": 40, "memory_used_mib": 1024},
        ]
    }
    assert gpu_use_text(st) == "gpu 60% 3.0G"
    assert gpu_use_text({"gpu_use": [{"index": 0, "utilization_pct": None}]}) == ""
    assert gpu_use_text({}) == ""

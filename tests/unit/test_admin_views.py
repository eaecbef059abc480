"""The admin panel's pure part: chart series, usage by day, holders, credits as typed."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest

from nsml_server.admin.views import (
    Interval,
    UseSample,
    allocation_steps,
    credits_text,
    detail_lines,
    duration_text,
    holder_kind,
    mib_text,
    parse_credits,
    server_name,
    usage_by_day,
    use_buckets,
)

T0 = datetime(2026, 12, 1, 12, 0, 0)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.mark.parametrize(
    ("case", "intervals", "kind", "expected"),
    [
        ("nothing held: flat zero", [], None, ([at(0), at(60)], [0.0, 0.0])),
        (
            "held before the window and still held: flat at its GPUs",
            [Interval(at(-30), None, 2.0, "session")],
            None,
            ([at(0), at(60)], [2.0, 2.0]),
        ),
        (
            "starts and ends inside the window: up then down",
            [Interval(at(10), at(40), 1.0, "session")],
            None,
            ([at(0), at(10), at(40), at(60)], [0.0, 1.0, 0.0, 0.0]),
        ),
        (
            "shares add up without float noise",
            [
                Interval(at(5), None, 0.1, "notebook"),
                Interval(at(5), None, 0.2, "notebook"),
            ],
            None,
            ([at(0), at(5), at(60)], [0.0, 0.3, 0.3]),
        ),
        (
            "ended before the window: not counted",
            [Interval(at(-60), at(-1), 4.0, "session")],
            None,
            ([at(0), at(60)], [0.0, 0.0]),
        ),
        (
            "only the kind asked for",
            [Interval(at(10), None, 1.0, "session"), Interval(at(20), None, 2.0, "notebook")],
            "notebook",
            ([at(0), at(20), at(60)], [0.0, 2.0, 2.0]),
        ),
        (
            "one ends as another starts: one point with the net level",
            [Interval(at(0), at(30), 1.0), Interval(at(30), None, 3.0)],
            None,
            ([at(0), at(30), at(60)], [1.0, 3.0, 3.0]),
        ),
    ],
)
def test_allocation_steps(
    case: str,
    intervals: list[Interval],
    kind: str | None,
    expected: tuple[list[datetime], list[float]],
) -> None:
    assert allocation_steps(intervals, at(0), at(60), kind) == expected, case


def test_allocation_steps_refuses_a_window_that_ends_before_it_starts() -> None:
    with pytest.raises(ValueError, match="before start"):
        allocation_steps([], at(10), at(0))


@pytest.mark.parametrize(
    ("case", "samples", "expected_means", "expected_weights"),
    [
        ("no samples: every bucket unreported", [], [None, None], [0.0, 0.0]),
        (
            "two GPUs in one sample: their mean",
            [UseSample(0, 10, [20.0, 60.0])],
            [40.0, None],
            [20.0, 0.0],
        ),
        (
            "a merged sample weighs by the seconds it covers",
            [UseSample(0, 30, [90.0]), UseSample(40, 10, [10.0])],
            [70.0, None],
            [40.0, 0.0],
        ),
        (
            "samples outside the window are left out; the last bucket is half-open",
            [UseSample(-1, 10, [100.0]), UseSample(60, 10, [50.0]), UseSample(120, 10, [1.0])],
            [None, 50.0],
            [0.0, 10.0],
        ),
    ],
)
def test_use_buckets(
    case: str,
    samples: list[UseSample],
    expected_means: list[float | None],
    expected_weights: list[float],
) -> None:
    times, means, weights = use_buckets(samples, 0, 120, 60)
    assert times == [0, 60], case
    assert means == expected_means, case
    assert weights == expected_weights, case


def test_use_buckets_refuses_a_bucket_of_no_width() -> None:
    with pytest.raises(ValueError, match="positive"):
        use_buckets([], 0, 10, 0)


def test_usage_by_day_splits_a_holding_at_midnight_and_counts_today_so_far() -> None:
    now = datetime(2026, 12, 3, 6, 0)
    ivs = [
        # 2 GPUs from 22:00 on the 1st to 02:00 on the 2nd: 4 GPU-h each side of midnight
        Interval(datetime(2026, 12, 1, 22), datetime(2026, 12, 2, 2), 2.0),
        # half a GPU since 00:00 today, still held: 3 GPU-h so far
        Interval(datetime(2026, 12, 3, 0), None, 0.5),
        # long before the window: not counted
        Interval(datetime(2026, 11, 1), datetime(2026, 11, 2), 8.0),
    ]
    assert usage_by_day(ivs, 3, now) == [
        ("2026-12-01", 4.0),
        ("2026-12-02", 4.0),
        ("2026-12-03", 3.0),
    ]


@pytest.mark.parametrize(
    ("holder", "kind", "server"),
    [
        ("alice:notebook", "notebook", ""),
        ("alice:notebook:gpu-box", "notebook", "gpu-box"),
        ("alice:session/mnist/3", "session", None),
        ("alice:evaluation/12", "evaluation", None),
        ("alice:something", "other", None),
    ],
)
def test_holders(holder: str, kind: str, server: str | None) -> None:
    assert holder_kind(holder) == kind
    assert server_name(holder) == server


@pytest.mark.parametrize(
    ("typed", "milli"),
    [("100", 100_000), ("-2.5", -2_500), ("1,000.25", 1_000_250), (" 0.001 ", 1)],
)
def test_parse_credits(typed: str, milli: int) -> None:
    assert parse_credits(typed) == milli


@pytest.mark.parametrize(
    ("typed", "says"),
    [
        ("", "Give an amount"),
        ("ten", "not a number"),
        ("0.0001", "more than 3 decimals"),
        ("1e12", "out of range"),
        ("nan", "out of range"),
    ],
)
def test_parse_credits_refuses_with_a_sentence(typed: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_credits(typed)


def test_texts() -> None:
    assert credits_text(1_234_500) == "1,234.500"
    assert credits_text(-5) == "-0.005"
    assert duration_text(None) == "-"
    assert duration_text(42) == "42s"
    assert duration_text(3 * 3600 + 5 * 60) == "3h 05m"
    assert duration_text(2 * 86400 + 3600) == "2d 01h"
    assert mib_text(512) == "512 MiB"
    assert mib_text(81920) == "80 GiB"
    assert mib_text(1536) == "1.5 GiB"


@pytest.mark.parametrize(
    ("detail", "lines"),
    [
        ({"before": "up", "after": "draining"}, ["after: draining", "before: up"]),
        (
            {"before": {"rate": 1000, "interval_s": 60}, "after": {"rate": 2000, "interval_s": 60}},
            ["rate: 1000 → 2000"],
        ),
        ({"before": {"a": 1}, "after": {"a": 1}}, ["no change"]),
        (
            {"amount_milli": 25000, "reason": "course", "level": ["user", "team_admin"]},
            ["amount_milli: 25000", 'level: ["user", "team_admin"]', "reason: course"],
        ),
    ],
)
def test_detail_lines(detail: dict[str, object], lines: list[str]) -> None:
    assert detail_lines(detail) == lines


def test_the_charts_embed_bokehjs_inline_and_load_nothing_from_a_cdn() -> None:
    from nsml_server.admin import charts

    resources = charts.bokeh_resources()
    assert "<script" in resources and "Bokeh" in resources
    assert not re.search(r"<script[^>]*\ssrc=|<link[^>]*\shref=", resources)
    steps = allocation_steps([Interval(at(10), None, 1.0, "session")], at(0), at(60))
    script, div = charts.allocation_chart({"total": steps}, 4.0, at(0), at(60))
    assert "data-root-id" in div and "gpu-allocation" in script
    epoch = datetime(1970, 1, 1)
    s0, s1 = (at(0) - epoch).total_seconds(), (at(60) - epoch).total_seconds()
    times, means, _ = use_buckets([UseSample(s0, 10, [50.0])], s0, s1, 900)
    script, div = charts.use_chart(times, means, 900, at(0), at(60))
    assert "gpu-use" in script
    script, div = charts.usage_chart(["2026-12-01"], [1.5], [0.5])
    assert "usage-by-day" in script

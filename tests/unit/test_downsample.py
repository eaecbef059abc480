"""Downsampling of metric series: the point budget is respected, the shape kept, and what a
plot must not hide (extremes, NaN and infinities) is always among the points kept."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from nsml.downsample import downsample, in_range, lttb, nonfinite_runs

NAN, INF = math.nan, math.inf


def series(n: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [math.sin(i / 50) + rng.gauss(0, 0.05) for i in range(n)]


@pytest.mark.parametrize(
    ("ys", "budget", "expected"),
    [
        pytest.param([1.0, 2.0, 3.0], 5, [0, 1, 2], id="under the budget: every point"),
        pytest.param([1.0, 2.0, 3.0], 3, [0, 1, 2], id="at the budget: every point"),
        pytest.param([], 2, [], id="empty series"),
        pytest.param([0.0, 0, 0, 9, 0, 0, 0, 0], 3, [0, 3, 7], id="a spike is kept"),
        pytest.param([0.0, 0, 0, -9, 0, 0, 0, 0], 3, [0, 3, 7], id="a dip is kept"),
        pytest.param(
            [0.0, 1, 2, NAN, 4, 5, 6, 7], 4, [0, 3, 7], id="a lone NaN is kept, not bridged"
        ),
        pytest.param(
            [0.0, 1, NAN, NAN, NAN, NAN, 6, 7],
            4,
            [0, 2, 5, 7],
            id="a NaN run is kept by its first and last point",
        ),
        pytest.param(
            [0.0, 1, 2, INF, 4, 5, -INF, 7],
            4,
            [0, 3, 6, 7],
            id="+inf and -inf are kept",
        ),
        pytest.param(
            [NAN, NAN, NAN, NAN, NAN],
            2,
            [0, 4],
            id="all NaN: the run's ends",
        ),
        pytest.param(
            [0.0, NAN, 1, INF, 2, NAN, 3, -INF, 4],
            4,
            None,
            id="more non-finite runs than the budget: the budget still holds",
        ),
    ],
)
def test_downsample_table(ys: list[float], budget: int, expected: list[int] | None) -> None:
    """*expected*: indices that must be among those kept (None: only the budget is checked)."""
    got = downsample(list(range(len(ys))), ys, budget)
    assert len(got) <= budget
    assert got == sorted(set(got))
    if expected is not None:
        assert set(expected) <= set(got), got


@pytest.mark.parametrize("n", [10, 1_000, 10_000])
@pytest.mark.parametrize("budget", [2, 3, 10, 500, 2_000])
def test_budget_respected_and_extremes_kept(n: int, budget: int) -> None:
    ys = series(n, seed=n + budget)
    ys[n // 3] = 50.0
    ys[n // 2] = -50.0
    got = downsample(list(range(n)), ys, budget)
    assert len(got) <= budget
    assert len(got) >= min(n, budget) - 2, "only the extremes may coincide with LTTB picks"
    if budget >= 4:
        assert n // 3 in got and n // 2 in got
        assert got[0] == 0 and got[-1] == n - 1


def test_non_finite_points_survive_heavy_downsampling() -> None:
    n = 10_000
    ys = series(n)
    for i, v in ((1234, NAN), (5000, INF), (7777, -INF)):
        ys[i] = v
    got = downsample(list(range(n)), ys, 100)
    assert len(got) <= 100
    for i in (1234, 5000, 7777):
        assert i in got


def test_lttb_keeps_the_shape() -> None:
    """The downsampled line stays close to the full one (linear interpolation error small
    against the signal's range)."""
    n = 10_000
    xs = np.arange(n, dtype=np.float64)
    ys = np.sin(xs / 300)
    idx = lttb(xs, ys, 200)
    assert len(idx) == 200 and idx[0] == 0 and idx[-1] == n - 1
    assert (np.diff(idx) > 0).all()
    err = np.abs(np.interp(xs, xs[idx], ys[idx]) - ys).max()
    assert err < 0.02


def test_lttb_rejects_a_budget_below_two() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        downsample([0, 1, 2], [0, 1, 2], 1)


def test_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="xs has 2 values and ys 3"):
        downsample([0, 1], [0, 1, 2], 2)


@pytest.mark.parametrize(
    ("ys", "runs"),
    [
        ([1.0, 2.0], []),
        ([NAN], [(0, 0)]),
        ([1.0, NAN, NAN, 2.0, INF, INF, -INF], [(1, 2), (4, 5), (6, 6)]),
    ],
)
def test_nonfinite_runs(ys: list[float], runs: list[tuple[int, int]]) -> None:
    assert nonfinite_runs(ys) == runs


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (None, None, [0, 1, 2, 3, 4]),
        (1.5, 2.5, [1, 2, 3]),
        (0, 4, [0, 1, 2, 3, 4]),
        (10, 20, []),
        (None, 0, [0, 1]),
    ],
)
def test_in_range_adds_the_neighbours_outside(
    lo: float | None, hi: float | None, expected: list[int]
) -> None:
    assert in_range([0.0, 1, 2, 3, 4], lo, hi) == expected

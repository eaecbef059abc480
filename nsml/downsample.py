"""Downsampling of metric series for plots: which points to send so that a line drawn from
them looks like the line drawn from all of them.

Pure functions over plain sequences (NumPy inside, no Bokeh, no I/O): the NSML server calls
them before it answers ``GET api/sessions/NAME/metrics?max_points=N``, and the comparison
panels call them on series they already hold.

The shape of a curve is kept by Largest-Triangle-Three-Buckets (Steinarsson, "Downsampling
Time Series for Visual Representation", 2013; see :func:`lttb` for the one change that makes
it one NumPy pass), and on top of it what a plot must never hide:

- the global minimum and maximum of the finite values (the best loss, a spike);
- every run of non-finite values (NaN, +inf, -inf: a diverged loss is information), by the
  first and the last point of each run, so that a gap in the line stays a gap.

The number of indices returned never exceeds the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

#: The smallest budget: the first and the last point.
MIN_BUDGET = 2
#: The largest budget the server takes (``max_points``): more than any screen shows.
MAX_POINTS = 100_000


def _kinds(y: npt.NDArray[np.float64]) -> npt.NDArray[np.int8]:
    """Per value: 0 finite, 1 NaN, 2 +inf, 3 -inf."""
    kind = np.zeros(len(y), dtype=np.int8)
    kind[np.isnan(y)] = 1
    kind[np.isposinf(y)] = 2
    kind[np.isneginf(y)] = 3
    return kind


def nonfinite_runs(ys: Sequence[float] | npt.NDArray[np.float64]) -> list[tuple[int, int]]:
    """``(first, last)`` index of each maximal run of equal non-finite values in *ys*
    (NaN, +inf and -inf are different kinds), in order."""
    kind = _kinds(np.asarray(ys, dtype=np.float64))
    if not kind.any():
        return []
    change = np.flatnonzero(np.diff(kind)) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change - 1, [len(kind) - 1]))
    keep = kind[starts] != 0
    return [(int(a), int(b)) for a, b in zip(starts[keep], ends[keep], strict=True)]


def _evenly(items: Sequence[int], k: int) -> list[int]:
    """*k* of *items* spread evenly, the first and the last included when ``k >= 2``."""
    if k <= 0:
        return []
    if k >= len(items):
        return list(items)
    if k == 1:
        return [items[0]]
    step = (len(items) - 1) / (k - 1)
    return [items[round(j * step)] for j in range(k)]


def lttb(
    xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64], budget: int
) -> npt.NDArray[np.intp]:
    """Largest-Triangle-Three-Buckets over finite points: *budget* indices into *xs*/*ys*
    (all of them when there are no more), the first and the last always among them.

    The points between the first and the last are cut into ``budget - 2`` buckets; from each
    the point kept is the one making the largest triangle with the mean point of the bucket
    before and the mean point of the bucket after (the first and last point at the ends).
    Steinarsson's LTTB takes the point *kept* in the bucket before instead of its mean; with
    the mean every bucket is independent, so the whole series is a few NumPy passes (a 10,000
    point series in well under a millisecond) and the picture is the same.

    Both arrays hold finite numbers only.
    """
    n = len(xs)
    if budget >= n or n <= 2:
        return np.arange(n, dtype=np.intp)
    if budget < MIN_BUDGET:
        raise ValueError(f"budget must be at least {MIN_BUDGET}, got {budget}")
    if budget == 2:
        return np.array([0, n - 1], dtype=np.intp)
    buckets = budget - 2
    # bucket b holds the points [starts[b], starts[b + 1]) of the inner points 1 .. n-2
    starts = np.linspace(1, n - 1, buckets + 1).astype(np.intp)
    starts = np.unique(starts)
    lengths = np.diff(starts)
    first = starts[:-1]
    sum_x = np.add.reduceat(xs[1 : n - 1], first - 1)
    sum_y = np.add.reduceat(ys[1 : n - 1], first - 1)
    mean_x, mean_y = sum_x / lengths, sum_y / lengths
    ax = np.concatenate(([xs[0]], mean_x[:-1]))
    ay = np.concatenate(([ys[0]], mean_y[:-1]))
    cx = np.concatenate((mean_x[1:], [xs[-1]]))
    cy = np.concatenate((mean_y[1:], [ys[-1]]))
    px, py = xs[1 : n - 1], ys[1 : n - 1]
    rax, ray = np.repeat(ax, lengths), np.repeat(ay, lengths)
    rcx, rcy = np.repeat(cx, lengths), np.repeat(cy, lengths)
    area = np.abs((rax - rcx) * (py - ray) - (rax - px) * (rcy - ray))
    best = np.maximum.reduceat(area, first - 1)
    where = np.arange(1, n - 1, dtype=np.intp)
    hit = np.where(area == np.repeat(best, lengths), where, n)
    picked = np.minimum.reduceat(hit, first - 1)
    return np.concatenate(([0], picked, [n - 1])).astype(np.intp)


def downsample(
    xs: Sequence[float] | npt.NDArray[Any], ys: Sequence[float] | npt.NDArray[Any], budget: int
) -> list[int]:
    """The indices (ascending) of at most *budget* points of the series (*xs*, *ys*) that
    draw the same picture: LTTB over the finite points, plus the global minimum and maximum
    of the finite values, plus the first and the last point of every run of NaN / +inf /
    -inf. All indices when the series has no more than *budget* points.

    When the non-finite runs alone need more than the budget, the first and last finite
    points and the extremes are kept and the run ends are thinned evenly.

    Raises:
        ValueError: *budget* below 2, or *xs* and *ys* of different lengths.
    """
    if budget < MIN_BUDGET:
        raise ValueError(f"budget must be at least {MIN_BUDGET} points, got {budget}")
    n = len(ys)
    if len(xs) != n:
        raise ValueError(f"xs has {len(xs)} values and ys {n}")
    if n <= budget:
        return list(range(n))
    y = np.asarray(ys, dtype=np.float64)
    x = np.asarray(xs, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(y) & np.isfinite(x))
    keep: set[int] = set()
    if len(finite):
        fy = y[finite]
        keep.update(
            (
                int(finite[0]),
                int(finite[-1]),
                int(finite[int(np.argmin(fy))]),
                int(finite[int(np.argmax(fy))]),
            )
        )
    ends = sorted({i for run in nonfinite_runs(y) for i in run} - keep)
    if len(keep) + len(ends) >= budget:
        chosen = sorted(keep)[:budget]
        return sorted({*chosen, *_evenly(ends, budget - len(chosen))})
    keep.update(ends)
    if len(finite) <= 2:
        return sorted(keep)
    # LTTB always keeps the first and last finite points (already in *keep*): it may add
    # budget - |keep| points of its own, so the union stays within the budget.
    room = budget - len(keep) + 2
    if room < MIN_BUDGET:
        return sorted(keep)
    picked = lttb(x[finite], y[finite], room)
    keep.update(int(finite[i]) for i in picked)
    return sorted(keep)


def in_range(xs: Sequence[float], lo: float | None, hi: float | None) -> list[int]:
    """Indices of the points with ``lo <= x <= hi`` (an open end when None), plus the one
    just outside each end when there is one, so that a zoomed line reaches the plot's edges."""
    idx = [i for i, x in enumerate(xs) if (lo is None or x >= lo) and (hi is None or x <= hi)]
    if not idx:
        return []
    first, last = idx[0], idx[-1]
    out = idx
    if first > 0:
        out = [first - 1, *out]
    if last < len(xs) - 1:
        out = [*out, last + 1]
    return out

"""Leaderboard rules: order, ties, best per user, the private part, the daily limit."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import pytest

from nsml_server.ranking import DAY, Entry, RankedEntry, next_allowed, rank

T0 = datetime(2026, 12, 1, 9, 0)


def e(id: int, user: str, public: float, private: float | None = None, minutes: int = 0) -> Entry:
    return Entry(
        id=id,
        user=user,
        session=f"{user}/ds/{id}",
        checkpoint="best",
        submitted=T0 + timedelta(minutes=minutes if minutes else id),
        public_score=public,
        private_score=private,
    )


def order(rows: list[RankedEntry]) -> list[int]:
    return [r.entry.id for r in rows]


@pytest.mark.parametrize(
    ("higher", "entries", "expected"),
    [
        # Higher is better (accuracy): 0.9 first.
        (True, [e(1, "a", 0.5), e(2, "b", 0.9), e(3, "c", 0.7)], [2, 3, 1]),
        # Lower is better (RMSE): 0.5 first.
        (False, [e(1, "a", 0.5), e(2, "b", 0.9), e(3, "c", 0.7)], [1, 3, 2]),
        # A tie goes to the earlier submission, whatever the id order.
        (True, [e(5, "a", 0.8, minutes=30), e(6, "b", 0.8, minutes=10)], [6, 5]),
        (False, [e(7, "a", 0.1, minutes=1), e(8, "b", 0.1, minutes=2)], [7, 8]),
        # A NaN score ranks last in either order.
        (True, [e(1, "a", math.nan), e(2, "b", 0.1)], [2, 1]),
        (False, [e(1, "a", math.nan), e(2, "b", 9.0)], [2, 1]),
    ],
)
def test_order_follows_the_metric_and_ties_go_to_the_earlier(
    higher: bool, entries: list[Entry], expected: list[int]
) -> None:
    rows = rank(entries, higher_is_better=higher, closed=False, has_private=False)
    assert order(rows) == expected
    assert [r.rank for r in rows] == list(range(1, len(expected) + 1))


def test_each_users_best_by_default_and_every_submission_with_all() -> None:
    entries = [e(1, "a", 0.6), e(2, "a", 0.8), e(3, "b", 0.7), e(4, "a", 0.75)]
    best = rank(entries, higher_is_better=True, closed=False, has_private=False)
    assert [(r.rank, r.entry.user, r.score) for r in best] == [(1, "a", 0.8), (2, "b", 0.7)]
    every = rank(
        entries, higher_is_better=True, closed=False, has_private=False, best_per_user=False
    )
    assert order(every) == [2, 4, 3, 1]


def test_private_scores_stay_hidden_and_unranked_until_the_board_closes() -> None:
    # a leads the public part; b the private one.
    entries = [e(1, "a", 0.9, private=0.6), e(2, "b", 0.8, private=0.85)]
    open_rows = rank(entries, higher_is_better=True, closed=False, has_private=True)
    assert order(open_rows) == [1, 2]
    assert all(r.private_score is None for r in open_rows)
    assert [r.score for r in open_rows] == [0.9, 0.8]
    closed_rows = rank(entries, higher_is_better=True, closed=True, has_private=True)
    assert order(closed_rows) == [2, 1]
    assert [(r.score, r.public_score, r.private_score) for r in closed_rows] == [
        (0.85, 0.8, 0.85),
        (0.6, 0.9, 0.6),
    ]


def test_without_a_private_part_closing_changes_nothing_but_the_state() -> None:
    entries = [e(1, "a", 0.2), e(2, "b", 0.4)]
    assert order(rank(entries, higher_is_better=False, closed=True, has_private=False)) == [1, 2]


def test_best_per_user_once_closed_is_the_best_private_score() -> None:
    entries = [e(1, "a", 0.9, private=0.5), e(2, "a", 0.7, private=0.8), e(3, "b", 0.6, 0.6)]
    rows = rank(entries, higher_is_better=True, closed=True, has_private=True)
    assert [(r.entry.id, r.score) for r in rows] == [(2, 0.8), (3, 0.6)]


NOW = datetime(2026, 12, 2, 12, 0)


@pytest.mark.parametrize(
    ("limit", "ago_hours", "expected"),
    [
        (None, [1, 2, 3], None),  # no limit
        (3, [1, 2], None),  # two of three used
        (3, [1, 2, 30], None),  # the third was yesterday: outside the 24 hours
        (3, [1, 2, 3], NOW - timedelta(hours=3) + DAY),  # the oldest of the three frees at +24h
        (2, [1, 2, 3], NOW - timedelta(hours=2) + DAY),  # the oldest of the latest two
        (1, [23.5], NOW + timedelta(minutes=30)),
        (1, [24], None),  # exactly 24 hours ago: free again
        (0, [], datetime.max),  # submissions closed for users
    ],
)
def test_the_daily_limit_names_when_the_next_submission_is_allowed(
    limit: int | None, ago_hours: list[float], expected: datetime | None
) -> None:
    times = [NOW - timedelta(hours=h) for h in ago_hours]
    assert next_allowed(times, limit=limit, now=NOW) == expected

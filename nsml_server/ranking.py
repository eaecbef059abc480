"""Leaderboard rules as pure functions: ranking, the daily limit, what a viewer may see.

The server loads a dataset's submissions and calls these; nothing here reads a clock or a
database, so the rules are tested table by table.

- **Order**: by the metric's order (higher or lower is better); a tie goes to the earlier
  submission (then the lower id), so ranks are distinct and never change for an old entry
  when a later one only equals it.
- **Public and private parts**: a hidden split may keep a private part. While the leaderboard
  is open it ranks by the public score and shows no private score; once the owner closes it, it
  ranks by the private score and shows both (Kaggle's defence against fitting the public board).
  Without a private part the public score ranks always.
- **Best per user**: by default each user's best scored submission; ``all`` lists every one.
- **Daily limit**: at most N submissions per user in any 24 hours (a rolling window, so the
  refusal can name the exact time the next one is allowed); failed evaluations count too, as
  they used the hidden inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["DAY", "Entry", "RankedEntry", "next_allowed", "rank"]

DAY = timedelta(hours=24)


@dataclass(frozen=True)
class Entry:
    """One scored submission as the ranking sees it."""

    id: int
    user: str
    session: str
    checkpoint: str
    submitted: datetime
    public_score: float
    private_score: float | None = None


@dataclass(frozen=True)
class RankedEntry:
    """A leaderboard row: its rank and the scores the viewer may see."""

    rank: int
    entry: Entry
    score: float
    public_score: float
    private_score: float | None


def _key(score: float, higher_is_better: bool, e: Entry) -> tuple[float, datetime, int]:
    s = score if math.isfinite(score) else -math.inf if higher_is_better else math.inf
    return (-s if higher_is_better else s, e.submitted, e.id)


def rank(
    entries: Iterable[Entry],
    *,
    higher_is_better: bool,
    closed: bool,
    has_private: bool,
    best_per_user: bool = True,
) -> list[RankedEntry]:
    """The rows of a leaderboard, best first, ranked 1, 2, 3 … (ties to the earlier one).

    Args:
        entries: scored submissions (unscored ones are not passed).
        higher_is_better: the metric's order.
        closed: the owner closed the leaderboard: private scores rank and are shown.
        has_private: the hidden split has a private part.
        best_per_user: keep only each user's best row (by the ranking score).
    """
    by_private = closed and has_private

    def ranking_score(e: Entry) -> float:
        if by_private:
            return e.private_score if e.private_score is not None else math.nan
        return e.public_score

    ordered = sorted(entries, key=lambda e: _key(ranking_score(e), higher_is_better, e))
    if best_per_user:
        seen: set[str] = set()
        kept = []
        for e in ordered:
            if e.user not in seen:
                seen.add(e.user)
                kept.append(e)
        ordered = kept
    show_private = closed and has_private
    return [
        RankedEntry(
            rank=i,
            entry=e,
            score=ranking_score(e),
            public_score=e.public_score,
            private_score=e.private_score if show_private else None,
        )
        for i, e in enumerate(ordered, start=1)
    ]


def next_allowed(
    submitted: Sequence[datetime], *, limit: int | None, now: datetime
) -> datetime | None:
    """When the user may submit next: None when a submission is allowed *now*.

    *submitted* are the times of the user's earlier submissions to this dataset (any order).
    With ``limit`` N, a submission is allowed when fewer than N fall in the 24 hours before
    *now*; otherwise the next is allowed 24 hours after the oldest of the latest N. ``None``
    or a negative limit means no limit; 0 means none at all (returns ``datetime.max``).
    """
    if limit is None or limit < 0:
        return None
    if limit == 0:
        return datetime.max
    recent = sorted(t for t in submitted if now - DAY < t <= now)
    if len(recent) < limit:
        return None
    return recent[-limit] + DAY

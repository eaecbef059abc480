"""Leaderboard routes: submit a checkpoint, follow a submission, read a dataset's board.

- ``POST api/submissions`` ``{"session", "checkpoint"?}``: the caller's own session (or any,
  for an admin) whose first dataset has a metric and hidden test labels; the board must be
  open and the caller under its daily limit (a 429 names when the next one is allowed).
- ``GET api/submissions`` (the caller's; ``dataset=NAME``; admins ``all=1``) and
  ``GET api/submissions/{id}`` (its submitter or an admin; others get a 404).
- ``GET api/datasets/{name}/leaderboard`` (``all=1``: every submission, not each user's
  best): whoever may read the dataset; a 404 to others, as for the dataset itself.

Labels never leave the server: answers carry scores, and a failed evaluation's message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpu_scheduler.model import GPU_MILLI

from ..datasets import Caller, iso, readable
from ..evaluations import INPUTS_DIR, LABELS_FILE, EvaluationRunner
from ..models import Dataset, DatasetVersion, Submission
from ..ranking import Entry, next_allowed, rank
from ..schemas import (
    BoardOut,
    LeaderboardRow,
    SubmissionIn,
    SubmissionList,
    SubmissionOut,
)
from ..scoring import METRICS
from ..sessions import checkpoints, find
from .base import APIError, APIHandler, ServerContext
from .credits import admission
from .routes import Route


@dataclass
class LeaderboardService:
    """What the leaderboard handlers share beyond the server context."""

    runner: EvaluationRunner
    dataset_store: Any


def submission_out(row: Submission, closed: bool) -> SubmissionOut:
    return SubmissionOut(
        id=row.id,
        dataset=row.dataset_ref,
        user=row.user_name,
        session=row.session_name,
        checkpoint=row.checkpoint,
        state=row.state,  # type: ignore[arg-type]
        score=row.public_score,
        private_score=row.private_score if closed else None,
        message=row.message,
        node=row.node,
        submitted=iso(row.submitted) or "",
        started=iso(row.started),
        finished=iso(row.finished),
    )


def _utc(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


class _Handler(APIHandler):
    def initialize(self, ctx: ServerContext, service: LeaderboardService) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.service = service

    def caller(self) -> Caller:
        assert self.hub_user is not None
        return Caller(
            name=self.user_name,
            groups=frozenset(str(g) for g in self.hub_user.get("groups") or ()),
            is_admin=self.is_admin,
        )

    def flag(self, name: str) -> bool:
        return self.get_query_argument(name, "0") in ("1", "true")


class SubmissionsHandler(_Handler):
    """``GET``: the caller's submissions; ``POST``: submit a checkpoint (201)."""

    def get(self) -> None:
        everyone = self.flag("all")
        if everyone:
            self.require_admin()
        dataset = self.get_query_argument("dataset", None)
        with self.ctx.db.session() as s:
            q = select(Submission, Dataset.closed).join(
                Dataset, Dataset.id == Submission.dataset_id
            )
            if not everyone:
                q = q.where(Submission.user_name == self.user_name)
            if dataset:
                q = q.where(Dataset.name == dataset)
            rows = s.execute(q.order_by(Submission.submitted, Submission.id)).all()
            out = SubmissionList(submissions=[submission_out(r, closed) for r, closed in rows])
        self.write_json(out)

    def post(self) -> None:
        body = self.body_as(SubmissionIn)
        now = self.ctx.now()
        c = self.caller()
        with self.ctx.db.session() as s:
            session = find(s, body.session)
            if session is None or not (session.user_name == c.name or c.is_admin):
                raise APIError(404, f"No session {body.session} of yours.", "not_found")
            if not session.datasets:
                raise APIError(
                    409,
                    f"Session {session.name} ran on no dataset: a submission goes to the "
                    "leaderboard of the session's dataset (run with -d NAME).",
                    "conflict",
                )
            name = str(session.datasets[0]).split("@", 1)[0]
            ds = readable(s, c, name)
            version = self._test_version(s, ds)
            saved = checkpoints(s, session.id)
            if body.checkpoint is not None:
                chosen = next((x for x in saved if x.name == body.checkpoint), None)
                if chosen is None:
                    names = ", ".join(x.name for x in saved[-5:]) or "none"
                    raise APIError(
                        404,
                        f"Session {session.name} has no checkpoint {body.checkpoint!r} "
                        f"(latest: {names}).",
                        "not_found",
                    )
            elif saved:
                chosen = saved[-1]
            else:
                raise APIError(
                    409,
                    f"Session {session.name} saved no checkpoint: call nsml.save(...) in its "
                    "code, then submit.",
                    "conflict",
                )
            self._check_rules(s, ds, c.name, now)
            resources = dict(session.resources)
            if ds.eval_gpus is not None:
                resources["gpu_milli"] = ds.eval_gpus * GPU_MILLI
                resources["gpus"] = ds.eval_gpus
            admission(
                s, session.user_name, resources, "this evaluation", now, counts_as_session=False
            )
            row = Submission(
                dataset_id=ds.id,
                dataset_ref=f"{ds.name}@{version.version}",
                test_digest=version.test_digest,
                user_name=session.user_name,
                session_id=session.id,
                session_name=session.name,
                checkpoint=chosen.name,
                checkpoint_sha256=chosen.sha256,
                code_digest=session.code_digest,
                entry=session.entry,
                args=list(session.args),
                image=session.image,
                resources=resources,
                state="queued",
                gpu_ids=[],
                submitted=now,
            )
            s.add(row)
            s.flush()
            out = submission_out(row, ds.closed)
        self.service.runner.wake()
        self.write_json(out, 201)

    def _test_version(self, s: Session, ds: Dataset) -> DatasetVersion:
        """The newest version of *ds* whose hidden split has labels: the board's test set."""
        if not ds.metric:
            raise APIError(
                409,
                f"Dataset {ds.name} has no leaderboard: its owner sets a metric first "
                f"(`nsml dataset board {ds.name} --metric accuracy`).",
                "conflict",
            )
        if ds.metric == "custom" and not ds.scorer:
            raise APIError(
                409,
                f"Dataset {ds.name}'s metric is 'custom' but it has no scoring script; its "
                f"owner registers one (`nsml dataset board {ds.name} --scorer score.py`).",
                "conflict",
            )
        if ds.metric not in METRICS and ds.metric != "custom":
            raise APIError(
                409,
                f"Dataset {ds.name}'s metric {ds.metric!r} is not one this server computes "
                f"({', '.join(sorted(METRICS))}, or 'custom' with a scoring script); its "
                "owner must choose one.",
                "conflict",
            )
        versions = s.scalars(
            select(DatasetVersion)
            .where(DatasetVersion.dataset_id == ds.id, DatasetVersion.test_digest.is_not(None))
            .order_by(DatasetVersion.version.desc())
        ).all()
        store = self.service.dataset_store
        for v in versions:
            assert v.test_digest is not None
            paths = {e.path for e in store.load_manifest(v.test_digest)}
            if LABELS_FILE in paths and any(p.startswith(INPUTS_DIR) for p in paths):
                return v
        raise APIError(
            409,
            f"Dataset {ds.name} has no hidden test set with labels: its owner pushes one "
            f"(`nsml dataset push {ds.name} DIR --test-inputs INPUTS --test-labels "
            "LABELS.csv`).",
            "conflict",
        )

    def _check_rules(self, s: Session, ds: Dataset, user: str, now: datetime) -> None:
        if ds.closed:
            raise APIError(
                409,
                f"The leaderboard of {ds.name} is closed: it takes no more submissions.",
                "closed",
            )
        # One submission at a time per dataset past this point (PostgreSQL locks the row), so
        # that two at once cannot both pass the limit.
        s.execute(select(Dataset.id).where(Dataset.id == ds.id).with_for_update())
        times = s.scalars(
            select(Submission.submitted).where(
                Submission.dataset_id == ds.id, Submission.user_name == user
            )
        ).all()
        when = next_allowed(list(times), limit=ds.daily_limit, now=now)
        if when is None:
            return
        if when == datetime.max:
            raise APIError(
                429, f"The leaderboard of {ds.name} takes no submissions now.", "rate_limited"
            )
        raise APIError(
            429,
            f"You have made {ds.daily_limit} submission(s) to {ds.name} in the last 24 hours, "
            f"its limit; the next is allowed at {_utc(when)}.",
            "rate_limited",
        )


class SubmissionHandler(_Handler):
    """``GET api/submissions/{id}``: its submitter or an admin."""

    def get(self, sid: str) -> None:
        with self.ctx.db.session() as s:
            row = s.get(Submission, int(sid))
            if row is None or not (row.user_name == self.user_name or self.is_admin):
                raise APIError(404, f"No submission {sid} of yours.", "not_found")
            ds = s.get(Dataset, row.dataset_id)
            out = submission_out(row, bool(ds and ds.closed))
        self.write_json(out)


class LeaderboardHandler(_Handler):
    """``GET api/datasets/{name}/leaderboard``: ranked rows; readers of the dataset only."""

    def get(self, name: str) -> None:
        c = self.caller()
        every = self.flag("all")
        with self.ctx.db.session() as s:
            ds = readable(s, c, name)
            scored = s.scalars(
                select(Submission).where(
                    Submission.dataset_id == ds.id, Submission.state == "scored"
                )
            ).all()
            has_private = any(r.private_score is not None for r in scored)
            entries = [
                Entry(
                    id=r.id,
                    user=r.user_name,
                    session=r.session_name,
                    checkpoint=r.checkpoint,
                    submitted=r.submitted,
                    public_score=float(r.public_score if r.public_score is not None else "nan"),
                    private_score=r.private_score,
                )
                for r in scored
            ]
            rows = rank(
                entries,
                higher_is_better=bool(ds.higher_is_better),
                closed=ds.closed,
                has_private=has_private,
                best_per_user=not every,
            )
            out = BoardOut(
                dataset=ds.name,
                metric=ds.metric,
                higher_is_better=ds.higher_is_better,
                closed=ds.closed,
                has_private=has_private,
                daily_limit=ds.daily_limit,
                eval_timeout_s=ds.eval_timeout_s,
                eval_gpus=ds.eval_gpus,
                rows=[
                    LeaderboardRow(
                        rank=r.rank,
                        user=r.entry.user,
                        session=r.entry.session,
                        checkpoint=r.entry.checkpoint,
                        submission=r.entry.id,
                        score=r.score if math.isfinite(r.score) else None,
                        public_score=r.public_score,
                        private_score=r.private_score,
                        submitted=iso(r.entry.submitted) or "",
                        mine=r.entry.user == c.name,
                    )
                    for r in rows
                ],
            )
        self.write_json(out)


def leaderboard_routes(
    ctx: ServerContext | None, service: LeaderboardService | None
) -> list[Route]:
    """The routes of this module (paths as the OpenAPI document writes them)."""
    k = {"ctx": ctx, "service": service}
    return [
        Route("/submissions", SubmissionsHandler, k),
        Route("/submissions/{id}", SubmissionHandler, k),
        Route("/datasets/{name}/leaderboard", LeaderboardHandler, k),
    ]

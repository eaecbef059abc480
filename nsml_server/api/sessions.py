"""``api/code``, ``api/sessions/...``, ``api/events``: training sessions over REST.

Who may do what:

- the owner and hub admins: everything; other users: nothing on a private session (403),
  read and fork on a public one; the members of a team session's team (its JupyterHub
  group) read and fork it as a public one, and that team's team admins may also stop it;
- a *session token* (``nsmls_...``, given to the session's container only): report metrics,
  save and load checkpoints of its own session, and load the one checkpoint it was started
  from. Anything else answers 403.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session
from tornado import web

from gpu_scheduler.model import GPU_MILLI

from .. import levels
from ..artifacts import (
    CHECKPOINT_MAX_MEMBERS,
    ArtifactError,
    ArtifactStore,
    BlobWriter,
    may_run_code,
    record_code_upload,
    validate_checkpoint_archive,
)
from ..backends import BackendError
from ..credits import paying_team
from ..datasets import resolve_refs
from ..models import SESSION_ACTIVE_STATES, SESSION_STATES, SessionEvent, TrainingSession
from ..schemas import (
    CheckpointList,
    CodeOut,
    DiffOut,
    EventList,
    ExecIn,
    ExecOut,
    FileChangeOut,
    ForkIn,
    LogChunk,
    MetricsAccepted,
    MetricsBatchOut,
    MetricsOut,
    PlacementIn,
    SessionIn,
    SessionList,
    SessionPatch,
)
from ..session_runner import SessionRunner
from ..sessions import (
    RESUMABLE,
    TOKEN_PREFIX,
    SessionError,
    add_event,
    args_diff,
    checkpoint_out,
    checkpoints,
    create_session,
    event_out,
    find,
    find_checkpoint,
    format_name,
    hash_token,
    ingest_points,
    metric_series,
    metric_series_many,
    record_checkpoint,
    session_out,
    session_outs,
    session_team,
    transition,
    validate_checkpoint,
    validate_entry,
)
from .base import APIError, APIHandler, ServerContext
from .credits import admission
from .placements import allowed_image, spec_of
from .routes import Route

LOG_CHUNK_MAX = 4 * 1024 * 1024


@dataclass
class SessionService:
    """What the session handlers share beyond the server context."""

    runner: SessionRunner
    store: ArtifactStore
    default_image: str
    code_max_bytes: int = 100 * 1024 * 1024
    code_max_files: int = 10_000
    checkpoint_max_bytes: int = 20 * 1024**3
    checkpoint_max_members: int = CHECKPOINT_MAX_MEMBERS


def resolve_datasets(
    s: Session,
    user: str,
    groups: Sequence[str],
    is_admin: bool,
    refs: Sequence[str],
    resources: dict[str, Any],
) -> list[str]:
    """The datasets a session of *user* mounts, as concrete ``name@k`` (stored on the session).

    Checks names, versions and visibility like every other use of a dataset
    (:func:`nsml_server.datasets.resolve_refs`): a dataset the user may not read is a 404,
    nothing is queued. Puts them (with their bytes, the scheduler's locality signal) into
    the placement spec in *resources*.
    """
    resolved = resolve_refs(s, user, groups, is_admin, list(refs)) if refs else []
    resources["datasets"] = [{"ref": r.key, "bytes": r.bytes, "digest": r.digest} for r in resolved]
    return [r.key for r in resolved]


def resources_of(
    gpus: float, gpu_models: list[str], cpu: float, memory: str | int, image: str
) -> dict[str, Any]:
    """The stored resource ask (the placement spec plus ``gpus``), validated like a
    placement request."""
    spec = spec_of(
        PlacementIn(
            holder="session", gpus=gpus, gpu_models=gpu_models, cpu=cpu, memory=memory, image=image
        ),
        lambda refs: [],  # no datasets in this ask: resolve_datasets adds a session's
    )
    return {"gpus": spec["gpu_milli"] / GPU_MILLI, **spec}  # type: ignore[operator]


class SessionHandler(APIHandler):
    """Base of the session handlers: session lookup with access checks, session tokens."""

    #: Whether this endpoint accepts a session token (report, save, load).
    accepts_session_token = False

    def initialize(self, ctx: ServerContext, service: SessionService) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.service = service
        self.token_session_id: int | None = None

    async def authenticate(self) -> None:
        token = self._presented_token()
        if token is None or not token.startswith(TOKEN_PREFIX):
            await super().authenticate()
            return
        if not self.accepts_session_token:
            raise APIError(
                403,
                "A session token may only report metrics and save or load checkpoints of its "
                "own session; use a JupyterHub token for anything else.",
                "forbidden",
            )
        with self.ctx.db.session() as s:
            row = s.scalar(
                select(TrainingSession).where(TrainingSession.token_hash == hash_token(token))
            )
            if row is None or row.state not in SESSION_ACTIVE_STATES:
                raise APIError(
                    401,
                    "This session token is invalid or its session has ended.",
                    "unauthenticated",
                )
            self.token_session_id = row.id
            self.hub_user = {"name": row.user_name, "kind": "session", "admin": False}

    def _presented_token(self) -> str | None:
        auth = self.request.headers.get("Authorization", "")
        kind, _, value = auth.partition(" ")
        if kind.lower() in ("token", "bearer") and value.strip():
            return value.strip()
        return None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, SessionError | ArtifactError):
            self.set_status(exc.status)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps({"message": exc.message, "reason": exc.reason}))
            return
        if isinstance(exc, BackendError):
            self.set_status(409)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps({"message": exc.message, "reason": exc.reason}))
            return
        super().write_error(status_code, **kwargs)

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, SessionError | ArtifactError):
            status_code = exc.status
        elif isinstance(exc, BackendError):
            status_code = 409
        super().send_error(status_code, **kwargs)

    # ---- lookups -----------------------------------------------------------------------------

    @staticmethod
    def name_of(user: str, key: str, number: str) -> str:
        return format_name(user, key, int(number))

    def _get(self, s: Session, name: str) -> TrainingSession:
        row = find(s, name)
        if row is None:
            raise APIError(404, f"No session {name}.", "not_found")
        return row

    def _is_owner(self, row: TrainingSession) -> bool:
        if self.token_session_id is not None:
            return self.token_session_id == row.id
        return row.user_name == self.user_name or self.is_admin

    @property
    def groups(self) -> list[str]:
        """The caller's JupyterHub groups (teams); none for a session token."""
        if self.token_session_id is not None or self.hub_user is None:
            return []
        return [str(g) for g in self.hub_user.get("groups") or []]

    def readable(self, s: Session, name: str) -> TrainingSession:
        """The session when the caller may read it (owner, admin, a public session, or a
        team session of one of the caller's teams)."""
        row = self._get(s, name)
        self.check_readable(row)
        return row

    def check_readable(self, row: TrainingSession) -> None:
        """Raise 403 unless the caller may read *row* (owner, admin, a public session, or a
        team session of one of the caller's teams)."""
        if self.token_session_id is not None and self.token_session_id != row.id:
            raise APIError(403, f"A session token cannot read session {row.name}.", "forbidden")
        if self._is_owner(row) or row.visibility == "public":
            return
        if row.visibility == "team" and row.team is not None and row.team in self.groups:
            return
        raise APIError(403, f"Session {row.name} belongs to another user.", "forbidden")

    def owned(self, s: Session, name: str) -> TrainingSession:
        """The session when the caller may change it (owner or admin)."""
        row = self._get(s, name)
        if not self._is_owner(row):
            raise APIError(403, f"Session {name} belongs to another user.", "forbidden")
        return row

    def stoppable(self, s: Session, name: str) -> TrainingSession:
        """The session when the caller may stop it: the owner, an admin, or a team admin of
        the session's team (who may read it, too)."""
        row = self._get(s, name)
        if self._is_owner(row):
            return row
        if self.token_session_id is None and row.team is not None and row.visibility != "private":
            if levels.is_team_admin(s, row.team, self.user_name):
                return row
            self.check_readable(row)
            raise APIError(
                403,
                f"Only {row.user_name}, an admin or a team admin of team {row.team} may stop "
                f"session {name}.",
                "forbidden",
            )
        self.check_readable(row)
        raise APIError(
            403, f"Only {row.user_name} or an admin may stop session {name}.", "forbidden"
        )

    def _int_arg(self, name: str) -> int | None:
        """An integer query argument (its bounds are checked from the document first)."""
        raw = self.get_query_argument(name, None)
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            raise APIError(400, f"{name} must be an integer.", "bad_request") from None


class StreamedBody:
    """Mixin: a request body streamed into a :class:`BlobWriter`; a refusal while receiving
    (over the limit) is kept and raised by the method, so that it answers JSON."""

    writer: BlobWriter | None = None
    body_error: ArtifactError | None = None

    def data_received(self, chunk: bytes) -> None:
        if self.writer is None or self.body_error is not None:
            return
        try:
            self.writer.write(chunk)
        except ArtifactError as e:
            self.body_error = e

    def take_writer(self) -> BlobWriter:
        if self.body_error is not None:
            raise self.body_error
        assert self.writer is not None
        w, self.writer = self.writer, None
        return w

    def on_finish(self) -> None:
        if self.writer is not None:
            self.writer.abort()


@web.stream_request_body
class CodeHandler(StreamedBody, SessionHandler):
    """``POST api/code``: upload a code snapshot (a tar archive, gzip allowed) -> digest."""

    writer: BlobWriter | None = None

    async def prepare(self) -> None:
        await super().prepare()
        limit = self.service.code_max_bytes
        length = int(self.request.headers.get("Content-Length", "0") or 0)
        if length > limit:
            raise APIError(
                413,
                f"The code snapshot is {length} bytes, over the limit of {limit}; list large "
                "files in .nsmlignore and put data in a dataset.",
                "too_large",
            )
        self.request.connection.set_max_body_size(limit)  # type: ignore[union-attr]
        self.writer = self.service.store.writer(limit, "code snapshot")

    async def post(self) -> None:
        w = self.take_writer()
        try:
            snap = await asyncio.to_thread(
                self.service.store.ingest_code,
                w.spool(),
                max_bytes=self.service.code_max_bytes,
                max_files=self.service.code_max_files,
            )
        finally:
            w.abort()
        with self.ctx.db.session() as s:
            record_code_upload(s, self.user_name, snap.digest, self.ctx.now())
        self.write_json(CodeOut(digest=snap.digest, files=len(snap.files), bytes=snap.bytes), 201)


class SessionsHandler(SessionHandler):
    """``POST api/sessions`` (start); ``GET
    api/sessions[?state=&all=1&user=&teams=1&dataset=&limit=]`` (``teams=1``: also the team
    sessions of the caller's teams)."""

    def post(self) -> None:
        body = self.body_as(SessionIn)
        entry = validate_entry(body.entry)
        store = self.service.store
        # A digest is a name, not a capability: another user's snapshot is answered exactly
        # as one that does not exist.
        with self.ctx.db.session() as s:
            allowed = may_run_code(s, self.user_name, self.is_admin, body.code, self.groups)
        if not allowed or not store.has_code(body.code):
            raise APIError(
                404,
                f"No code snapshot {body.code}; upload it first (POST api/code).",
                "not_found",
            )
        if entry not in {f.path for f in store.code(body.code).files}:
            raise APIError(
                400,
                f"The entry point {entry!r} is not in the code snapshot; give a file of the "
                "uploaded folder, e.g. 'train.py'.",
                "bad_request",
            )
        image = allowed_image(
            self.ctx, body.image or self.service.default_image, self.service.default_image
        )
        resources = resources_of(body.gpus, body.gpu_models, body.cpu, body.memory, image)
        assert self.hub_user is not None
        groups = list(self.hub_user.get("groups") or [])
        now = self.ctx.now()
        with self.ctx.db.session() as s:
            datasets = resolve_datasets(
                s, self.user_name, groups, self.is_admin, body.datasets, resources
            )
            visibility, team = session_team(
                body.visibility,
                body.team,
                groups,
                paying_team(s, self.user_name, groups),
                is_admin=self.is_admin,
            )
            admission(
                s,
                self.user_name,
                resources,
                "this session",
                now,
                hub_admin=self.is_admin,
                opening_milli=self.ctx.default_credits_milli,
            )
            row = create_session(
                s,
                user=self.user_name,
                datasets=datasets,
                values={
                    "code_digest": body.code,
                    "entry": entry,
                    "args": list(body.args),
                    "image": image,
                    "resources": resources,
                    "memo": body.memo,
                    "visibility": visibility,
                    "team": team,
                    "restart_on_lost": body.restart_on_lost,
                },
                now=now,
            )
            add_event(s, row, "state", "queued", now, state="queued")
            out = session_out(s, row, now)
        self.service.runner.wake()
        self.write_json(out, 201)

    def get(self) -> None:
        state = self.get_query_argument("state", None)
        if state is not None and state not in (*SESSION_STATES, "active"):
            raise APIError(
                400,
                f"Invalid state {state!r}; valid: active, {', '.join(SESSION_STATES)}.",
                "bad_request",
            )
        everyone = self.get_query_argument("all", "0") in ("1", "true")
        user = self.get_query_argument("user", None)
        if everyone or (user is not None and user != self.user_name):
            self.require_admin()
        dataset = self.get_query_argument("dataset", None)
        try:
            limit = int(self.get_query_argument("limit", "200"))
        except ValueError:
            raise APIError(400, "limit must be an integer.", "bad_request") from None
        limit = max(1, min(limit, 10_000))
        q = select(TrainingSession).order_by(TrainingSession.id.desc()).limit(limit)
        teams = self.get_query_argument("teams", "0") in ("1", "true")
        if not everyone:
            mine = TrainingSession.user_name == (user or self.user_name)
            if teams and self.groups:
                q = q.where(
                    or_(
                        mine,
                        and_(
                            TrainingSession.visibility == "team",
                            TrainingSession.team.in_(self.groups),
                        ),
                    )
                )
            else:
                q = q.where(mine)
        if state == "active":
            q = q.where(TrainingSession.state.in_(SESSION_ACTIVE_STATES))
        elif state is not None:
            q = q.where(TrainingSession.state == state)
        if dataset is not None:
            q = q.where(TrainingSession.dataset_key == dataset)
        now = self.ctx.now()
        with self.ctx.db.session() as s:
            rows = list(s.scalars(q))[::-1]
            out = SessionList(sessions=session_outs(s, rows, now))
        self.write_json(out)


class SessionItemHandler(SessionHandler):
    """``GET``/``PATCH``/``DELETE api/sessions/USER/DATASET/N``."""

    def get(self, *name: str) -> None:
        with self.ctx.db.session() as s:
            out = session_out(s, self.readable(s, self.name_of(*name)), self.ctx.now())
        self.write_json(out)

    def patch(self, *name: str) -> None:
        patch = self.body_as(SessionPatch)
        with self.ctx.db.session() as s:
            row = self.owned(s, self.name_of(*name))
            if patch.memo is not None:
                row.memo = patch.memo
            if patch.visibility is not None or patch.team is not None:
                visibility = patch.visibility or ("team" if patch.team else row.visibility)
                # The session's team stays unless another is named (the caller need not
                # still be in it); a new team must be one of the caller's.
                kept = row.team if patch.team is None and visibility != "private" else None
                row.visibility, row.team = session_team(
                    visibility,
                    patch.team or kept,
                    [*self.groups, *([kept] if kept else [])],
                    None,
                    is_admin=self.is_admin,
                )
            s.flush()
            out = session_out(s, row, self.ctx.now())
        self.write_json(out)

    async def delete(self, *name: str) -> None:
        full = self.name_of(*name)
        with self.ctx.db.session() as s:
            row = self.owned(s, full)
            if row.state in SESSION_ACTIVE_STATES:
                raise APIError(
                    409,
                    f"Session {full} is {row.state}; stop it first (nsml stop {full}), "
                    "then remove it.",
                    "conflict",
                )
            sid = row.id
            s.delete(row)
        await asyncio.to_thread(
            _remove_tree, self.service.runner.session_dir(sid), self.service.runner.sessions_dir
        )
        self.set_status(204)
        self.finish()


def _remove_tree(path: Path, root: Path) -> None:
    """Delete a session's folder (never anything outside the sessions folder)."""
    if path != root and path.resolve().is_relative_to(root.resolve()):
        shutil.rmtree(path, ignore_errors=True)


class StopHandler(SessionHandler):
    """``POST api/sessions/NAME/stop``: SIGTERM, the grace period, then SIGKILL (202)."""

    def post(self, *name: str) -> None:
        full = self.name_of(*name)
        with self.ctx.db.session() as s:
            row = self.stoppable(s, full)
            if row.state in SESSION_ACTIVE_STATES and not row.stop_requested:
                row.stop_requested = True
                add_event(s, row, "notice", f"stop requested by {self.user_name}", self.ctx.now())
            s.flush()
            out = session_out(s, row, self.ctx.now())
        self.service.runner.wake()
        self.write_json(out, 202 if out.state in SESSION_ACTIVE_STATES else 200)


class ResumeHandler(SessionHandler):
    """``POST api/sessions/NAME/resume``: run an ended session again from its last checkpoint."""

    def post(self, *name: str) -> None:
        full = self.name_of(*name)
        now = self.ctx.now()
        with self.ctx.db.session() as s:
            row = self.owned(s, full)
            allowed_image(self.ctx, row.image, self.service.default_image)
            if row.state not in RESUMABLE:
                hint = "fork it instead" if row.state == "completed" else "stop it first"
                raise APIError(
                    409,
                    f"Session {full} is {row.state}; only {', '.join(RESUMABLE)} sessions can "
                    f"be resumed ({hint}).",
                    "conflict",
                )
            admission(
                s,
                row.user_name,
                row.resources,
                f"{row.name} again",
                now,
                hub_admin=self.is_admin,
                opening_milli=self.ctx.default_credits_milli,
            )
            saved = checkpoints(s, row.id)
            last = max(saved, key=lambda c: (c.created, c.id)) if saved else None
            load_from = f"{row.name}/{last.name}" if last else row.load_from
            moved = transition(
                s,
                row.id,
                RESUMABLE,
                "queued",
                attempt=row.attempt + 1,
                stop_requested=False,
                exit_code=None,
                reason=None,
                message=None,
                placement_id=None,
                node=None,
                gpu_ids=[],
                handle=None,
                started=None,
                finished=None,
                load_from=load_from,
            )
            if not moved:
                raise APIError(409, f"Session {full} changed meanwhile; try again.", "conflict")
            add_event(
                s,
                row,
                "state",
                f"resumed from {load_from}" if load_from else "resumed from the start",
                now,
                state="queued",
            )
            s.expire(row)
            out = session_out(s, s.get(TrainingSession, row.id), now)  # type: ignore[arg-type]
        self.service.runner.wake()
        self.write_json(out, 202)


class ForkHandler(SessionHandler):
    """``POST api/sessions/NAME/fork``: a new session from this one (and a checkpoint)."""

    def post(self, *name: str) -> None:
        body = self.body_as(ForkIn)
        full = self.name_of(*name)
        now = self.ctx.now()
        assert self.hub_user is not None
        with self.ctx.db.session() as s:
            parent = self.readable(s, full)
            if body.checkpoint is not None:
                validate_checkpoint(body.checkpoint)
                if find_checkpoint(s, parent.id, body.checkpoint) is None:
                    names = [c.name for c in checkpoints(s, parent.id)]
                    raise APIError(
                        404,
                        f"Session {full} has no checkpoint {body.checkpoint!r}; it has: "
                        f"{', '.join(names) or 'none'}.",
                        "not_found",
                    )
            res = dict(parent.resources)
            image = allowed_image(self.ctx, body.image or parent.image, self.service.default_image)
            if any(v is not None for v in (body.gpus, body.gpu_models, body.cpu, body.memory)) or (
                body.image and body.image != parent.image
            ):
                res = resources_of(
                    body.gpus if body.gpus is not None else float(res.get("gpus", 0)),
                    body.gpu_models if body.gpu_models is not None else res.get("gpu_models", []),
                    body.cpu if body.cpu is not None else res.get("cpu_milli", 1000) / 1000,
                    body.memory if body.memory is not None else int(res.get("memory_mib", 0)),
                    image,
                )
            groups = list(self.hub_user.get("groups") or [])
            datasets = resolve_datasets(
                s, self.user_name, groups, self.is_admin, parent.datasets, res
            )
            source = f"{parent.name}/{body.checkpoint}" if body.checkpoint else None
            admission(
                s,
                self.user_name,
                res,
                "this fork",
                now,
                hub_admin=self.is_admin,
                opening_milli=self.ctx.default_credits_milli,
            )
            child = create_session(
                s,
                user=self.user_name,
                datasets=datasets,
                values={
                    "code_digest": parent.code_digest,
                    "entry": parent.entry,
                    "args": list(body.args) if body.args is not None else list(parent.args),
                    "image": image,
                    "resources": res,
                    "memo": body.memo
                    if body.memo is not None
                    else f"forked from {source or parent.name}",
                    "visibility": "private",
                    "parent_id": parent.id,
                    "parent_name": parent.name,
                    "parent_checkpoint": body.checkpoint,
                    "load_from": source,
                    "restart_on_lost": parent.restart_on_lost
                    if body.restart_on_lost is None
                    else body.restart_on_lost,
                },
                now=now,
            )
            add_event(s, child, "state", f"queued (fork of {source or parent.name})", now, "queued")
            out = session_out(s, child, now)
        self.service.runner.wake()
        self.write_json(out, 201)


class LogsHandler(SessionHandler):
    """``GET api/sessions/NAME/logs[?offset=&limit=&tail=]``: the stored output."""

    def get(self, *name: str) -> None:
        with self.ctx.db.session() as s:
            row = self.readable(s, self.name_of(*name))
            sid, ended = row.id, row.state not in SESSION_ACTIVE_STATES
        path = self.service.runner.log_path(sid)
        try:
            offset = int(self.get_query_argument("offset", "0"))
            limit = int(self.get_query_argument("limit", str(LOG_CHUNK_MAX)))
            tail = self.get_query_argument("tail", None)
            tail_lines = int(tail) if tail is not None else None
        except ValueError:
            raise APIError(400, "offset, limit and tail must be integers.", "bad_request") from None
        limit = max(0, min(limit, LOG_CHUNK_MAX))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if tail_lines is not None:
            offset = _tail_offset(path, size, max(0, tail_lines))
        offset = max(0, min(offset, size))
        data = b""
        if size > offset:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(limit)
            # Never cut a UTF-8 character in two: stop before an incomplete sequence.
            cut = _utf8_boundary(data) if offset + len(data) < size else len(data)
            data = data[:cut]
        self.write_json(
            LogChunk(
                offset=offset,
                next_offset=offset + len(data),
                size=size,
                text=data.decode("utf-8", "replace"),
                complete=ended and offset + len(data) >= size,
            )
        )


def _utf8_boundary(data: bytes) -> int:
    """Length of *data* without a trailing incomplete UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return len(data) - back if need > back else len(data)
    return len(data)


def _tail_offset(path: Path, size: int, lines: int) -> int:
    """Byte offset where the last *lines* lines of the file begin."""
    if size == 0 or lines == 0:
        return size
    with path.open("rb") as f:
        pos, seen = size, 0
        block = 65536
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            end = len(chunk)
            if pos + end == size and chunk.endswith(b"\n"):
                end -= 1
            i = end
            while True:
                i = chunk.rfind(b"\n", 0, i)
                if i < 0:
                    break
                seen += 1
                if seen >= lines:
                    return pos + i + 1
    return 0


class SessionEventsHandler(SessionHandler):
    """``GET api/sessions/NAME/events``: the session's state changes and failures."""

    def get(self, *name: str) -> None:
        with self.ctx.db.session() as s:
            row = self.readable(s, self.name_of(*name))
            evs = list(
                s.scalars(
                    select(SessionEvent)
                    .where(SessionEvent.session_id == row.id)
                    .order_by(SessionEvent.id)
                )
            )
            out = EventList(events=[event_out(e) for e in evs], last_id=evs[-1].id if evs else 0)
        self.write_json(out)


class EventsHandler(SessionHandler):
    """``GET api/events[?since=ID&limit=N&all=1]``: the caller's event feed, oldest first."""

    def get(self) -> None:
        try:
            since = int(self.get_query_argument("since", "0"))
            limit = max(1, min(int(self.get_query_argument("limit", "100")), 1000))
        except ValueError:
            raise APIError(400, "since and limit must be integers.", "bad_request") from None
        everyone = self.get_query_argument("all", "0") in ("1", "true")
        if everyone:
            self.require_admin()
        q = (
            select(SessionEvent)
            .where(SessionEvent.id > since)
            .order_by(SessionEvent.id)
            .limit(limit)
        )
        if not everyone:
            q = q.where(SessionEvent.user_name == self.user_name)
        with self.ctx.db.session() as s:
            evs = list(s.scalars(q))
            out = EventList(
                events=[event_out(e) for e in evs], last_id=evs[-1].id if evs else since
            )
        self.write_json(out)


class MetricsHandler(SessionHandler):
    """``POST api/sessions/NAME/metrics`` (report); ``GET`` (last values and series).

    A batch with an id already stored is answered ``duplicate`` and not stored again; a
    session that has ended refuses points measured after its end (409 ``session_ended``).
    NaN and infinities travel as ``"nan"``, ``"inf"``, ``"-inf"``.
    """

    accepts_session_token = True

    def post(self, *name: str) -> None:
        try:
            raw = (self.request.body or b"").decode()
            data = json.loads(raw)
        except ValueError as e:
            raise APIError(400, f"The request body is not valid JSON: {e}", "bad_request") from e
        if not isinstance(data, dict):
            raise APIError(
                400,
                'Send {"steps": [...], "walls": [...], "values": {name: [...]}} or '
                '{"points": [[step, time, {name: value}], ...]}.',
                "bad_request",
            )
        with self.ctx.db.session() as s:
            row = self.owned(s, self.name_of(*name))
            done = ingest_points(s, row, data, self.ctx.now(), raw)
        self.write_json(MetricsAccepted(accepted=done.accepted, duplicate=done.duplicate))

    def get(self, *name: str) -> None:
        names_arg = self.get_query_argument("names", None)
        names = [n for n in names_arg.split(",") if n] if names_arg else None
        since, to, most = (self._int_arg(a) for a in ("since_step", "to_step", "max_points"))
        with self.ctx.db.session() as s:
            row = self.readable(s, self.name_of(*name))
            out = MetricsOut(
                session=row.name,
                last_step=row.last_step,
                last_metrics=dict(row.last_metrics or {}),
                points=row.points,
                series=metric_series(s, row, names, since, to_step=to, max_points=most),
            )
        self.write_json(out)


class MetricsBatchHandler(SessionHandler):
    """``GET api/metrics?sessions=A,B,...``: several sessions' metrics in one request and
    one database query (a comparison panel of 100 sessions asks once, not 100 times), with
    the same ``names``, ``since_step``, ``to_step`` and ``max_points`` as one session's.
    A session that is not there or not readable is named in ``errors``; the others answer.
    """

    #: The most sessions one request may name (the document also bounds their characters).
    MAX_SESSIONS = 500

    def get(self, *args: str) -> None:
        wanted = [n for n in self.get_query_argument("sessions", "").split(",") if n]
        if not wanted:
            raise APIError(400, "Name the sessions: sessions=USER/DATASET/N,...", "bad_request")
        if len(wanted) > self.MAX_SESSIONS:
            raise APIError(
                400,
                f"{len(wanted)} sessions named; ask for at most {self.MAX_SESSIONS} at once.",
                "bad_request",
            )
        wanted = list(dict.fromkeys(wanted))
        names_arg = self.get_query_argument("names", None)
        names = [n for n in names_arg.split(",") if n] if names_arg else None
        since, to, most = (self._int_arg(a) for a in ("since_step", "to_step", "max_points"))
        errors: dict[str, str] = {}
        with self.ctx.db.session() as s:
            found = {
                r.name: r
                for r in s.scalars(select(TrainingSession).where(TrainingSession.name.in_(wanted)))
            }
            rows: list[TrainingSession] = []
            for name in wanted:
                row = found.get(name)
                if row is None:
                    errors[name] = f"No session {name}."
                    continue
                try:
                    self.check_readable(row)
                except APIError as e:
                    errors[name] = e.message
                    continue
                rows.append(row)
            series = metric_series_many(
                s, [r.id for r in rows], names, since, to_step=to, max_points=most
            )
            out = MetricsBatchOut(
                metrics=[
                    MetricsOut(
                        session=r.name,
                        last_step=r.last_step,
                        last_metrics=dict(r.last_metrics or {}),
                        points=r.points,
                        series=series[r.id],
                    )
                    for r in rows
                ],
                errors=errors,
            )
        self.write_json(out)


class GpuUseHandler(SessionHandler):
    """``GET api/sessions/NAME/gpu``: the session's GPU use over time (see gpu_use.py)."""

    def get(self, *name: str) -> None:
        monitor = self.ctx.gpu_use
        if monitor is None:
            from ..gpu_use import GpuUseMonitor

            monitor = GpuUseMonitor()
        with self.ctx.db.session() as s:
            row = self.readable(s, self.name_of(*name))
            out = monitor.describe(s, row)
        self.write_json(out)


class CheckpointsHandler(SessionHandler):
    """``GET api/sessions/NAME/checkpoints``: the saved checkpoints, oldest first."""

    def get(self, *name: str) -> None:
        with self.ctx.db.session() as s:
            row = self.readable(s, self.name_of(*name))
            out = CheckpointList(
                checkpoints=[checkpoint_out(row, c) for c in checkpoints(s, row.id)]
            )
        self.write_json(out)


@web.stream_request_body
class CheckpointHandler(StreamedBody, SessionHandler):
    """``PUT api/sessions/NAME/checkpoints/CKPT[?step=N]`` (a tar archive of regular files and
    folders, gzip allowed; ``X-Checkpoint-SHA256`` optional); ``GET`` streams it back with
    that header."""

    accepts_session_token = True

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "PUT":
            return
        limit = self.service.checkpoint_max_bytes
        length = int(self.request.headers.get("Content-Length", "0") or 0)
        if length > limit:
            raise APIError(
                413, f"The checkpoint is {length} bytes, over the limit of {limit}.", "too_large"
            )
        user, key, number, ckpt = self.path_args
        validate_checkpoint(ckpt)
        with self.ctx.db.session() as s:
            self.owned(s, self.name_of(user, key, number))
        self.request.connection.set_max_body_size(limit)  # type: ignore[union-attr]
        self.writer = self.service.store.writer(limit, "checkpoint")

    async def put(self, user: str, key: str, number: str, ckpt: str) -> None:
        """Store the archive as checkpoint *ckpt* (replacing one of that name: a retried
        upload is idempotent). Refused unless it is a checkpoint archive (see
        :func:`validate_checkpoint_archive`) and, when the client sends
        ``X-Checkpoint-SHA256``, has that digest."""
        w = self.take_writer()
        try:
            step_arg = self.get_query_argument("step", None)
            try:
                step = int(step_arg) if step_arg not in (None, "") else None
            except ValueError:
                raise APIError(400, "step must be an integer.", "bad_request") from None
            if step is not None and abs(step) >= 2**62:
                raise APIError(400, f"step {step} is out of range.", "bad_request")
            await asyncio.to_thread(
                validate_checkpoint_archive,
                w.received(),
                max_bytes=self.service.checkpoint_max_bytes,
                max_members=self.service.checkpoint_max_members,
            )
            expected = self.request.headers.get("X-Checkpoint-SHA256", "").strip().lower()
            if expected and expected != w.digest():
                raise APIError(
                    400,
                    f"The checkpoint arrived damaged: its SHA-256 is {w.digest()}, the client "
                    f"sent {expected}; upload it again.",
                    "digest_mismatch",
                )
            sha, size = await asyncio.to_thread(w.commit)
        except BaseException:
            w.abort()
            raise
        with self.ctx.db.session() as s:
            row = self.owned(s, self.name_of(user, key, number))
            c = record_checkpoint(s, row, ckpt, sha, size, step, self.ctx.now())
            out = checkpoint_out(row, c)
        self.write_json(out, 201)

    def _loadable(self, s: Session, name: str, ckpt: str) -> TrainingSession:
        """A session token may load its own checkpoints and the one it was started from: of
        its parent, the very session it was forked from (a name is reused once a session is
        removed; the new session's checkpoints are not the parent's)."""
        if self.token_session_id is not None:
            me = s.get(TrainingSession, self.token_session_id)
            if me is not None and me.load_from == f"{name}/{ckpt}":
                row = self._get(s, name)
                if row.id in (me.id, me.parent_id):
                    return row
        return self.readable(s, name)

    async def get(self, user: str, key: str, number: str, ckpt: str) -> None:
        name = self.name_of(user, key, number)
        with self.ctx.db.session() as s:
            row = self._loadable(s, name, ckpt)
            c = find_checkpoint(s, row.id, ckpt)
            if c is None:
                names = [x.name for x in checkpoints(s, row.id)]
                raise APIError(
                    404,
                    f"Session {name} has no checkpoint {ckpt!r}; it has: "
                    f"{', '.join(names) or 'none'}.",
                    "not_found",
                )
            sha, size = c.sha256, c.size
        f = self.service.store.open(sha)
        stored = os.fstat(f.fileno()).st_size
        if stored != size:
            f.close()
            raise APIError(
                409,
                f"Checkpoint {ckpt!r} of {name} is damaged in the server's store ({stored} "
                f"bytes instead of {size}); it cannot be downloaded. Tell the operator; save it "
                "again if the session still runs.",
                "damaged",
            )
        self.set_header("Content-Type", "application/x-tar")
        self.set_header("Content-Length", str(size))
        self.set_header("X-Checkpoint-SHA256", sha)
        try:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                self.write(chunk)
                await self.flush()
        finally:
            f.close()
        self.finish()


class ExecHandler(SessionHandler):
    """``POST api/sessions/NAME/exec`` ``{"command": [...]}``: run a command in the container."""

    async def post(self, *name: str) -> None:
        body = self.body_as(ExecIn)
        full = self.name_of(*name)
        with self.ctx.db.session() as s:
            row = self.owned(s, full)
            if row.state != "running" or not row.handle or not row.node:
                raise APIError(409, f"Session {full} is {row.state}, not running.", "not_running")
            handle, node = row.handle, row.node
        backend = self.service.runner.backends.for_node(node)
        result = await backend.exec(handle, body.command, body.timeout_s)
        self.write_json(ExecOut(exit_code=result.exit_code, output=result.output))


class DiffHandler(SessionHandler):
    """``GET api/sessions/diff?a=NAME&b=NAME``: code, argument and setting differences."""

    def get(self) -> None:
        a_name = self.get_query_argument("a", None)
        b_name = self.get_query_argument("b", None)
        if not a_name or not b_name:
            raise APIError(
                400, "Give two sessions: ?a=USER/DATASET/N&b=USER/DATASET/N.", "bad_request"
            )
        with self.ctx.db.session() as s:
            a, b = self.readable(s, a_name), self.readable(s, b_name)
            fields: dict[str, dict[str, object]] = {}
            for label, va, vb in (
                ("entry", a.entry, b.entry),
                ("image", a.image, b.image),
                ("datasets", a.datasets, b.datasets),
                ("resources", _public_resources(a.resources), _public_resources(b.resources)),
                ("load_from", a.load_from, b.load_from),
            ):
                if va != vb:
                    fields[label] = {"a": va, "b": vb}
            a_args, b_args = list(a.args), list(b.args)
            a_code, b_code = a.code_digest, b.code_digest
        code = (
            []
            if a_code == b_code
            else [
                FileChangeOut(**c.to_json()) for c in self.service.store.diff_code(a_code, b_code)
            ]
        )
        self.write_json(
            DiffOut(
                a=a_name,
                b=b_name,
                args={"a": a_args, "b": b_args},
                args_diff=args_diff(a_args, b_args, a_name, b_name),
                fields=fields,
                code=code,
            )
        )


def _public_resources(res: dict[str, Any]) -> dict[str, Any]:
    return {
        "gpus": res.get("gpus", 0),
        "gpu_models": res.get("gpu_models", []),
        "cpu": res.get("cpu_milli", 0) / 1000,
        "memory_mib": res.get("memory_mib", 0),
    }


def session_routes(ctx: ServerContext | None, service: SessionService | None) -> list[Route]:
    """The routes of this module (paths as the OpenAPI document writes them)."""
    k = {"ctx": ctx, "service": service}
    n = "/sessions/{user}/{dataset}/{n}"
    return [
        Route("/code", CodeHandler, k),
        Route("/events", EventsHandler, k),
        Route("/metrics", MetricsBatchHandler, k),
        Route("/sessions", SessionsHandler, k),
        Route("/sessions/diff", DiffHandler, k),
        Route(n, SessionItemHandler, k),
        Route(n + "/stop", StopHandler, k),
        Route(n + "/resume", ResumeHandler, k),
        Route(n + "/fork", ForkHandler, k),
        Route(n + "/logs", LogsHandler, k),
        Route(n + "/events", SessionEventsHandler, k),
        Route(n + "/metrics", MetricsHandler, k),
        Route(n + "/gpu", GpuUseHandler, k),
        Route(n + "/checkpoints", CheckpointsHandler, k),
        Route(n + "/checkpoints/{checkpoint}", CheckpointHandler, k),
        Route(n + "/exec", ExecHandler, k),
    ]

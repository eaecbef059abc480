"""Training sessions: names, the state machine, tokens, and the records the API and the runner
share.

A session is named ``user/dataset/N``: the first dataset it mounts (``_`` when none) and a
number counted per user and dataset. Its state moves

    queued -> preparing -> running -> completed | failed | oom_killed | stopped | lost

(``queued`` and ``preparing`` may also end ``failed`` or ``stopped``; ``resume`` moves an
ended session back to ``queued``). Only the session runner moves a live session, with
conditional updates (:func:`transition`), so that two servers never both act on one change.

The pure helpers at the top (names, commands, environment, exit classification, metric
parsing) take plain values; the functions below them take a SQLAlchemy session and leave the
transaction to the caller.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
from sqlalchemy import CursorResult, case, func, null, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from nsml.downsample import downsample

from .credits import MILLI, SessionCredits, session_credits
from .models import (
    SESSION_ACTIVE_STATES,
    Gpu,
    Node,
    PlacementRequestRow,
    SessionCheckpoint,
    SessionEvent,
    SessionMetricChunk,
    TrainingSession,
)
from .schemas import (
    CheckpointOut,
    EventOut,
    MetricSeries,
    NonFinite,
    QueueOut,
    SessionOut,
    SessionResources,
)

log = logging.getLogger("nsml_server.sessions")

NO_DATASET = "_"
TOKEN_PREFIX = "nsmls_"
CODE_MOUNT = "/nsml/code"
DATA_ROOT = "/data"
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
METRIC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./:-]{0,127}$")
MAX_POINTS_PER_BATCH = 100_000
MAX_NAMES_PER_POINT = 256
#: Transitions the runner may make (``resume`` is the API's, from an ended state to queued).
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"preparing", "failed", "stopped"}),
    # ``queued`` again: lost with its node and asked to restart (node_loss.py).
    "preparing": frozenset({"running", "failed", "stopped", "lost", "queued"}),
    "running": frozenset({"completed", "failed", "oom_killed", "stopped", "lost", "queued"}),
}
#: Ended states a session can be resumed from.
RESUMABLE = ("stopped", "failed", "oom_killed", "lost")
FAILURE_STATES = ("failed", "oom_killed", "lost")


class SessionError(Exception):
    """A request about a session was refused: a status, a sentence, a stable reason."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


# ---- pure helpers ---------------------------------------------------------------------------


def dataset_name(ref: str) -> str:
    """``mnist@3`` -> ``mnist``."""
    return ref.partition("@")[0]


def dataset_key(datasets: Sequence[str]) -> str:
    """The middle part of a session name: the first dataset's name, or ``_``."""
    return dataset_name(datasets[0]) if datasets else NO_DATASET


def format_name(user: str, key: str, number: int) -> str:
    return f"{user}/{key}/{number}"


def validate_entry(entry: str) -> str:
    """A relative path inside the code snapshot, normalised.

    Raises:
        SessionError: 400 for an absolute path or one that leaves the snapshot.
    """
    parts = [p for p in entry.replace("\\", "/").split("/") if p not in ("", ".")]
    if entry.startswith("/") or not parts or ".." in parts:
        raise SessionError(
            400,
            f"entry {entry!r} must be a file inside the code snapshot, e.g. 'train.py'",
            "bad_request",
        )
    return "/".join(parts)


def session_command(entry: str, args: Sequence[str]) -> list[str]:
    """How the container runs the entry point: ``python -u`` for ``.py``, ``bash`` for ``.sh``,
    else the file itself (it must be executable)."""
    if entry.endswith(".py"):
        return ["python", "-u", entry, *args]
    if entry.endswith(".sh"):
        return ["bash", entry, *args]
    return [f"./{entry}", *args]


def session_env(
    *,
    name: str,
    session_id: int,
    api_url: str,
    token: str,
    datasets: Sequence[str],
    node: str,
    gpu_ids: Sequence[str],
    load_from: str | None,
    attempt: int,
) -> dict[str, str]:
    """The environment the ``nsml`` SDK reads inside a session container.

    ``NSML_DATASET_PATH`` is the first dataset's folder; ``NSML_DATASET_PATHS`` maps every
    dataset name to its folder (JSON). ``NSML_LOAD_FROM`` (``SESSION/CHECKPOINT``) makes
    ``nsml.bind`` load that checkpoint (a fork or a resume).
    """
    names = [dataset_name(d) for d in datasets]
    paths = {n: f"{DATA_ROOT}/{n}" for n in names}
    env = {
        "NSML_SESSION": name,
        "NSML_SESSION_ID": str(session_id),
        "NSML_API_URL": api_url,
        "NSML_TOKEN": token,
        "NSML_DATASETS": ",".join(datasets),
        "NSML_DATASET_PATH": paths[names[0]] if names else "",
        "NSML_DATASET_PATHS": json.dumps(paths),
        "NSML_NODE": node,
        "NSML_GPU_IDS": ",".join(gpu_ids),
        "NSML_ATTEMPT": str(attempt),
        "PYTHONUNBUFFERED": "1",
    }
    if load_from:
        env["NSML_LOAD_FROM"] = load_from
    return env


def format_mib(mib: int) -> str:
    """``2048`` -> ``2 GiB``; ``100`` -> ``100 MiB``."""
    if mib >= 1024 and mib % 1024 == 0:
        return f"{mib // 1024} GiB"
    if mib >= 1024:
        return f"{mib / 1024:.1f} GiB"
    return f"{mib} MiB"


def last_traceback(text: str, max_lines: int = 60) -> str | None:
    """The last Python traceback in *text* (up to *max_lines* lines), or None."""
    at = text.rfind("Traceback (most recent call last):")
    if at < 0:
        return None
    lines = text[at:].splitlines()
    block = [lines[0]]
    for line in lines[1:]:
        block.append(line)
        if line and not line.startswith((" ", "\t")) and not line.startswith("During handling"):
            # The exception line ends the block (chained tracebacks start a new block).
            if not line.startswith("Traceback"):
                break
    if len(block) > max_lines:
        block = [*block[:10], "  ...", *block[-(max_lines - 11) :]]
    return "\n".join(block)


@dataclass(frozen=True)
class Outcome:
    """How a session ended: its final state, a stable reason and a sentence."""

    state: str
    reason: str
    message: str


def classify_exit(
    *,
    exit_code: int | None,
    oom_killed: bool,
    stop_requested: bool,
    memory_mib: int,
    error: str | None = None,
    log_tail: str = "",
) -> Outcome:
    """The final state of a session whose container ended (pure)."""
    code = "unknown" if exit_code is None else str(exit_code)
    if stop_requested:
        return Outcome("stopped", "stopped", f"Stopped on request (exit code {code}).")
    if oom_killed:
        limit = f"its {format_mib(memory_mib)} memory limit" if memory_mib else "its memory limit"
        more = f" (e.g. --memory {max(1, memory_mib * 2 // 1024)}G)" if memory_mib else ""
        return Outcome(
            "oom_killed",
            "oom_killed",
            f"Out of memory: the session used more than {limit} and was killed (exit code "
            f"{code}). Run it again with more memory{more}, or use less.",
        )
    if exit_code == 0:
        return Outcome("completed", "completed", "Completed (exit code 0).")
    tb = last_traceback(log_tail)
    last = tb.splitlines()[-1].strip() if tb else ""
    detail = f": {last}" if last else ""
    if error:
        detail += f" ({error})"
    return Outcome("failed", "exit_code", f"Failed with exit code {code}{detail}.")


def args_diff(a: Sequence[str], b: Sequence[str], a_name: str = "a", b_name: str = "b") -> str:
    """A unified diff of two argument lists, one argument per line (``--lr 0.1`` pairs are
    kept on one line so that a changed value reads as one changed line)."""
    return "".join(
        line if line.endswith("\n") else line + "\n"
        for line in difflib.unified_diff(
            pair_args(a), pair_args(b), fromfile=a_name, tofile=b_name, lineterm=""
        )
    )


def pair_args(args: Sequence[str]) -> list[str]:
    """``["--lr", "0.1", "-v", "x"]`` -> ``["--lr 0.1", "-v x"]``: an option with its value."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if (
            a.startswith("-")
            and "=" not in a
            and i + 1 < len(args)
            and not args[i + 1].startswith("--")
        ):
            out.append(f"{a} {args[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def mint_token(session_id: int) -> tuple[str, str]:
    """A new session-scoped token and the hash to store (the token itself is never stored)."""
    token = f"{TOKEN_PREFIX}{session_id}_{secrets.token_urlsafe(32)}"
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def validate_checkpoint(name: str) -> str:
    if not CHECKPOINT_NAME.match(name):
        raise SessionError(
            400,
            f"Invalid checkpoint name {name!r}: use 1-128 letters, digits, '.', '_', '@', "
            "'+' or '-', starting with a letter or digit (e.g. 'epoch-3' or '3').",
            "bad_request",
        )
    return name


Point = tuple[int, float, dict[str, float | None]]
#: How NaN and infinities travel in JSON (which has no token for them): as these strings, in
#: request bodies (Python's ``NaN``/``Infinity`` tokens are accepted too) and in every answer.
NON_FINITE_IN: dict[str, float] = {
    "nan": math.nan,
    "NaN": math.nan,
    "inf": math.inf,
    "Infinity": math.inf,
    "-inf": -math.inf,
    "-Infinity": -math.inf,
}
MAX_BATCH_ID = 128


def metric_out(v: float) -> float | NonFinite:
    """A metric value as the API answers it: a finite number, or ``"nan"``, ``"inf"``,
    ``"-inf"`` (valid JSON, unlike the ``NaN`` token)."""
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"


def metric_in(v: object) -> float | None:
    """A reported value (number, null, or one of the strings of :data:`NON_FINITE_IN`) as a
    float (None: not reported). Raises ``ValueError`` for anything else."""
    if v is None:
        return None
    if type(v) is float or type(v) is int:
        return float(v)
    if isinstance(v, str) and v in NON_FINITE_IN:
        return NON_FINITE_IN[v]
    raise ValueError(v)


def parse_points(raw: object, next_step: int) -> list[Point]:
    """Validate report points as rows: ``[[step|null, wall_time, {"name": number|null}], ...]``.

    A null step continues from *next_step*. Values keep NaN and infinities (a diverged loss
    is information); null means "not reported".

    Raises:
        SessionError: 400 naming the first bad point (413 over the batch limit).
    """
    if not isinstance(raw, list):
        raise SessionError(
            400, "'points' must be a list of [step, time, {name: value}]", "bad_request"
        )
    if len(raw) > MAX_POINTS_PER_BATCH:
        raise SessionError(
            413, f"at most {MAX_POINTS_PER_BATCH} points per request, not {len(raw)}", "too_large"
        )
    out: list[Point] = []
    step = next_step
    known: set[str] = set()
    for i, p in enumerate(raw):
        if not (isinstance(p, list) and len(p) == 3 and isinstance(p[2], dict)):
            raise SessionError(
                400,
                f"point {i}: expected [step, time, {{name: value}}], got {p!r:.100}",
                "bad_request",
            )
        s, wall, values = p
        if s is None:
            s = step
        elif isinstance(s, bool) or not isinstance(s, int) or abs(s) >= 2**62:
            raise SessionError(400, f"point {i}: step {s!r:.40} is not an integer", "bad_request")
        if isinstance(wall, bool) or not isinstance(wall, int | float) or not math.isfinite(wall):
            raise SessionError(400, f"point {i}: time {wall!r:.40} is not a number", "bad_request")
        if len(values) > MAX_NAMES_PER_POINT:
            raise SessionError(
                400, f"point {i}: at most {MAX_NAMES_PER_POINT} metrics per point", "bad_request"
            )
        clean: dict[str, float | None] = {}
        for k, v in values.items():
            if k not in known:
                _check_metric_name(k, f"point {i}")
                known.add(k)
            try:
                clean[k] = metric_in(v)
            except ValueError:
                raise SessionError(
                    400, f"point {i}: {k}={v!r:.40} is not a number", "bad_request"
                ) from None
        out.append((s, float(wall), clean))
        step = s + 1
    return out


def _check_metric_name(name: object, where: str) -> None:
    if not isinstance(name, str) or not METRIC_NAME.match(name):
        raise SessionError(
            400,
            f"{where}: metric name {name!r:.60} must be 1-128 letters, digits, '_', '.', '/', "
            "':' or '-'",
            "bad_request",
        )


@dataclass(frozen=True)
class Columns:
    """One batch of report points in columns: ``steps[i]``, ``walls[i]`` and, per metric,
    ``values[name][i]`` (None: not reported at that step; NaN and infinities are kept).
    ``batch`` is the sender's id for the batch (a retry carries the same), or None."""

    steps: list[int]
    walls: list[float]
    values: dict[str, list[float | None]]
    batch: str | None = None

    def to_json(self) -> str:
        head = {"batch": self.batch} if self.batch is not None else {}
        values = {
            k: [None if v is None else metric_out(v) for v in col] for k, col in self.values.items()
        }
        return json.dumps(
            {**head, "steps": self.steps, "walls": self.walls, "values": values},
            separators=(",", ":"),
            allow_nan=False,
        )


_NUMBER_TYPES = frozenset({int, float})
_VALUE_TYPES = frozenset({int, float, type(None)})


def columns_of_rows(points: list[Point], batch: str | None = None) -> Columns:
    steps = [p[0] for p in points]
    walls = [p[1] for p in points]
    values: dict[str, list[float | None]] = {}
    for i, (_, _, vals) in enumerate(points):
        for k, v in vals.items():
            col = values.get(k)
            if col is None:
                col = values[k] = [None] * len(points)
            col[i] = v
    return Columns(steps, walls, values, batch)


def parse_batch_id(raw: object) -> str | None:
    """The optional ``batch`` id of a report batch (1-128 printable characters).

    Raises:
        SessionError: 400 for anything else.
    """
    if raw is None:
        return None
    if (
        not isinstance(raw, str)
        or not 0 < len(raw) <= MAX_BATCH_ID
        or not raw.isprintable()
        or raw != raw.strip()
    ):
        raise SessionError(
            400,
            f"batch must be an id of 1-{MAX_BATCH_ID} printable characters, not {raw!r:.60}",
            "bad_request",
        )
    return raw


def parse_columns(data: Mapping[str, object]) -> Columns:
    """Validate a batch sent as columns: ``{"batch": id (optional), "steps": [int], "walls":
    [number], "values": {"name": [number|null|"nan"|"inf"|"-inf"]}}`` with every list as long
    as ``steps``.

    Raises:
        SessionError: 400 naming what is wrong (413 over the batch limit).
    """
    extra = set(data) - {"batch", "steps", "walls", "values"}
    if extra:
        raise SessionError(400, f"unknown field(s): {', '.join(sorted(extra))}", "bad_request")
    steps, walls, values = data.get("steps"), data.get("walls"), data.get("values")
    if not isinstance(steps, list) or not isinstance(walls, list) or not isinstance(values, dict):
        raise SessionError(
            400,
            'send {"steps": [int], "walls": [number], "values": {"name": [number|null]}}',
            "bad_request",
        )
    n = len(steps)
    if n > MAX_POINTS_PER_BATCH:
        raise SessionError(
            413, f"at most {MAX_POINTS_PER_BATCH} points per request, not {n}", "too_large"
        )
    if not set(map(type, steps)) <= {int} or (
        n and (max(steps) >= 2**62 or min(steps) <= -(2**62))
    ):
        raise SessionError(400, "steps must be integers", "bad_request")
    if len(walls) != n or not set(map(type, walls)) <= _NUMBER_TYPES:
        raise SessionError(400, f"walls must be {n} numbers, one per step", "bad_request")
    if not all(map(math.isfinite, walls)):
        raise SessionError(400, "walls must be finite times", "bad_request")
    if len(values) > MAX_NAMES_PER_POINT:
        raise SessionError(400, f"at most {MAX_NAMES_PER_POINT} metrics per batch", "bad_request")
    for name, col in values.items():
        _check_metric_name(name, "values")
        if not isinstance(col, list) or len(col) != n:
            raise SessionError(
                400, f"values[{name!r}] must be a list of {n} numbers or nulls", "bad_request"
            )
        if not set(map(type, col)) <= _VALUE_TYPES:
            try:
                values[name] = col = [metric_in(v) for v in col]
            except ValueError:
                raise SessionError(
                    400,
                    f"values[{name!r}] holds something not a number (numbers, null, or "
                    '"nan", "inf", "-inf")',
                    "bad_request",
                ) from None
    return Columns(steps, walls, values, parse_batch_id(data.get("batch")))


def iso(t: datetime | None) -> str | None:
    return t.isoformat() + "Z" if t else None


def session_team(
    visibility: str | None,
    team: str | None,
    groups: Sequence[str],
    billing_team: str | None,
    *,
    is_admin: bool = False,
) -> tuple[str, str | None]:
    """``(visibility, team)`` of a new session (or of a session's change of visibility).

    *team* names the JupyterHub group whose members read the session and whose team admins
    may stop it: one of the caller's *groups* (a hub admin may name any). Without one, a
    session is a team session of *billing_team* (the team whose pool pays for the caller's
    work, or None) unless *visibility* says otherwise; a public session keeps that team for
    its team admins. ``private`` with a team is refused (a private session has none).
    """
    if team is not None and team not in groups and not is_admin:
        mine = ", ".join(sorted(groups)) or "none"
        raise SessionError(
            403,
            f"You are not a member of team {team!r} (a JupyterHub group); your groups: {mine}.",
            "forbidden",
        )
    if visibility == "private":
        if team is not None:
            raise SessionError(
                400,
                f"A private session has no team; give --team {team} without --private, or "
                "--private alone.",
                "bad_request",
            )
        return "private", None
    chosen = team if team is not None else billing_team
    if visibility == "public":
        return "public", chosen
    if chosen is None:
        if visibility == "team":
            mine = ", ".join(sorted(groups)) or "none"
            raise SessionError(
                400,
                f"Name the team that reads this session: --team TEAM (your groups: {mine}).",
                "bad_request",
            )
        return "private", None
    return "team", chosen


# ---- records ----------------------------------------------------------------------------------


def create_session(
    s: Session,
    *,
    user: str,
    datasets: Sequence[str],
    values: Mapping[str, Any],
    now: datetime,
    retries: int = 10,
) -> TrainingSession:
    """Insert a queued session ``user/dataset/N`` with the next N for that user and dataset.

    Concurrent creations race for N; the unique constraint decides and the loser retries.
    """
    key = dataset_key(datasets)
    for _ in range(retries):
        number = (
            s.scalar(
                select(func.max(TrainingSession.number)).where(
                    TrainingSession.user_name == user, TrainingSession.dataset_key == key
                )
            )
            or 0
        ) + 1
        row = TrainingSession(
            name=format_name(user, key, number),
            user_name=user,
            dataset_key=key,
            number=number,
            state="queued",
            datasets=list(datasets),
            created=now,
            **values,
        )
        try:
            with s.begin_nested():
                s.add(row)
                s.flush()
        except IntegrityError:
            continue
        return row
    raise SessionError(503, "Too many sessions were created at once; try again.", "busy")


def find(s: Session, name: str) -> TrainingSession | None:
    return s.scalar(select(TrainingSession).where(TrainingSession.name == name))


def transition(
    s: Session,
    session_id: int,
    from_states: Iterable[str],
    to: str,
    *,
    at_attempt: int | None = None,
    **values: Any,
) -> bool:
    """Move the session to *to* if it is in one of *from_states* (and at attempt
    *at_attempt*, when given: a late step of an earlier attempt moves nothing); True when it
    moved."""
    cond = [TrainingSession.id == session_id, TrainingSession.state.in_(tuple(from_states))]
    if at_attempt is not None:
        cond.append(TrainingSession.attempt == at_attempt)
    result = s.execute(
        update(TrainingSession)
        .where(*cond)
        .values(state=to, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(cast(CursorResult[Any], result).rowcount)


def add_event(
    s: Session,
    row: TrainingSession,
    kind: str,
    message: str,
    now: datetime,
    state: str | None = None,
) -> SessionEvent:
    ev = SessionEvent(
        session_id=row.id,
        session_name=row.name,
        user_name=row.user_name,
        kind=kind,
        state=state,
        message=message,
        created=now,
    )
    s.add(ev)
    return ev


def event_out(ev: SessionEvent) -> EventOut:
    return EventOut(
        id=ev.id,
        session=ev.session_name,
        user=ev.user_name,
        kind=ev.kind,  # type: ignore[arg-type]
        state=ev.state,  # type: ignore[arg-type]
        message=ev.message,
        created=iso(ev.created) or "",
    )


def session_outs(s: Session, rows: Sequence[TrainingSession], now: datetime) -> list[SessionOut]:
    """:func:`session_out` of each row, their credit figures read for all of them at once."""
    figures = session_credits(s, [(r.id, r.placement_id) for r in rows])
    return [session_out(s, r, now, figures.get(r.id)) for r in rows]


def session_out(
    s: Session, row: TrainingSession, now: datetime, figures: SessionCredits | None = None
) -> SessionOut:
    """The API's view of *row*; *figures* (its credits) are read when not given."""
    if figures is None:
        figures = session_credits(s, [(row.id, row.placement_id)]).get(row.id)
    res = row.resources or {}
    queue = None
    if row.state == "queued" and row.placement_id is not None:
        p = s.get(PlacementRequestRow, row.placement_id)
        if p is not None and p.state == "waiting":
            queue = QueueOut(position=p.position, code=p.code, reason=p.message)
    gpu_use: list[dict[str, object]] = []
    if row.state == "running" and row.node and row.gpu_ids:
        indices = [int(g) for g in row.gpu_ids if str(g).isdigit()]
        gpu_use = [
            {
                "index": g.index,
                "utilization_pct": g.utilization_pct,
                "memory_used_mib": g.memory_used_mib,
            }
            for g in s.scalars(
                select(Gpu)
                .join(Node, Gpu.node_id == Node.id)
                .where(Node.name == row.node, Gpu.index.in_(indices))
                .order_by(Gpu.index)
            )
        ]
    end = row.finished or (now if row.started else None)
    return SessionOut(
        name=row.name,
        id=row.id,
        user=row.user_name,
        state=row.state,  # type: ignore[arg-type]
        visibility=row.visibility,  # type: ignore[arg-type]
        team=row.team,
        entry=row.entry,
        args=list(row.args),
        image=row.image,
        datasets=list(row.datasets),
        code=row.code_digest,
        resources=SessionResources(
            gpus=float(res.get("gpus", 0)),
            gpu_models=list(res.get("gpu_models", [])),
            cpu=float(res.get("cpu_milli", 0)) / 1000,
            memory_mib=int(res.get("memory_mib", 0)),
        ),
        node=row.node,
        gpu_ids=[str(g) for g in row.gpu_ids or []],
        gpu_use=gpu_use,
        exit_code=row.exit_code,
        reason=row.reason,
        message=row.message,
        queue=queue,
        stop_requested=row.stop_requested,
        parent=row.parent_name,
        parent_checkpoint=row.parent_checkpoint,
        load_from=row.load_from,
        attempt=row.attempt,
        restart_on_lost=row.restart_on_lost,
        memo=row.memo,
        last_step=row.last_step,
        last_metrics=dict(row.last_metrics or {}),
        points=row.points,
        created=iso(row.created) or "",
        started=iso(row.started),
        finished=iso(row.finished),
        duration_s=(end - row.started).total_seconds() if end and row.started else None,
        credits_used=figures.used_milli / MILLI if figures is not None else None,
        credit_rate=(
            figures.rate_milli / MILLI
            if figures is not None and figures.rate_milli is not None
            else None
        ),
    )


@dataclass(frozen=True)
class Ingested:
    """What :func:`ingest_points` did: points stored now, or a repeat of a stored batch."""

    accepted: int
    duplicate: bool = False


def ingest_points(
    s: Session, row: TrainingSession, data: Mapping[str, object], now: datetime, raw: str = ""
) -> Ingested:
    """Store one batch of report points (rows or columns) as one chunk and update the
    session's last metrics. *raw* is the request body: a valid column batch is stored as sent.

    - A batch with an id (``batch``) that this session already stored is not stored again
      (a sender retried it because the answer was lost): ``duplicate`` is True.
    - A session that has ended takes only points measured before its end (every ``walls``
      time at or before ``finished``: sent late because the server was unreachable); others
      are refused.

    Raises:
        SessionError: 400 for a bad batch; 409 (``session_ended``) for points of an ended
            session measured after its end.
    """
    if "points" in data:
        if set(data) - {"batch"} != {"points"}:
            raise SessionError(400, "send either points or columns, not both", "bad_request")
        next_step = 0 if row.last_step is None else row.last_step + 1
        cols = columns_of_rows(
            parse_points(data["points"], next_step), parse_batch_id(data.get("batch"))
        )
        text = cols.to_json()
    else:
        cols = parse_columns(data)
        text = raw or cols.to_json()
    n = len(cols.steps)
    if not n:
        return Ingested(0)
    first, top = min(cols.steps), max(cols.steps)
    if cols.batch is not None and _stored_batch(s, row.id, cols.batch):
        return Ingested(n, duplicate=True)
    if row.state not in SESSION_ACTIVE_STATES:
        end = row.finished.replace(tzinfo=UTC).timestamp() if row.finished else None
        if end is None or max(cols.walls) > end:
            raise SessionError(
                409,
                f"Session {row.name} has ended ({row.state}); it takes no more report points "
                f"(only points measured before its end, {iso(row.finished) or 'unknown'}, "
                "that arrive late).",
                "session_ended",
            )
    last = dict(row.last_metrics or {})
    for name, col in cols.values.items():
        for v in reversed(col):
            if v is not None:
                last[name] = metric_out(float(v))
                break
    try:
        with s.begin_nested():  # a retry of the batch stored by another server meanwhile
            s.add(
                SessionMetricChunk(
                    session_id=row.id,
                    first_step=first,
                    last_step=top,
                    count=n,
                    payload=text,
                    arrays=encode_arrays(cols),
                    created=now,
                    batch=cols.batch,
                )
            )
            s.flush()
    except IntegrityError:
        return Ingested(n, duplicate=True)
    s.execute(
        update(TrainingSession)
        .where(TrainingSession.id == row.id)
        .values(
            last_metrics=last,
            last_step=top if row.last_step is None else max(top, row.last_step),
            points=TrainingSession.points + n,
        )
        .execution_options(synchronize_session=False)
    )
    return Ingested(n)


def _stored_batch(s: Session, session_id: int, batch: str) -> bool:
    """Whether the session holds the chunk with batch id *batch* (a retry repeats its id)."""
    q = select(SessionMetricChunk.id).where(
        SessionMetricChunk.session_id == session_id, SessionMetricChunk.batch == batch
    )
    return s.scalar(q) is not None


def metric_series(
    s: Session,
    row: TrainingSession,
    names: Sequence[str] | None = None,
    since_step: int | None = None,
    *,
    to_step: int | None = None,
    max_points: int | None = None,
) -> dict[str, MetricSeries]:
    """Per-metric series (steps, values, times) in report order; NaN and infinities are the
    strings ``"nan"``, ``"inf"``, ``"-inf"`` (see :func:`metric_out`).

    *since_step* / *to_step* keep the points of that step range (a zoomed plot asks for
    exact points there). *max_points* downsamples each series to at most that many points
    (:func:`nsml.downsample.downsample`: the curve's shape, its extremes and every NaN or
    infinity kept); ``total`` says how many points the series had before.
    """
    return metric_series_many(
        s, [row.id], names, since_step, to_step=to_step, max_points=max_points
    )[row.id]


def metric_series_many(
    s: Session,
    session_ids: Sequence[int],
    names: Sequence[str] | None = None,
    since_step: int | None = None,
    *,
    to_step: int | None = None,
    max_points: int | None = None,
) -> dict[int, dict[str, MetricSeries]]:
    """:func:`metric_series` of several sessions (by id) in one query: what a comparison
    panel of many sessions asks for at once."""
    c = SessionMetricChunk
    # The arrays where a batch has them; its JSON only where it has none (an older batch).
    q = select(c.session_id, c.arrays, case((c.arrays.is_(None), c.payload), else_=null())).where(
        c.session_id.in_(list(session_ids))
    )
    if since_step is not None:
        q = q.where(c.last_step >= since_step)
    if to_step is not None:
        q = q.where(c.first_step <= to_step)
    wanted = set(names) if names else None
    parts: dict[int, dict[str, list[tuple[Any, Any, Any]]]] = {i: {} for i in session_ids}
    for sid, arrays, payload in s.execute(q.order_by(c.id)):
        chunk = decode_arrays(arrays) if arrays is not None else chunk_columns(payload)
        in_range = np.ones(len(chunk.steps), dtype=bool)
        if since_step is not None:
            in_range &= chunk.steps >= since_step
        if to_step is not None:
            in_range &= chunk.steps <= to_step
        mine = parts[sid]
        for name, (present, values) in chunk.values.items():
            if wanted is not None and name not in wanted:
                continue
            keep = in_range if present is None else in_range & present
            mine.setdefault(name, []).append((chunk.steps[keep], values[keep], chunk.walls[keep]))
    return {
        sid: {name: _series(pieces, max_points) for name, pieces in by_name.items()}
        for sid, by_name in parts.items()
    }


def _series(pieces: Sequence[tuple[Any, Any, Any]], max_points: int | None) -> MetricSeries:
    """One metric's series from its pieces (steps, values, times) in report order."""
    steps = np.concatenate([p[0] for p in pieces])
    values = np.concatenate([p[1] for p in pieces])
    walls = np.concatenate([p[2] for p in pieces])
    total = len(steps)
    if max_points is not None and total > max_points:
        idx = np.asarray(downsample(steps, values, max_points), dtype=np.intp)
        steps, values, walls = steps[idx], values[idx], walls[idx]
    return MetricSeries(
        steps=steps.tolist(), values=values_out(values), walls=walls.tolist(), total=total
    )


@dataclass(frozen=True)
class ChunkColumns:
    """A stored report batch as arrays: ``values[name] = (present, floats)`` where
    *present* is None when the metric was reported at every step of the batch."""

    steps: Any
    walls: Any
    values: dict[str, tuple[Any, Any]]

    @property
    def size(self) -> int:
        return len(self.steps) * (2 + len(self.values))


def decode_chunk(payload: str) -> ChunkColumns:
    """A stored batch (columns, as sent) as arrays; NaN and infinities (as strings or
    Python's tokens) as floats, a null (not reported) marked absent."""
    chunk = json.loads(payload)
    values: dict[str, tuple[Any, Any]] = {}
    for name, col in chunk["values"].items():
        present = None
        if None in col:  # not reported at that step
            present = np.fromiter((v is not None for v in col), bool, len(col))
        # numbers, None (NaN, masked above) and "nan"/"inf"/"-inf"/"Infinity"... as floats
        values[name] = (present, np.array(col, dtype=np.float64))
    return ChunkColumns(
        np.asarray(chunk["steps"], dtype=np.int64),
        np.asarray(chunk["walls"], dtype=np.float64),
        values,
    )


_ARRAYS_MAGIC = b"NSMLARR1"


def encode_arrays(cols: Columns) -> bytes:
    """A batch's columns as bytes that :func:`decode_arrays` reads without parsing: a
    header (magic, length, JSON naming the metrics), then little-endian int64 steps, float64
    times, and per metric float64 values (NaN where not reported) followed, when some step
    lacks the metric, by one byte per step saying which have it."""
    n = len(cols.steps)
    parts = [np.asarray(cols.steps, dtype="<i8").tobytes(), np.asarray(cols.walls, "<f8").tobytes()]
    names: list[list[Any]] = []
    for name, col in cols.values.items():
        partial = None in col
        names.append([name, partial])
        parts.append(np.array(col, dtype="<f8").tobytes())  # None -> NaN
        if partial:
            parts.append(np.fromiter((v is not None for v in col), bool, n).tobytes())
    head = json.dumps({"n": n, "values": names}, separators=(",", ":")).encode()
    return b"".join([_ARRAYS_MAGIC, len(head).to_bytes(4, "little"), head, *parts])


def decode_arrays(blob: bytes) -> ChunkColumns:
    """The :class:`ChunkColumns` of :func:`encode_arrays`' bytes (arrays read in place)."""
    if blob[: len(_ARRAYS_MAGIC)] != _ARRAYS_MAGIC:
        raise ValueError("not a metric arrays blob")
    at = len(_ARRAYS_MAGIC)
    size = int.from_bytes(blob[at : at + 4], "little")
    at += 4
    head = json.loads(blob[at : at + size])
    at += size
    n = int(head["n"])
    buf = memoryview(blob)

    def take(dtype: str, width: int) -> Any:
        nonlocal at
        arr = np.frombuffer(buf, dtype=dtype, count=n, offset=at)
        at += width * n
        return arr

    steps, walls = take("<i8", 8), take("<f8", 8)
    values: dict[str, tuple[Any, Any]] = {}
    for name, partial in head["values"]:
        vals = take("<f8", 8)
        values[str(name)] = (take("?", 1) if partial else None, vals)
    if at != len(blob):
        raise ValueError("metric arrays blob of the wrong length")
    return ChunkColumns(steps, walls, values)


class ChunkCache:
    """Decoded report batches, least recently used first out, at most *max_values* numbers
    (steps, times and values) in all. Thread-safe."""

    def __init__(self, max_values: int) -> None:
        self.max_values = max_values
        self._items: OrderedDict[tuple[Any, ...], ChunkColumns] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> ChunkColumns | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: tuple[Any, ...], value: ChunkColumns) -> None:
        if value.size > self.max_values:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._size += value.size
            while self._size > self.max_values:
                _, old = self._items.popitem(last=False)
                self._size -= old.size


#: Decoded batches of this process: plotting the same sessions again, zooming (a range
#: re-reads its batches) and live refreshes skip the JSON decoding (~1 ms per 1,000 points).
#: 4 million numbers: about 32 MB of arrays.
CHUNK_CACHE = ChunkCache(4_000_000)


def chunk_columns(payload: str) -> ChunkColumns:
    """A stored batch decoded (:func:`decode_chunk`), from :data:`CHUNK_CACHE` when it was
    decoded before (the key is the payload's length and hash: a batch never changes, and
    another batch is another key)."""
    key = (len(payload), hash(payload))
    found = CHUNK_CACHE.get(key)
    if found is None:
        found = decode_chunk(payload)
        CHUNK_CACHE.put(key, found)
    return found


def values_out(values: Any) -> list[float | NonFinite]:
    """Metric values (a float array) as the API answers them: NaN and infinities as the
    strings of :func:`metric_out`."""
    out: list[float | NonFinite] = values.tolist()
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        out[i] = metric_out(float(values[i]))
    return out


def checkpoint_out(row: TrainingSession, c: SessionCheckpoint) -> CheckpointOut:
    return CheckpointOut(
        session=row.name,
        name=c.name,
        size=c.size,
        sha256=c.sha256,
        step=c.step,
        created=iso(c.created) or "",
    )


def checkpoints(s: Session, session_id: int) -> list[SessionCheckpoint]:
    return list(
        s.scalars(
            select(SessionCheckpoint)
            .where(SessionCheckpoint.session_id == session_id)
            .order_by(SessionCheckpoint.created, SessionCheckpoint.id)
        )
    )


def find_checkpoint(s: Session, session_id: int, name: str) -> SessionCheckpoint | None:
    return s.scalar(
        select(SessionCheckpoint).where(
            SessionCheckpoint.session_id == session_id, SessionCheckpoint.name == name
        )
    )


def record_checkpoint(
    s: Session,
    row: TrainingSession,
    name: str,
    sha: str,
    size: int,
    step: int | None,
    now: datetime,
) -> SessionCheckpoint:
    """Save (or replace) checkpoint *name* of the session. Two uploads of one name at once
    (a retry while the first is still being stored) leave one checkpoint: the later wins."""
    for _ in range(3):
        c = find_checkpoint(s, row.id, name)
        if c is not None:
            break
        try:
            with s.begin_nested():
                c = SessionCheckpoint(
                    session_id=row.id, name=name, sha256=sha, size=size, step=step, created=now
                )
                s.add(c)
                s.flush()
            return c
        except IntegrityError:
            continue
    assert c is not None
    c.sha256, c.size, c.step, c.created = sha, size, step, now
    s.flush()
    return c

"""The training-code side of NSML: ``report``, ``save``/``load``/``bind``, dataset paths.

The same script runs on the platform and off it:

- ``report(step, **metrics)``: in a session (``IS_ON_NSML``) buffered, and sent in batches by
  a background thread (flushed at exit and on SIGTERM); elsewhere printed to standard output.
- ``save(name)``: the bound save function writes a folder; in a session it is uploaded to the
  server as a tar archive, elsewhere it is ``./nsml_checkpoints/NAME``
  (``$NSML_LOCAL_CHECKPOINTS`` changes the folder).
- ``load(name)``: downloaded, checked and unpacked for the bound load function, or read from
  that local folder.
- ``DATASET_PATH``: ``/data/NAME`` of the first dataset (``DATASET_PATHS`` has them all);
  elsewhere ``$NSML_DATASET_PATH`` or None.

Training outlives the control plane. When the NSML server is unreachable (restarting, a
network break: connection errors, timeouts, answers 502/503/504), the SDK keeps the report
points in a bounded buffer (``$NSML_REPORT_BUFFER`` points, default 1,000,000; the oldest are
dropped past it, and only then is a drop reported) and retries with jittered exponential
backoff (0.5 s doubling to 10 s); ``save`` and ``load`` retry for up to
``$NSML_RETRY_TIMEOUT`` seconds (default 600) before raising :class:`CheckpointError`, and the
flush at exit waits as long. It says once on standard error what it waits for, and when it
got through. Refusals (4xx) are not retried. Retries are idempotent: a checkpoint is stored
by name (a retried upload replaces it with the same bytes, checked against their SHA-256),
and every report batch carries an id the server de-duplicates on.

In a session that was forked from a checkpoint or resumed, ``bind(load=...)`` calls the load
function on that checkpoint at once. A stopped session gets SIGTERM: the SDK sends what is
buffered, saves a checkpoint named ``stopped`` with the bound save function (when one is
bound), then exits; the server kills the session after its grace period.

Nothing happens at import: the reporting thread starts at the first ``report`` and the
SIGTERM handler is installed by the first ``report`` or ``bind`` in a session.
"""

from __future__ import annotations

import atexit
import collections
import csv
import hashlib
import json
import logging
import os
import random
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

from ._checkpoint import ArchiveError, extract, pack
from .client import NSMLError

__all__ = [
    "DATASET_NAME",
    "DATASET_PATH",
    "DATASET_PATHS",
    "IS_EVALUATION",
    "IS_ON_NSML",
    "SESSION_NAME",
    "CheckpointError",
    "bind",
    "bound",
    "flush",
    "load",
    "loaded_checkpoint",
    "report",
    "save",
]

log = logging.getLogger("nsml")


def _dataset_paths(env: Mapping[str, str]) -> dict[str, str]:
    raw = env.get("NSML_DATASET_PATHS")
    if raw:
        try:
            data = json.loads(raw)
            if isinstance(data, dict):
                return {str(k): str(v) for k, v in data.items()}
        except ValueError:
            pass
    return {}


_ENV = os.environ
#: True inside a session started by the platform.
IS_ON_NSML: bool = bool(_ENV.get("NSML_SESSION"))
#: ``user/dataset/N`` of the running session, else None.
SESSION_NAME: str | None = _ENV.get("NSML_SESSION") or None
#: Folder of each mounted dataset, by name (``{"mnist": "/data/mnist"}``).
DATASET_PATHS: dict[str, str] = _dataset_paths(_ENV)
#: True inside the evaluation of a leaderboard submission (see :func:`bind`).
IS_EVALUATION: bool = _ENV.get("NSML_EVALUATION") == "1"

#: Folder of the first dataset (``/data/mnist``); off the platform $NSML_DATASET_PATH or None.
DATASET_PATH: str | None = _ENV.get("NSML_DATASET_PATH") or None
#: Name of the first dataset, or None.
DATASET_NAME: str | None = next(iter(DATASET_PATHS), None)

STOP_CHECKPOINT = "stopped"
_FLUSH_INTERVAL_S = 0.5
_MAX_BATCH = 20_000
#: Seconds ``save``, ``load`` and the flush at exit keep retrying an unreachable server.
RETRY_TIMEOUT_ENV = "NSML_RETRY_TIMEOUT"
DEFAULT_RETRY_TIMEOUT_S = 600.0
#: Most report points kept while the server is unreachable (the oldest are dropped past it).
REPORT_BUFFER_ENV = "NSML_REPORT_BUFFER"
DEFAULT_REPORT_BUFFER = 1_000_000
#: Answers that mean "try again later" (a proxy or a server restarting); 4xx never are.
RETRY_STATUSES = frozenset({502, 503, 504})
#: The server's rule for metric names (checked at ``report`` so that no batch is refused).
METRIC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./:-]{0,127}$")
#: Answers to a report batch after which this session's points can never be stored.
_REPORTS_FINISHED = frozenset({401, 403, 404, 409, 410})

T = TypeVar("T")


class CheckpointError(NSMLError):
    """``nsml.save`` or ``nsml.load`` failed (the bound functions' own errors pass as they are).

    Attributes:
        message: what went wrong and what to do.
        status: the server's HTTP status, or 0.
        reason: ``unreachable`` (the server did not answer within ``$NSML_RETRY_TIMEOUT``),
            ``damaged`` (the archive is not a whole, safe checkpoint), ``not_found``, ``io``
            (a local folder could not be written), or the server's reason for a refusal.
    """


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        _say(f"[nsml] ignoring {name}={raw!r}: give a positive number; using {default:g}")
        return default
    return value


def retry_timeout(env: Mapping[str, str] = os.environ) -> float:
    """``$NSML_RETRY_TIMEOUT`` in seconds (default 600): how long ``save``, ``load`` and the
    flush at exit wait for an unreachable server."""
    return _env_number(env, RETRY_TIMEOUT_ENV, DEFAULT_RETRY_TIMEOUT_S)


def report_buffer(env: Mapping[str, str] = os.environ) -> int:
    """``$NSML_REPORT_BUFFER`` (default 1,000,000): most report points kept unsent."""
    return int(_env_number(env, REPORT_BUFFER_ENV, DEFAULT_REPORT_BUFFER))


def format_duration(seconds: float) -> str:
    """``42 s``, ``10 min``, ``1 h 5 min`` (for messages)."""
    s = max(0, round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min" + (f" {s % 60} s" if s % 60 and s < 600 else "")
    return f"{s // 3600} h" + (f" {s % 3600 // 60} min" if s % 3600 // 60 else "")


class Transient(Exception):
    """A failure that may go away: the server is unreachable, restarting or overloaded."""


class ServerUnreachable(Exception):
    """The server did not answer within the retry timeout."""


@dataclass
class Backoff:
    """Jittered exponential backoff: attempt *n* waits between half and all of
    ``min(cap_s, base_s * 2**n)`` (jupyterhub's ``exponential_backoff``; AWS "equal jitter")."""

    base_s: float = 0.5
    cap_s: float = 10.0
    rng: Callable[[], float] = field(default=random.random)

    def delay(self, attempt: int) -> float:
        top = min(self.cap_s, self.base_s * 2.0 ** min(attempt, 32))
        return top * (0.5 + 0.5 * self.rng())


class Retrier:
    """Calls a function again while it raises :class:`Transient`, for up to *timeout_s*.

    Args:
        timeout_s: how long to keep trying (from the first call).
        clock: monotonic seconds (injected in tests).
        sleep: waits (injected in tests).
        backoff: the delays between attempts.
        say: where the two messages go (what it waits for; that it got through).
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        backoff: Backoff | None = None,
        say: Callable[[str], None] = _say,
    ) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.sleep = sleep
        self.backoff = backoff or Backoff()
        self.say = say

    def call(self, what: str, attempt: Callable[[], T]) -> T:
        """``attempt()``'s result once it does not raise :class:`Transient`.

        Raises:
            ServerUnreachable: still failing after the timeout (with the last error).
        """
        start = self.clock()
        deadline = start + self.timeout_s
        n = 0
        while True:
            try:
                result = attempt()
            except Transient as e:
                error = e
            else:
                if n:
                    self.say(
                        "[nsml] the NSML server answered again after "
                        f"{format_duration(self.clock() - start)}: {what} went through"
                    )
                return result
            if n == 0:
                self.say(
                    f"[nsml] the NSML server is unreachable ({error}); retrying {what} for up "
                    f"to {format_duration(self.timeout_s)}"
                )
            left = deadline - self.clock()
            if left <= 0:
                raise ServerUnreachable(
                    f"the NSML server did not answer for {format_duration(self.timeout_s)} "
                    f"({error}); set {RETRY_TIMEOUT_ENV} (seconds) to wait longer"
                )
            self.sleep(min(self.backoff.delay(n), left))
            n += 1


def _why(e: BaseException) -> str:
    """A short cause for a failed request (``connection refused``, ``timed out`` ...)."""
    text = str(e)
    for needle, short in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("Connection reset", "connection reset"),
        ("RemoteDisconnected", "connection closed"),
        ("Connection aborted", "connection aborted"),
        ("Name or service not known", "unknown host"),
        ("IncompleteRead", "connection broken"),
    ):
        if needle in text:
            return short
    return e.__class__.__name__


def _server_message(r: Any) -> str:
    try:
        data = r.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])
    return f"{r.status_code} {str(r.text)[:300]}".strip()


def _server_reason(r: Any, default: str) -> str:
    try:
        data = r.json()
    except ValueError:
        return default
    return str(data.get("reason") or default) if isinstance(data, dict) else default


class _Sender:
    """HTTP to the NSML API with the session token (one keep-alive connection)."""

    def __init__(self, api_url: str, token: str, session: str) -> None:
        import requests

        self.requests = requests
        self.api_url = api_url.rstrip("/") + "/"
        self.session = session
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"token {token}"
        self.http.headers["User-Agent"] = "nsml-sdk"

    def url(self, suffix: str) -> str:
        name = "/".join(quote(p, safe="") for p in self.session.split("/"))
        return f"{self.api_url}sessions/{name}{suffix}"

    def call(self, method: str, url: str, **kwargs: Any) -> Any:
        """One request; :class:`Transient` when the server may answer later.

        Raises:
            Transient: no connection, a timeout, or an answer in :data:`RETRY_STATUSES`.
        """
        rq = self.requests
        try:
            r = self.http.request(method, url, **kwargs)
        except rq.exceptions.SSLError:
            raise
        except (rq.ConnectionError, rq.Timeout) as e:
            raise Transient(_why(e)) from e
        if r.status_code in RETRY_STATUSES:
            r.close()
            raise Transient(f"it answered {r.status_code}")
        return r


def _non_finite(v: float) -> str:
    return "nan" if v != v else "inf" if v > 0 else "-inf"


def encode_batch(points: list[tuple[int, float, dict[str, float]]], batch_id: str) -> str:
    """A batch as the API takes it: ``{"batch", "steps", "walls", "values"}`` with one list per
    metric (null where a step lacks it; NaN and infinities as ``"nan"``, ``"inf"``,
    ``"-inf"``: valid JSON). Columns are far cheaper to encode and decode than dicts."""
    n = len(points)
    values: dict[str, list[float | str | None]] = {}
    for i, (_, _, vals) in enumerate(points):
        for k, v in vals.items():
            col = values.get(k)
            if col is None:
                col = values[k] = [None] * n
            col[i] = v if v - v == 0 else _non_finite(v)
    return json.dumps(
        {
            "batch": batch_id,
            "steps": [p[0] for p in points],
            "walls": [p[1] for p in points],
            "values": values,
        },
        separators=(",", ":"),
        allow_nan=False,
    )


@dataclass
class _Batch:
    """A batch in flight: sent again, byte for byte, until the server took it."""

    batch_id: str
    body: str
    n: int
    first_step: int
    last_step: int


class _Reporter:
    """Buffers points; a daemon thread sends them in batches (see the module docs).

    Args:
        sender: the API (None: print the points instead).
        max_buffer: most points kept unsent (the oldest are dropped past it).
        timeout_s: how long :meth:`flush` waits by default for an unreachable server.
        clock, sleep, backoff, say: injected in tests.
    """

    def __init__(
        self,
        sender: _Sender | None,
        *,
        max_buffer: int | None = None,
        timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        backoff: Backoff | None = None,
        say: Callable[[str], None] = _say,
    ) -> None:
        self.sender = sender
        self.buffer: collections.deque[tuple[Any, float, dict[str, float]]] = collections.deque()
        self.max_buffer = max(1, max_buffer if max_buffer is not None else report_buffer())
        self.wake_len = min(_MAX_BATCH, self.max_buffer)
        self.timeout_s = timeout_s if timeout_s is not None else retry_timeout()
        self.clock = clock
        self.sleep = sleep
        self.backoff = backoff or Backoff()
        self.say = say
        self.step = -1
        self.wake = threading.Event()
        self.closed = threading.Event()
        self.send_lock = threading.RLock()
        self.thread: threading.Thread | None = None
        self.pending: _Batch | None = None
        self.sender_id = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        self.dropped_steps: tuple[int, int] | None = None
        self.refused = 0
        self.finished: str | None = None
        self.outage_since: float | None = None

    # ---- the training thread -----------------------------------------------------------

    def add(self, step: int | None, values: dict[str, float]) -> None:
        if step is None:
            step = self.step + 1
        self.step = step
        if self.sender is None:
            shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            print(f"[nsml] step {step}: {shown}", flush=True)
            return
        if self.finished is not None:
            return  # the server takes no more reports from this session (said once)
        buf = self.buffer
        buf.append((step, time.time(), values))
        if len(buf) >= self.wake_len:
            if len(buf) > self.max_buffer:
                self._drop_oldest()
            self.wake.set()
        if self.thread is None:
            self._start()

    def _drop_oldest(self) -> None:
        try:
            step = self.buffer.popleft()[0]
        except IndexError:
            return
        if self.dropped == 0:
            self.say(
                f"[nsml] the report buffer is full ({self.max_buffer:,} points) while the NSML "
                "server is unreachable; dropping the oldest points until it answers "
                f"(${REPORT_BUFFER_ENV} sets the bound)"
            )
        self.dropped += 1
        first = self.dropped_steps[0] if self.dropped_steps else step
        self.dropped_steps = (first, step)

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="nsml-report", daemon=True)
        self.thread.start()
        atexit.register(self._at_exit)

    # ---- sending -----------------------------------------------------------------------

    def unsent(self) -> int:
        return len(self.buffer) + (self.pending.n if self.pending else 0)

    def _next_batch(self) -> _Batch:
        buf = self.buffer
        points = []
        for _ in range(min(len(buf), _MAX_BATCH)):
            try:
                points.append(buf.popleft())
            except IndexError:
                break
        self.seq += 1
        batch_id = f"{self.sender_id}/{self.seq}"
        steps = [p[0] for p in points]
        return _Batch(batch_id, encode_batch(points, batch_id), len(points), min(steps), max(steps))

    def send_pending(self) -> int:
        """Send everything buffered now, the batch in flight first; return how many points
        the server took.

        Raises:
            Transient: the server is unreachable; the points stay (the batch in flight is
                sent again as it is, so that the server can tell a repeat).
        """
        with self.send_lock:
            before = self.sent
            while self.finished is None:
                if self.pending is None:
                    if not self.buffer:
                        break
                    self.pending = self._next_batch()
                self._post(self.pending)
                self.pending = None
            return self.sent - before

    def _post(self, batch: _Batch) -> None:
        assert self.sender is not None
        r = self.sender.call(
            "POST",
            self.sender.url("/metrics"),
            data=batch.body,
            headers={"Content-Type": "application/json"},
            timeout=(10, 60),
        )
        if r.status_code < 400:
            self.sent += batch.n
            return
        message = _server_message(r)
        if r.status_code in _REPORTS_FINISHED:
            lost = batch.n + len(self.buffer)
            self.buffer.clear()
            self.finished = message
            self.refused += lost
            self.say(
                f"[nsml] the NSML server takes no more reports from this session ({message}); "
                f"{lost:,} report points were not stored"
            )
            return
        self.refused += batch.n
        self.say(
            f"[nsml] the NSML server refused {batch.n:,} report points (steps "
            f"{batch.first_step}-{batch.last_step}): {message}"
        )

    def _outage(self, error: Transient) -> None:
        if self.outage_since is None:
            self.outage_since = self.clock()
            self.say(
                f"[nsml] the NSML server is unreachable ({error}); keeping the report points "
                f"(up to {self.max_buffer:,}) and retrying"
            )

    def _recovered(self) -> None:
        if self.outage_since is not None:
            self.say(
                "[nsml] the NSML server answered again after "
                f"{format_duration(self.clock() - self.outage_since)}: the buffered report "
                "points were sent"
            )
            self.outage_since = None
        self._say_dropped()

    def _say_dropped(self) -> None:
        if self.dropped and self.dropped_steps:
            a, b = self.dropped_steps
            self.say(
                f"[nsml] {self.dropped:,} report points (steps {a}-{b}) were dropped: the "
                "buffer was full while the NSML server was unreachable"
            )
            self.dropped, self.dropped_steps = 0, None

    def _run(self) -> None:
        failures = 0
        while not self.closed.is_set():
            self.wake.wait(_FLUSH_INTERVAL_S)
            self.wake.clear()
            if self.closed.is_set():
                return
            try:
                self.send_pending()
            except Transient as e:
                self._outage(e)
                self.closed.wait(self.backoff.delay(failures))
                failures += 1
                continue
            except Exception as e:  # a bug must not end the reports: say it, keep going
                failures += 1
                if failures in (1, 10, 100):
                    self.say(f"[nsml] could not send reports ({e!r}); retrying")
                self.closed.wait(self.backoff.delay(failures))
                continue
            failures = 0
            self._recovered()

    def _at_exit(self) -> None:
        self.closed.set()
        self.flush()

    def flush(self, timeout: float | None = None) -> None:
        """Send what is buffered, waiting for a send in progress and retrying an unreachable
        server for up to *timeout* seconds (default: the retry timeout); then say what was
        not sent."""
        if self.sender is None:
            return
        limit = self.timeout_s if timeout is None else timeout
        deadline = self.clock() + limit
        error: BaseException | None = None
        announced = False
        n = 0
        while True:
            left = deadline - self.clock()
            if not self.send_lock.acquire(timeout=max(0.0, left)):
                break
            try:
                self.send_pending()
                self._recovered()
                return
            except Transient as e:
                error = e
                self._outage(e)
                if not announced and left > 0:
                    announced = True
                    self.say(
                        f"[nsml] waiting up to {format_duration(limit)} for the NSML server "
                        f"to take the last {self.unsent():,} report points"
                    )
            except Exception as e:
                error = e
                break
            finally:
                self.send_lock.release()
            left = deadline - self.clock()
            if left <= 0:
                break
            self.sleep(min(self.backoff.delay(n), left))
            n += 1
        self._say_dropped()
        if self.unsent():
            self.say(
                f"[nsml] {self.unsent():,} report points were not sent "
                f"({error or 'a send in progress did not end'})"
            )


_state_lock = threading.Lock()
_reporter: _Reporter | None = None
_sender: _Sender | None = None
_bound: dict[str, Callable[..., Any]] = {}
_loaded: str | None = None
_sigterm_installed = False


def _get_sender() -> _Sender | None:
    global _sender
    if not IS_ON_NSML:
        return None
    if _sender is None:
        url, token = os.environ.get("NSML_API_URL", ""), os.environ.get("NSML_TOKEN", "")
        if not url or not token:
            raise RuntimeError(
                "NSML_SESSION is set but NSML_API_URL or NSML_TOKEN is missing; the session "
                "was not started by the platform"
            )
        _sender = _Sender(url, token, str(SESSION_NAME))
    return _sender


def _get_reporter() -> _Reporter:
    global _reporter
    if _reporter is None:
        with _state_lock:
            if _reporter is None:
                _reporter = _Reporter(_get_sender())
                _install_sigterm()
    return _reporter


def report(
    step: int | None = None, *, scope: Any = None, summary: Any = None, **metrics: Any
) -> None:
    """Record scalar *metrics* at *step* (default: the previous step plus one).

    Values are anything ``float()`` accepts (ints, floats, NumPy and 0-d tensor scalars).
    Non-blocking: in a session the points are sent by a background thread. ``scope`` and
    ``summary`` are accepted for compatibility with NSML scripts and ignored.

    NaN and infinities are kept (a diverged loss is information).

    Raises:
        TypeError: a value is not a number (naming it).
        ValueError: a metric name the server cannot store (naming it).
    """
    rep = _reporter or _get_reporter()
    for k, v in metrics.items():
        if k not in _good_names:
            _check_metric_name(k)
        if type(v) is not float:
            try:
                metrics[k] = float(v)
            except (TypeError, ValueError):
                raise TypeError(
                    f"nsml.report: {k}={v!r} is not a number; report scalars only"
                ) from None
    if step is not None and type(step) is not int:
        step = int(step)
    rep.add(step, metrics)


_good_names: set[str] = set()


def _check_metric_name(name: str) -> None:
    if not METRIC_NAME.match(name):
        raise ValueError(
            f"nsml.report: metric name {name!r} must be 1-128 letters, digits, '_', '.', '/', "
            "':' or '-' (starting with a letter, digit or '_')"
        )
    if len(_good_names) < 10_000:
        _good_names.add(name)


def flush(timeout: float | None = None) -> None:
    """Send the buffered reports now, blocking up to *timeout* seconds (default
    ``$NSML_RETRY_TIMEOUT``, 600) while the server is unreachable."""
    if _reporter is not None:
        _reporter.flush(timeout)


def bind(
    save: Callable[..., Any] | None = None,
    load: Callable[..., Any] | None = None,
    infer: Callable[..., Any] | None = None,
    **others: Callable[..., Any],
) -> None:
    """Register the functions that save and load a checkpoint (and infer).

    ``save(folder)`` writes the model into *folder*; ``load(folder)`` reads it back. In a
    session started from a checkpoint (a fork or a resume), *load* runs at once on it.

    ``infer(path)`` predicts for the test inputs in the folder *path* and returns
    ``{id: prediction}`` or ``(id, prediction)`` pairs, ids being the inputs' names (as in
    the dataset's labels file), predictions numbers or class names. In the evaluation of a
    leaderboard submission (:data:`IS_EVALUATION`), the call that has bound both *load* and
    *infer* loads the submitted checkpoint, runs *infer* on the hidden test inputs, writes
    the predictions and ends the program: call ``bind`` before training starts.
    """
    global _loaded
    for key, fn in (("save", save), ("load", load), ("infer", infer), *others.items()):
        if fn is not None:
            if not callable(fn):
                raise TypeError(f"nsml.bind: {key}= must be a function, not {fn!r}")
            _bound[key] = fn
    if IS_EVALUATION:
        if "load" in _bound and "infer" in _bound:
            _evaluate()
        return
    _install_sigterm()
    source = os.environ.get("NSML_LOAD_FROM") if IS_ON_NSML else None
    if load is not None and source and _loaded is None:
        session, _, checkpoint = source.rpartition("/")
        print(f"[nsml] loading checkpoint {checkpoint} of {session}", flush=True)
        globals()["load"](checkpoint, session=session)


#: The most predictions an evaluation writes (a test set is smaller).
MAX_PREDICTIONS = 10_000_000


def prediction_rows(predictions: Any) -> list[tuple[str, str]]:
    """What ``infer`` returned as ``(id, prediction)`` text pairs for the predictions file.

    Raises:
        TypeError: not a mapping nor an iterable of pairs, or a prediction that is not a
            number, a bool or a string (the message names the first bad one).
    """
    if isinstance(predictions, Mapping):
        items: Iterable[Any] = predictions.items()
    elif isinstance(predictions, (str, bytes)) or not isinstance(predictions, Iterable):
        raise TypeError(
            "infer must return {id: prediction} or (id, prediction) pairs, not "
            f"{type(predictions).__name__}"
        )
    else:
        items = predictions
    rows: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        if len(rows) >= MAX_PREDICTIONS:
            raise TypeError(f"infer returned more than {MAX_PREDICTIONS} predictions")
        try:
            key, value = item
        except (TypeError, ValueError):
            raise TypeError(f"infer's item {i} is {item!r}; give (id, prediction) pairs") from None
        if callable(getattr(value, "item", None)) and getattr(value, "shape", None) == ():
            value = value.item()  # a NumPy (or similar) scalar
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            text = repr(value)
        elif isinstance(value, str):
            text = value
        else:
            raise TypeError(
                f"the prediction for id {key!r} is a {type(value).__name__}; give a number "
                "or a class name"
            )
        rows.append((str(key), text))
    return rows


def _evaluate() -> NoReturn:
    """Load the submitted checkpoint, run the bound infer, write the predictions, exit 0."""
    checkpoint = os.environ.get("NSML_CHECKPOINT", "/nsml/checkpoint")
    inputs = os.environ.get("NSML_TEST_PATH", "/data/test")
    out = Path(os.environ.get("NSML_PREDICTIONS", "/nsml/out/predictions.csv"))
    print("[nsml] evaluation: loading the submitted checkpoint", flush=True)
    _bound["load"](checkpoint)
    print(f"[nsml] evaluation: running infer on the test inputs in {inputs}", flush=True)
    rows = prediction_rows(_bound["infer"](inputs))
    partial = out.with_name(out.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("id", "prediction"))
        writer.writerows(rows)
    partial.replace(out)
    print(f"[nsml] evaluation: {len(rows)} predictions written", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the rest of the script (training) does not run in an evaluation


def bound() -> dict[str, Callable[..., Any]]:
    """The functions given to :func:`bind`, by name."""
    return dict(_bound)


def loaded_checkpoint() -> str | None:
    """``SESSION/CHECKPOINT`` last loaded with :func:`load` (or by ``bind``), else None."""
    return _loaded


def _local_dir(checkpoint: str) -> Path:
    return Path(os.environ.get("NSML_LOCAL_CHECKPOINTS", "nsml_checkpoints")) / checkpoint


def _checkpoint_name(checkpoint: Any) -> str:
    name = str(checkpoint)
    ok = name and len(name) <= 128 and name[0].isalnum()
    if not ok or any(not (c.isalnum() or c in "._@+-") for c in name):
        raise ValueError(
            f"invalid checkpoint name {name!r}: use letters, digits, '.', '_', '@', '+' or "
            "'-', starting with a letter or digit (e.g. an epoch number)"
        )
    return name


def save(checkpoint: Any, **kwargs: Any) -> str:
    """Save a checkpoint named *checkpoint* (e.g. the epoch) with the bound save function.

    In a session the folder the function wrote is uploaded to the server (blocking until
    stored; retried while the server is unreachable, for up to ``$NSML_RETRY_TIMEOUT``
    seconds); elsewhere it stays in ``./nsml_checkpoints/NAME``. Saving a name again replaces
    that checkpoint. Returns where it went (``SESSION/NAME``, or the local folder).

    Raises:
        CheckpointError: the folder holds something a checkpoint cannot (a link to a folder,
            a device), the server refused it, or did not answer in time.
    """
    fn = _bound.get("save")
    if fn is None:
        raise RuntimeError("nsml.save: call nsml.bind(save=..., load=...) first")
    name = _checkpoint_name(checkpoint)
    sender = _get_sender()
    if sender is None:
        folder = _local_dir(name)
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        fn(str(folder), **kwargs)
        return str(folder)
    with tempfile.TemporaryDirectory(prefix="nsml-save-") as tmp:
        folder = Path(tmp) / "checkpoint"
        folder.mkdir()
        fn(str(folder), **kwargs)
        archive = Path(tmp) / "checkpoint.tar"
        try:
            sha = pack(folder, archive)
        except ArchiveError as e:
            raise CheckpointError(f"nsml.save({name!r}): {e}", 0, "bad_request") from None
        step = _reporter.step if _reporter is not None and _reporter.step >= 0 else None
        url = sender.url(f"/checkpoints/{quote(name, safe='')}")

        def attempt() -> Any:
            with archive.open("rb") as f:
                return sender.call(
                    "PUT",
                    url,
                    data=f,
                    params={"step": step} if step is not None else None,
                    headers={"Content-Type": "application/x-tar", "X-Checkpoint-SHA256": sha},
                    timeout=(10, 3600),
                )

        try:
            r = Retrier(retry_timeout()).call(f"the upload of checkpoint {name}", attempt)
        except ServerUnreachable as e:
            raise CheckpointError(f"nsml.save({name!r}): {e}", 0, "unreachable") from None
        except sender.requests.RequestException as e:
            raise CheckpointError(f"nsml.save({name!r}): the upload failed: {e}", 0) from None
        if r.status_code >= 400:
            raise CheckpointError(
                f"nsml.save({name!r}): the server refused the checkpoint: {_server_message(r)}",
                r.status_code,
                _server_reason(r, "refused"),
            )
    return f"{SESSION_NAME}/{name}"


def load(checkpoint: Any, session: str | None = None, **kwargs: Any) -> None:
    """Load checkpoint *checkpoint* (of *session*, default this one) with the bound load
    function.

    In a session (or off the platform with *session* and ``NSML_API_URL``/``NSML_TOKEN``
    set) it is downloaded from the server (retried while the server is unreachable, for up
    to ``$NSML_RETRY_TIMEOUT`` seconds), checked against its SHA-256 and unpacked (regular
    files and folders only); otherwise read from ``./nsml_checkpoints/NAME``.

    Raises:
        CheckpointError: no such checkpoint, a damaged or unsafe archive, a folder that
            cannot be written, or a server that did not answer in time.
        FileNotFoundError: off the platform, no local checkpoint of that name.
    """
    global _loaded
    fn = _bound.get("load")
    if fn is None:
        raise RuntimeError("nsml.load: call nsml.bind(save=..., load=...) first")
    name = _checkpoint_name(checkpoint)
    sender = _get_sender()
    if sender is None and session is None:
        folder = _local_dir(name)
        if not folder.is_dir():
            raise FileNotFoundError(f"nsml.load: no local checkpoint {folder}")
        fn(str(folder), **kwargs)
        _loaded = name
        return
    session = session or SESSION_NAME
    assert session is not None
    if sender is None:
        from .config import resolve

        cfg = resolve()
        sender = _Sender(cfg.api_url, cfg.token, session)
    where = f"nsml.load({name!r}, session={session!r})"
    with tempfile.TemporaryDirectory(prefix="nsml-load-") as tmp:
        archive = Path(tmp) / "checkpoint.tar"
        r, digest = _download(sender, session, name, archive)
        if r.status_code >= 400:
            raise CheckpointError(
                f"{where}: {_server_message(r)}", r.status_code, _server_reason(r, "refused")
            )
        expected = r.headers.get("X-Checkpoint-SHA256")
        if expected and expected.lower() != digest:
            raise CheckpointError(
                f"{where}: the checkpoint is damaged (its SHA-256 is {digest}, the server "
                f"recorded {expected}); save it again",
                0,
                "damaged",
            )
        folder = Path(tmp) / "checkpoint"
        try:
            extract(archive, folder)
        except ArchiveError as e:
            raise CheckpointError(
                f"{where}: the checkpoint is damaged or unsafe: {e}", 0, "damaged"
            ) from None
        except OSError as e:
            raise CheckpointError(
                f"{where}: cannot unpack it into {tmp} ({e.strerror or e})", 0, "io"
            ) from None
        fn(str(folder), **kwargs)
    _loaded = f"{session}/{name}"


def _download(sender: _Sender, session: str, name: str, archive: Path) -> tuple[Any, str]:
    """GET the checkpoint into *archive* (retried as a whole while the server is
    unreachable or the transfer breaks): the response and the SHA-256 of what arrived."""
    url = sender.url("")
    prefix = url[: url.rfind("/sessions/") + len("/sessions/")]
    target = prefix + "/".join(quote(p, safe="") for p in session.split("/"))
    url = f"{target}/checkpoints/{quote(name, safe='')}"
    rq = sender.requests

    def attempt() -> tuple[Any, str]:
        r = sender.call("GET", url, stream=True, timeout=(10, 600))
        h = hashlib.sha256()
        if r.status_code >= 400:
            return r, ""
        where = f"nsml.load({name!r}, session={session!r})"
        try:
            with archive.open("wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
        except (rq.ConnectionError, rq.Timeout, rq.exceptions.ChunkedEncodingError) as e:
            raise Transient(f"the download broke: {_why(e)}") from e
        except rq.RequestException as e:
            raise CheckpointError(f"{where}: the download failed: {e}", 0, "damaged") from None
        except OSError as e:  # after requests' errors, which are OSErrors too
            raise CheckpointError(
                f"{where}: cannot write {archive} ({e.strerror or e})", 0, "io"
            ) from None
        finally:
            r.close()
        return r, h.hexdigest()

    what = f"the download of checkpoint {name}" + (
        f" of {session}" if session != SESSION_NAME else ""
    )
    try:
        return Retrier(retry_timeout()).call(what, attempt)
    except ServerUnreachable as e:
        raise CheckpointError(
            f"nsml.load({name!r}, session={session!r}): {e}", 0, "unreachable"
        ) from None
    except rq.RequestException as e:
        raise CheckpointError(
            f"nsml.load({name!r}, session={session!r}): the download failed: {e}", 0
        ) from None


def _install_sigterm() -> None:
    """In a session: on SIGTERM send the reports, save ``stopped`` (when a save function is
    bound) and exit 143. Not installed over a handler the script set itself."""
    global _sigterm_installed
    if not IS_ON_NSML or _sigterm_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print("[nsml] SIGTERM: the session is being stopped", file=sys.stderr, flush=True)
    if "save" in _bound:
        try:
            where = save(STOP_CHECKPOINT)
            print(f"[nsml] saved checkpoint {where}", file=sys.stderr, flush=True)
        except Exception as e:
            print(f"[nsml] could not save a checkpoint at stop: {e}", file=sys.stderr, flush=True)
    flush(10.0)  # the server kills the session after its grace period anyway
    raise SystemExit(128 + signal.SIGTERM)

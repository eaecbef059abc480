"""The training-code side of NSML: ``report``, ``save``/``load``/``bind``, dataset paths.

The same script runs on the platform and off it:

- ``report(step, **metrics)``: in a session (``IS_ON_NSML``) buffered, and sent in batches by
  a background thread (flushed at exit and on SIGTERM); elsewhere printed to standard output.
- ``save(name)``: the bound save function writes a folder; in a session it is uploaded to the
  server as a tar archive, elsewhere it is ``./nsml_checkpoints/NAME``
  (``$NSML_LOCAL_CHECKPOINTS`` changes the folder).
- ``load(name)``: downloaded and unpacked for the bound load function, or read from that
  local folder.
- ``DATASET_PATH``: ``/data/NAME`` of the first dataset (``DATASET_PATHS`` has them all);
  elsewhere ``$NSML_DATASET_PATH`` or None.

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
import json
import logging
import os
import signal
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

__all__ = [
    "DATASET_NAME",
    "DATASET_PATH",
    "DATASET_PATHS",
    "IS_ON_NSML",
    "SESSION_NAME",
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
#: Folder of the first dataset (``/data/mnist``); off the platform $NSML_DATASET_PATH or None.
DATASET_PATH: str | None = _ENV.get("NSML_DATASET_PATH") or None
#: Name of the first dataset, or None.
DATASET_NAME: str | None = next(iter(DATASET_PATHS), None)

STOP_CHECKPOINT = "stopped"
_FLUSH_INTERVAL_S = 0.5
_MAX_BATCH = 20_000
_MAX_BUFFER = 2_000_000


class _Sender:
    """HTTP to the NSML API with the session token (one keep-alive connection)."""

    def __init__(self, api_url: str, token: str, session: str) -> None:
        import requests

        self.api_url = api_url.rstrip("/") + "/"
        self.session = session
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"token {token}"
        self.http.headers["User-Agent"] = "nsml-sdk"

    def url(self, suffix: str) -> str:
        name = "/".join(quote(p, safe="") for p in self.session.split("/"))
        return f"{self.api_url}sessions/{name}{suffix}"

    def post_points(self, points: list[tuple[Any, float, dict[str, float]]]) -> None:
        """Send a batch as columns (one list per metric, null where a step lacks it): far
        cheaper to encode and decode than a list of dicts."""
        n = len(points)
        values: dict[str, list[float | None]] = {}
        for i, (_, _, vals) in enumerate(points):
            for k, v in vals.items():
                col = values.get(k)
                if col is None:
                    col = values[k] = [None] * n
                col[i] = v
        body = json.dumps(
            {"steps": [p[0] for p in points], "walls": [p[1] for p in points], "values": values},
            separators=(",", ":"),
        )
        r = self.http.post(
            self.url("/metrics"),
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        if r.status_code >= 400:
            raise RuntimeError(
                f"the server refused {len(points)} points: {r.status_code} {r.text[:300]}"
            )


class _Reporter:
    """Buffers points; a daemon thread sends them in batches (see the module docs)."""

    def __init__(self, sender: _Sender | None) -> None:
        self.sender = sender
        self.buffer: collections.deque[tuple[Any, float, dict[str, float]]] = collections.deque()
        self.step = -1
        self.wake = threading.Event()
        self.send_lock = threading.RLock()
        self.thread: threading.Thread | None = None
        self.dropped = 0
        self.failures = 0
        self.closed = False

    def add(self, step: int | None, values: dict[str, float]) -> None:
        if step is None:
            step = self.step + 1
        self.step = step
        if self.sender is None:
            shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            print(f"[nsml] step {step}: {shown}", flush=True)
            return
        buf = self.buffer
        buf.append((step, time.time(), values))
        if len(buf) >= _MAX_BATCH:
            if len(buf) > _MAX_BUFFER:
                buf.popleft()
                self.dropped += 1
            self.wake.set()
        if self.thread is None:
            self._start()

    def _start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="nsml-report", daemon=True)
        self.thread.start()
        atexit.register(self.flush)

    def _run(self) -> None:
        while not self.closed:
            self.wake.wait(_FLUSH_INTERVAL_S)
            self.wake.clear()
            try:
                self.send_pending()
            except Exception as e:  # keep reporting; the points stay buffered
                self.failures += 1
                if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                    print(f"[nsml] could not send reports ({e}); retrying", file=sys.stderr)
                time.sleep(min(30.0, 0.5 * 2 ** min(self.failures, 6)))

    def send_pending(self) -> int:
        """Send everything buffered now; points that fail to send go back to the front."""
        with self.send_lock:
            return self._send_locked()

    def _send_locked(self) -> int:
        sent = 0
        buf = self.buffer
        while buf:
            n = min(len(buf), _MAX_BATCH)
            batch = [buf.popleft() for _ in range(n)]
            try:
                assert self.sender is not None
                self.sender.post_points(batch)
            except BaseException:
                buf.extendleft(reversed(batch))
                raise
            sent += n
            self.failures = 0
        return sent

    def flush(self, timeout: float = 10.0) -> None:
        """Send what is buffered, waiting for a send in progress; give up after *timeout*."""
        if self.sender is None:
            return
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.send_lock.acquire(timeout=left):
                break
            try:
                self._send_locked()
                return
            except Exception as e:
                error = e
            finally:
                self.send_lock.release()
            time.sleep(min(1.0, 0.1 * 2**attempt, max(0.0, deadline - time.monotonic())))
            attempt += 1
        if self.buffer:
            print(
                f"[nsml] {len(self.buffer)} report points were not sent ({error or 'timeout'})",
                file=sys.stderr,
                flush=True,
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

    Raises:
        TypeError: a value is not a number (naming it).
    """
    rep = _reporter or _get_reporter()
    for k, v in metrics.items():
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


def flush(timeout: float = 10.0) -> None:
    """Send the buffered reports now (blocking up to *timeout* seconds)."""
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
    """
    global _loaded
    for key, fn in (("save", save), ("load", load), ("infer", infer), *others.items()):
        if fn is not None:
            if not callable(fn):
                raise TypeError(f"nsml.bind: {key}= must be a function, not {fn!r}")
            _bound[key] = fn
    _install_sigterm()
    source = os.environ.get("NSML_LOAD_FROM") if IS_ON_NSML else None
    if load is not None and source and _loaded is None:
        session, _, checkpoint = source.rpartition("/")
        print(f"[nsml] loading checkpoint {checkpoint} of {session}", flush=True)
        globals()["load"](checkpoint, session=session)


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
    stored); elsewhere it stays in ``./nsml_checkpoints/NAME``. Returns where it went
    (``SESSION/NAME``, or the local folder).
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
        with tarfile.open(archive, "w") as tar:
            for p in sorted(folder.rglob("*")):
                tar.add(p, arcname=p.relative_to(folder).as_posix(), recursive=False)
        step = _reporter.step if _reporter is not None and _reporter.step >= 0 else None
        with archive.open("rb") as f:
            r = sender.http.put(
                sender.url(f"/checkpoints/{quote(name, safe='')}"),
                data=f,
                params={"step": step} if step is not None else None,
                headers={"Content-Type": "application/x-tar"},
                timeout=3600,
            )
        if r.status_code >= 400:
            raise RuntimeError(
                f"nsml.save({name!r}): the server answered {r.status_code}: {r.text[:300]}"
            )
    return f"{SESSION_NAME}/{name}"


def load(checkpoint: Any, session: str | None = None, **kwargs: Any) -> None:
    """Load checkpoint *checkpoint* (of *session*, default this one) with the bound load
    function.

    In a session (or off the platform with *session* and ``NSML_API_URL``/``NSML_TOKEN``
    set) it is downloaded from the server; otherwise read from ``./nsml_checkpoints/NAME``.
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
    from .snapshot import safe_extract

    session = session or SESSION_NAME
    assert session is not None
    if sender is None:
        from .config import resolve

        cfg = resolve()
        sender = _Sender(cfg.api_url, cfg.token, session)
    url = sender.url("")
    prefix = url[: url.rfind("/sessions/") + len("/sessions/")]
    target = prefix + "/".join(quote(p, safe="") for p in session.split("/"))
    r = sender.http.get(f"{target}/checkpoints/{quote(name, safe='')}", stream=True, timeout=3600)
    if r.status_code >= 400:
        raise RuntimeError(
            f"nsml.load({name!r}, session={session!r}): {r.status_code} {r.text[:300]}"
        )
    with tempfile.TemporaryDirectory(prefix="nsml-load-") as tmp:
        archive = Path(tmp) / "checkpoint.tar"
        with archive.open("wb") as f:
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)
        folder = Path(tmp) / "checkpoint"
        with tarfile.open(archive) as tar:
            safe_extract(tar, folder)
        fn(str(folder), **kwargs)
    _loaded = f"{session}/{name}"


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
    flush()
    raise SystemExit(128 + signal.SIGTERM)

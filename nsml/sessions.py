"""Session functions shared by the ``nsml`` CLI and the notebook magics.

Every function takes a :class:`~nsml.client.Client`, returns plain data (the API's JSON as
dicts) and prints nothing: the caller formats. Errors are :class:`~nsml.client.NSMLError`
(from the API, with its message and reason) or :class:`~nsml.snapshot.SnapshotError` /
:class:`ValueError` (caught before any call).

Sessions are named ``USER/DATASET/N``; every function also accepts the short form
``DATASET/N`` for the caller's own sessions. A checkpoint is named after a session:
``USER/DATASET/N/CHECKPOINT`` (or ``DATASET/N/CHECKPOINT``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from ._checkpoint import ArchiveError, extract
from .client import Client, NSMLError, encode_json
from .snapshot import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_FILES,
    Entry,
    SnapshotError,
    build_archive,
    collect,
)

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "CodeUpload",
    "diff",
    "events",
    "exec_in",
    "follow_logs",
    "fork",
    "full_name",
    "getid",
    "logs",
    "memo",
    "metrics",
    "model",
    "ps",
    "pull",
    "resume",
    "rm",
    "run",
    "split_checkpoint",
    "status",
    "stop",
    "upload_code",
    "wait",
]

ACTIVE_STATES = ("queued", "preparing", "running")
FINAL_STATES = ("completed", "failed", "oom_killed", "stopped", "lost")
#: Bounds of the API's arguments (the server clamps or refuses beyond them).
MAX_LIST = 10_000
MAX_TAIL_LINES = 10_000_000
MAX_EXEC_S = 600.0
MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class CodeUpload:
    """A code snapshot stored by the server.

    Attributes:
        digest: what ``run`` passes as ``code``.
        files: how many files it holds.
        bytes: their total size.
        skipped: paths left out and why (virtual environments, links that leave the folder,
            special files, files that vanished or kept changing while read).
        folder: the folder it was taken from.
        max_bytes, max_files: the limits it was taken under.
        near_limit: it used most of a limit (files or bytes).
        biggest: then, its biggest entries (files and folders), to list in ``.nsmlignore``.
    """

    digest: str
    files: int
    bytes: int
    skipped: tuple[str, ...] = ()
    folder: str = ""
    max_bytes: int = DEFAULT_MAX_BYTES
    max_files: int = DEFAULT_MAX_FILES
    near_limit: bool = False
    biggest: tuple[Entry, ...] = ()


# ---- names -----------------------------------------------------------------------------------


def _me(client: Client) -> str:
    cached = getattr(client, "_nsml_user", None)
    if cached is None:
        cached = str(client.me()["name"])
        client._nsml_user = cached  # type: ignore[attr-defined]
    return cached


def full_name(client: Client, ref: str) -> str:
    """``DATASET/N`` -> ``ME/DATASET/N``; a full name is returned as it is.

    Raises:
        ValueError: *ref* is neither form.
    """
    parts = ref.strip("/").split("/")
    if len(parts) == 3 and _number(parts[2]):
        return "/".join(parts)
    if len(parts) == 2 and _number(parts[1]):
        return f"{_me(client)}/{parts[0]}/{parts[1]}"
    raise ValueError(
        f"{ref!r} is not a session name: use USER/DATASET/N or DATASET/N (e.g. alice/mnist/3)"
        + (f"; N is a whole number from 1 to {MAX_ID}" if parts[-1].isdigit() else "")
    )


def _number(text: str) -> bool:
    """A session number: ASCII digits, 1 to :data:`MAX_ID`."""
    return text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_ID


def split_checkpoint(client: Client, ref: str) -> tuple[str, str | None]:
    """``SESSION[/CHECKPOINT]`` -> (full session name, checkpoint or None).

    Raises:
        ValueError: *ref* names no session.
    """
    parts = ref.strip("/").split("/")
    if len(parts) == 4 and _number(parts[2]):
        return full_name(client, "/".join(parts[:3])), parts[3]
    if len(parts) == 3 and _number(parts[1]) and not _number(parts[2]):
        return full_name(client, "/".join(parts[:2])), parts[2]
    if len(parts) == 3 and _number(parts[1]) and _number(parts[2]):
        # DATASET/N/CHECKPOINT with a numeric checkpoint, or USER/DATASET/N with a numeric
        # dataset: a session name wins when such a session exists.
        try:
            client.request("GET", _path("/".join(parts)))
            return "/".join(parts), None
        except NSMLError as e:
            if e.status not in (403, 404):
                raise
        return full_name(client, "/".join(parts[:2])), parts[2]
    return full_name(client, ref), None


def _path(name: str, suffix: str = "") -> str:
    return "sessions/" + "/".join(quote(p, safe="") for p in name.split("/")) + suffix


# ---- starting ---------------------------------------------------------------------------------


def upload_code(
    client: Client,
    folder: str | os.PathLike[str] = ".",
    *,
    extra: dict[str, bytes] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    require: str | None = None,
) -> CodeUpload:
    """Snapshot *folder* (the default ignores, ``.nsmlignore``, the limits) and upload it.

    *extra* adds files that are not on disk (path -> content), replacing same-named ones.
    *require* names a file the snapshot must hold (the entry point).

    Raises:
        SnapshotError: the folder is too large or missing, or *require* could not be read.
        NSMLError: the server refused it.
    """
    snap = collect(folder, extra=extra, max_bytes=max_bytes, max_files=max_files)
    archive = build_archive(snap)
    if require is not None and require not in snap.paths:
        archive.unlink(missing_ok=True)
        why = next((s for s in snap.skipped if s.startswith(f"{require} (")), None)
        raise SnapshotError(
            f"{require} is not in the code snapshot of {snap.root}"
            + (
                f": {why}"
                if why
                else " (is it in a folder left out by default, or listed in .nsmlignore?)"
            )
        )
    try:
        with archive.open("rb") as f:
            r = client.raw(
                "POST",
                "code",
                data=f,
                headers={"Content-Type": "application/gzip"},
                timeout=max(60.0, client.timeout),
            )
        body = r.json()
    finally:
        archive.unlink(missing_ok=True)
    near = snap.near_limit
    return CodeUpload(
        digest=str(body["digest"]),
        files=int(body["files"]),
        bytes=int(body["bytes"]),
        skipped=tuple(snap.skipped),
        folder=str(snap.root),
        max_bytes=max_bytes,
        max_files=max_files,
        near_limit=near,
        biggest=tuple(snap.biggest()) if near else (),
    )


def run(
    client: Client,
    entry: str,
    args: Sequence[str] = (),
    *,
    folder: str | os.PathLike[str] = ".",
    cell: str | None = None,
    gpus: float = 0,
    gpu_models: Sequence[str] = (),
    datasets: Sequence[str] = (),
    cpu: float | None = None,
    memory: str | int | None = None,
    image: str | None = None,
    memo: str = "",
    public: bool = False,
    private: bool = False,
    team: str | None = None,
    restart_on_lost: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    on_upload: Callable[[CodeUpload], None] | None = None,
) -> dict[str, Any]:
    """Start a session: upload *folder* and run *entry* with *args* in the background.

    Args:
        entry: the script, relative to *folder* (``train.py``; ``.sh`` runs with bash).
        args: its arguments.
        folder: the code to snapshot (honouring ``.nsmlignore``).
        cell: source to run as *entry* instead of the file on disk (a ``%%nsml run`` cell);
            the rest of *folder* is still uploaded.
        gpus: 0, a fraction below 1, or a whole number.
        datasets: ``name`` or ``name@version``; the first names the session.
        cpu: CPU cores (default: the server's, 1).
        memory: limit, e.g. ``"8G"`` (default: the server's, 1G).
        image: container image (default: the server's).
        memo: a note kept with the session.
        public: let every user read and fork it.
        private: only the caller and admins read it (even when the caller's billing team
            pays, which otherwise makes it a team session of that team).
        team: a team session of this JupyterHub group (one of the caller's): its members
            read and fork it, its team admins may stop it.
        restart_on_lost: when its node is lost, queue it again (next attempt, loading its
            last checkpoint) instead of ending it ``lost``.
        on_upload: told what the code snapshot held once the server stored it.

    Returns:
        The new session (``name``, ``state`` ``queued``, ...).
    """
    extra = {entry: cell.encode()} if cell is not None else None
    if cell is None and not (Path(folder) / entry).is_file():
        raise ValueError(f"{entry} is not a file in {Path(folder).resolve()}")
    body: dict[str, Any] = {
        "entry": entry,
        "args": list(args),
        "gpus": gpus,
        "gpu_models": list(gpu_models),
        "datasets": list(datasets),
        "memo": memo,
    }
    if public and private:
        raise ValueError("a session is public or private, not both")
    if public or private:
        body["visibility"] = "public" if public else "private"
    if team is not None:
        body["team"] = team
    if restart_on_lost:
        body["restart_on_lost"] = True
    if cpu is not None:
        body["cpu"] = cpu
    if memory is not None:
        body["memory"] = memory
    if image:
        body["image"] = image
    encode_json(body)  # a value JSON cannot carry is refused before the code is uploaded
    code = upload_code(
        client,
        folder,
        extra=extra,
        max_bytes=max_bytes,
        require=entry if cell is not None else os.path.normpath(entry),
    )
    if on_upload is not None:
        on_upload(code)
    body["code"] = code.digest
    result: dict[str, Any] = client.request("POST", "sessions", body)
    return result


def fork(
    client: Client,
    ref: str,
    args: Sequence[str] | None = None,
    *,
    gpus: float | None = None,
    cpu: float | None = None,
    memory: str | int | None = None,
    image: str | None = None,
    memo: str | None = None,
) -> dict[str, Any]:
    """Start a new session from ``SESSION[/CHECKPOINT]`` with the same code.

    The child runs the parent's entry point with *args* (None: the parent's) and, with a
    checkpoint, its ``nsml.bind(load=...)`` loads that checkpoint. Lineage (parent and
    checkpoint) is kept.
    """
    name, checkpoint = split_checkpoint(client, ref)
    body: dict[str, Any] = {"checkpoint": checkpoint}
    for key, value in (
        ("args", None if args is None else list(args)),
        ("gpus", gpus),
        ("cpu", cpu),
        ("memory", memory),
        ("image", image),
        ("memo", memo),
    ):
        if value is not None:
            body[key] = value
    result: dict[str, Any] = client.request("POST", _path(name, "/fork"), body)
    return result


def resume(client: Client, ref: str) -> dict[str, Any]:
    """Run a stopped (or failed, oom_killed, lost) session again from its last checkpoint."""
    result: dict[str, Any] = client.request("POST", _path(full_name(client, ref), "/resume"))
    return result


# ---- looking ----------------------------------------------------------------------------------


def ps(
    client: Client,
    *,
    state: str | None = None,
    all_users: bool = False,
    teams: bool = False,
    dataset: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Sessions, oldest first: the caller's (``all_users``: everyone's, admins only;
    ``teams``: also the team sessions of the caller's teams).

    *state* is a state or ``active`` (queued, preparing or running).
    """
    out: list[dict[str, Any]] = client.request(
        "GET",
        "sessions",
        state=state,
        all="1" if all_users else None,
        teams="1" if teams else None,
        dataset=dataset,
        limit=limit,
    )["sessions"]
    return out


def status(client: Client, ref: str) -> dict[str, Any]:
    """One session: state, exit code, reason, resources, node, GPU ids, last metrics..."""
    result: dict[str, Any] = client.request("GET", _path(full_name(client, ref)))
    return result


def wait(
    client: Client, ref: str, *, timeout: float | None = None, poll_s: float = 1.0
) -> dict[str, Any]:
    """Poll until the session ended (or *timeout* seconds passed); return its last status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    name = full_name(client, ref)
    while True:
        st = status(client, name)
        if st["state"] in FINAL_STATES or (deadline is not None and time.monotonic() > deadline):
            return st
        time.sleep(poll_s)


def logs(
    client: Client,
    ref: str,
    *,
    offset: int = 0,
    tail: int | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """A piece of the stored output: ``{"offset", "next_offset", "size", "text",
    "complete"}``. *tail*: the last N lines instead of from *offset*."""
    result: dict[str, Any] = client.request(
        "GET", _path(full_name(client, ref), "/logs"), offset=offset, tail=tail, limit=limit
    )
    return result


def follow_logs(
    client: Client,
    ref: str,
    *,
    offset: int = 0,
    tail: int | None = None,
    poll_s: float = 1.0,
    timeout: float | None = None,
) -> Iterator[str]:
    """Yield the output as it comes until the session ended and all of it was read (or
    *timeout* seconds passed)."""
    name = full_name(client, ref)
    deadline = None if timeout is None else time.monotonic() + timeout
    first = True
    while True:
        chunk = logs(client, name, offset=offset, tail=tail if first else None)
        first = False
        if chunk["text"]:
            yield chunk["text"]
        offset = chunk["next_offset"]
        if chunk["complete"]:
            return
        if deadline is not None and time.monotonic() > deadline:
            return
        if offset >= chunk["size"]:
            time.sleep(poll_s)


def metrics(
    client: Client,
    ref: str,
    *,
    names: Sequence[str] | None = None,
    since_step: int | None = None,
    to_step: int | None = None,
    max_points: int | None = None,
) -> dict[str, Any]:
    """Reported metrics: ``last_step``, ``last_metrics`` and ``series`` (per metric:
    ``steps``, ``values``, ``walls``, ``total``). *since_step*/*to_step* select a step
    range; *max_points* has the server downsample each series to at most that many points
    (shape, extremes and NaN/inf kept; ``total`` is the count before)."""
    result: dict[str, Any] = client.request(
        "GET",
        _path(full_name(client, ref), "/metrics"),
        names=",".join(names) if names else None,
        since_step=since_step,
        to_step=to_step,
        max_points=max_points,
    )
    return result


#: Characters of session names per ``metrics_many`` request (the route takes 1,000: a URL
#: under 16 KB however the names encode).
NAMES_PER_REQUEST_CHARS = 1000


def metrics_many(
    client: Client,
    refs: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    since_step: int | None = None,
    to_step: int | None = None,
    max_points: int | None = None,
    workers: int = 4,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """:func:`metrics` of many sessions in as few requests as the URL allows (``GET
    api/metrics?sessions=...``): ``({name: answer}, {name: why it is missing})``."""
    full = [full_name(client, r) for r in refs]
    groups: list[list[str]] = [[]]
    size = 0
    for name in dict.fromkeys(full):
        if groups[-1] and size + len(name) + 1 > NAMES_PER_REQUEST_CHARS:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += len(name) + 1

    def one(group: list[str]) -> dict[str, Any]:
        answer: dict[str, Any] = client.request(
            "GET",
            "metrics",
            sessions=",".join(group),
            names=",".join(names) if names else None,
            since_step=since_step,
            to_step=to_step,
            max_points=max_points,
        )
        return answer

    found: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    if len(groups) == 1:
        answers = [one(groups[0])] if groups[0] else []
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(workers, len(groups))) as pool:
            answers = list(pool.map(one, groups))
    for a in answers:
        found.update({m["session"]: m for m in a["metrics"]})
        errors.update(a["errors"])
    return found, errors


def gpu_use(client: Client, ref: str) -> dict[str, Any]:
    """A session's GPU use over time: ``t`` (sample starts, epoch seconds), ``seconds``
    (each covers), ``gpus`` (per GPU: ``utilization_pct``, ``memory_used_mib``), ``note``
    (why there are none: e.g. virtual GPUs report no utilisation)."""
    result: dict[str, Any] = client.request("GET", _path(full_name(client, ref), "/gpu"))
    return result


def events(client: Client, *, since: int = 0, all_users: bool = False) -> dict[str, Any]:
    """The event feed (state changes and failures of the caller's sessions) after *since*:
    ``{"events": [...], "last_id"}``."""
    result: dict[str, Any] = client.request(
        "GET", "events", since=since, all="1" if all_users else None
    )
    return result


def diff(client: Client, a: str, b: str) -> dict[str, Any]:
    """Differences between two sessions: ``args`` (both lists), ``args_diff`` (unified),
    ``fields`` (other settings that differ) and ``code`` (per-file changes with diffs)."""
    result: dict[str, Any] = client.request(
        "GET", "sessions/diff", a=full_name(client, a), b=full_name(client, b)
    )
    return result


def model(client: Client, ref: str) -> list[dict[str, Any]]:
    """The session's checkpoints (``name``, ``size``, ``step``, ``created``), oldest first."""
    out: list[dict[str, Any]] = client.request(
        "GET", _path(full_name(client, ref), "/checkpoints")
    )["checkpoints"]
    return out


def getid(client: Client, dataset: str | None = None) -> str:
    """The current session's name inside a session, else the caller's newest session
    (optionally of *dataset*).

    Raises:
        NSMLError: the caller has no session (reason ``not_found``).
    """
    if os.environ.get("NSML_SESSION"):
        return os.environ["NSML_SESSION"]
    found = ps(client, dataset=dataset, limit=1)
    if not found:
        raise NSMLError("You have no session yet.", 404, "not_found")
    return str(found[-1]["name"])


# ---- changing ---------------------------------------------------------------------------------


def stop(client: Client, ref: str) -> dict[str, Any]:
    """Ask the session to stop: SIGTERM, the server's grace period (the SDK saves a
    checkpoint), then SIGKILL. Returns at once; :func:`wait` for the end."""
    result: dict[str, Any] = client.request("POST", _path(full_name(client, ref), "/stop"))
    return result


def rm(client: Client, ref: str, *, force: bool = False, timeout: float = 120.0) -> None:
    """Remove an ended session with its logs, metrics and checkpoints. With *force*, stop a
    live one first and wait (up to *timeout* seconds) for it to end."""
    name = full_name(client, ref)
    if force:
        st = status(client, name)
        if st["state"] in ACTIVE_STATES:
            stop(client, name)
            st = wait(client, name, timeout=timeout)
            if st["state"] in ACTIVE_STATES:
                raise NSMLError(
                    f"{name} did not stop within {timeout:g}s; try again later.", 409, "conflict"
                )
    client.request("DELETE", _path(name))


def memo(client: Client, ref: str, text: str) -> dict[str, Any]:
    """Set the session's memo."""
    result: dict[str, Any] = client.request("PATCH", _path(full_name(client, ref)), {"memo": text})
    return result


def set_visibility(client: Client, ref: str, public: bool) -> dict[str, Any]:
    """Make the session public (every user may read and fork it) or private."""
    result: dict[str, Any] = client.request(
        "PATCH",
        _path(full_name(client, ref)),
        {"visibility": "public" if public else "private"},
    )
    return result


def exec_in(
    client: Client, ref: str, command: Sequence[str], *, timeout_s: float = 60.0
) -> dict[str, Any]:
    """Run *command* inside the running session's container: ``{"exit_code", "output"}``."""
    result: dict[str, Any] = client.request(
        "POST",
        _path(full_name(client, ref), "/exec"),
        {"command": list(command), "timeout_s": timeout_s},
    )
    return result


def pull(
    client: Client,
    ref: str,
    dest: str | os.PathLike[str] = ".",
    *,
    checkpoint: str | None = None,
) -> Path:
    """Download a checkpoint (``SESSION/CHECKPOINT``, or the session's newest) and unpack it
    into ``DEST/USER_DATASET_N/CHECKPOINT``, which must not exist; return that folder.

    The download is checked against the SHA-256 the server recorded, and the archive against
    the checkpoint rules (regular files and folders only, no path leaving the folder); it is
    unpacked into a hidden sibling folder renamed into place at the end. On any failure
    nothing is left at the destination (not even the folders this call created).

    Raises:
        NSMLError: one sentence for each failure (reason ``exists``, ``damaged``, ``io``,
            ``unreachable``, or the API's).
    """
    name, ckpt = split_checkpoint(client, ref)
    ckpt = checkpoint or ckpt
    if ckpt is None:
        saved = model(client, name)
        if not saved:
            raise NSMLError(f"Session {name} has no checkpoint.", 404, "not_found")
        ckpt = str(saved[-1]["name"])
    target = Path(dest) / name.replace("/", "_") / ckpt
    what = f"checkpoint {name}/{ckpt}"
    if target.exists() or target.is_symlink():
        raise NSMLError(
            f"{target} already exists; remove it or pull into another folder.", 0, "exists"
        )
    created = _make_folders(target.parent)
    try:
        r = client.raw("GET", _path(name, f"/checkpoints/{quote(ckpt, safe='')}"), stream=True)
        with tempfile.TemporaryFile(dir=target.parent, prefix=".nsml-pull-") as tmp:
            digest = _receive(r, tmp, what)
            expected = r.headers.get("X-Checkpoint-SHA256", "").lower()
            if expected and expected != digest:
                raise NSMLError(
                    f"The download of {what} is damaged (SHA-256 {digest[:12]}..., the server "
                    f"recorded {expected[:12]}...); nothing was written. Try again; if it "
                    "persists the server's copy is damaged.",
                    0,
                    "damaged",
                )
            tmp.seek(0)
            extract(tmp, target)
    except ArchiveError as e:
        _remove_folders(created)
        raise NSMLError(
            f"{what.capitalize()} cannot be unpacked: {e}; nothing was written.", 0, "damaged"
        ) from None
    except FileExistsError:
        _remove_folders(created)
        raise NSMLError(
            f"{target} already exists; remove it or pull into another folder.", 0, "exists"
        ) from None
    except OSError as e:
        _remove_folders(created)
        raise NSMLError(
            f"Cannot write {what} into {target.parent}: {e.strerror or e}; nothing was written.",
            0,
            "io",
        ) from None
    except BaseException:
        _remove_folders(created)
        raise
    return target


def _receive(r: Any, out: IO[bytes], what: str) -> str:
    """Copy a streamed download into *out*; its SHA-256."""
    import requests

    h = hashlib.sha256()
    try:
        for chunk in r.iter_content(1 << 20):
            out.write(chunk)
            h.update(chunk)
    except requests.RequestException as e:  # before OSError: requests' errors are OSErrors
        raise NSMLError(
            f"The download of {what} broke ({e.__class__.__name__}); nothing was written. "
            "Try again.",
            0,
            "unreachable",
        ) from None
    finally:
        r.close()
    return h.hexdigest()


def _make_folders(folder: Path) -> list[Path]:
    """Create *folder* and its missing parents; the ones created, outermost first.

    Raises:
        NSMLError: a folder cannot be created (nothing created is left).
    """
    missing: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except OSError as e:
            _remove_folders(created)
            raise NSMLError(f"Cannot create {d}: {e.strerror or e}.", 0, "io") from None
        created.append(d)
    if not folder.is_dir():
        raise NSMLError(f"Cannot write into {folder}: it is not a folder.", 0, "io")
    return created


def _remove_folders(created: list[Path]) -> None:
    """Remove the folders :func:`_make_folders` created, innermost first, if still empty."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return

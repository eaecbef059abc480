"""Datasets from the client's side: push a folder as ``NAME@k``, pull one back, list, share.

Shared by the ``nsml dataset`` CLI, the notebook magics and training code. A push hashes the
folder (refusing unsafe paths, naming them), asks the server which blobs it lacks, sends only
those (large files one by one, resumable from the byte where a transfer broke; small files
packed many per request), then commits. Running the same push again after an interruption
resumes it: nothing already received is sent again. A pull verifies every byte against its
BLAKE3 and leaves nothing behind when it fails.

Progress goes to a callback of :class:`nsml_datasets.ProgressEvent`; :func:`progress_bar`
makes one that draws a ``tqdm`` bar in a terminal and an ``ipywidgets`` bar in a notebook.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import requests

from nsml_datasets import (
    DatasetError,
    Entry,
    IntegrityError,
    Manifest,
    ProgressCallback,
    ProgressEvent,
    format_ref,
    parse_ref,
    scan,
    validate_name,
)
from nsml_datasets._work import Tracker, copy_fd, remove_tree, tmp_name, write_all
from nsml_datasets.hashing import hash_bytes, hash_fd, new_hasher
from nsml_datasets.local import MAX_FDS, LocalChannel, LocalError
from nsml_datasets.manifest import LocalFile, open_walked, walk
from nsml_datasets.materialize import file_mode, prepare_dest

from .client import Client, NSMLError

PACK_MAX = 1 << 20
"""Files up to this size travel packed, many per request."""

PACK_BYTES = 16 << 20
"""Bytes per pack request."""

PACK_FILES = 2000
"""Files per pack request."""

SEGMENT = 1 << 30
"""Largest body of one blob request; bigger files go in segments (each one resumable)."""

CHUNK = 1 << 20
"""Bytes read and sent at once."""

T = TypeVar("T")

DEFAULT_WORKERS = 4
"""Requests in flight at once."""

LOCAL_BATCH_BYTES = 32 << 20
"""Bytes of files handed over in one message of the local transport (at most 250 files)."""

TRANSPORTS = ("auto", "local", "http")
"""``local``: hand files over as descriptors to a server on this machine; ``http``: send the
bytes; ``auto``: local when the server offers it and answers, else HTTP."""


def split_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` / ``NAME@k`` / ``NAME@latest`` -> ``(name, k or None)``.

    Raises:
        NSMLError: naming the rule, for a bad reference.
    """
    if ref.endswith("@latest"):
        ref = ref[: -len("@latest")]
    try:
        return parse_ref(ref)
    except DatasetError as e:
        raise NSMLError(e.message, 400, "bad_request") from None


def _path(name: str, *parts: str) -> str:
    return "datasets/" + "/".join(quote(p, safe="") for p in (name, *parts))


def _version_path(name: str, version: int | None) -> str:
    return _path(name, "versions", "latest" if version is None else str(version))


class _Sessions:
    """One ``requests`` session per thread, with the client's headers."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.local = threading.local()

    def get(self) -> requests.Session:
        s: requests.Session | None = getattr(self.local, "s", None)
        if s is None:
            s = requests.Session()
            s.headers.update(self.client._http.headers)
            self.local.s = s
        return s

    def call(
        self, method: str, path: str, *, ok: Sequence[int] = (200, 201, 202, 204), **kw: Any
    ) -> requests.Response:
        url = self.client.config.url(path)
        kw.setdefault("timeout", (15, 600))
        try:
            r = self.get().request(method, url, **kw)
        except requests.RequestException as e:
            raise NSMLError(
                f"Cannot reach the NSML API at {self.client.config.api_url} "
                f"({e.__class__.__name__}); run the same command again to resume.",
                reason="unreachable",
            ) from e
        if r.status_code not in ok:
            try:
                data = r.json()
                message, reason = str(data["message"]), str(data.get("reason"))
            except (ValueError, KeyError, TypeError):
                message, reason = f"{method} {url} answered {r.status_code}", "http_error"
            raise NSMLError(message, r.status_code, reason)
        return r


def _batches(
    items: Iterable[T], size_of: Callable[[T], int], max_items: int, max_bytes: int
) -> list[list[T]]:
    """*items* in order, cut into runs of at most *max_items* that end as soon as they reach
    *max_bytes*."""
    out: list[list[T]] = []
    run: list[T] = []
    size = 0
    for item in items:
        run.append(item)
        size += size_of(item)
        if len(run) >= max_items or size >= max_bytes:
            out.append(run)
            run, size = [], 0
    if run:
        out.append(run)
    return out


def _run_all(jobs: Sequence[Callable[[], None]], workers: int, progress: Tracker | None) -> None:
    """Run *jobs* on *workers* threads; the first error cancels the rest and is raised."""
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nsml-dataset") as pool:
        futures: list[Future[None]] = [pool.submit(job) for job in jobs]
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
                if progress is not None:
                    progress.emit()
                for f in done:
                    if f.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise f.exception()  # type: ignore[misc]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    if progress is not None:
        progress.emit(force=True)


# ---- the local transport -------------------------------------------------------------------


@dataclass
class _Local:
    """A key for the server's local socket, and the connections opened with it (one per
    thread)."""

    name: str
    key: str
    uid: int
    channels: list[LocalChannel] = field(default_factory=list)
    local: threading.local = field(default_factory=threading.local)

    def channel(self) -> LocalChannel:
        ch: LocalChannel | None = getattr(self.local, "ch", None)
        if ch is None:
            try:
                ch = LocalChannel(self.name, self.key, self.uid)
            except LocalError as e:
                raise _local_failed(e) from None
            self.local.ch = ch
            self.channels.append(ch)
        return ch

    def close(self) -> None:
        """Close every connection; the next :meth:`channel` opens new ones."""
        for ch in self.channels:
            ch.close()
        self.channels = []
        self.local = threading.local()


def _local_failed(e: LocalError) -> NSMLError:
    return NSMLError(
        f"the local transport failed: {e.message}; run again with --transport http",
        reason="local_" + e.reason,
    )


def _open_local(
    http: _Sessions, limits: dict[str, Any], transport: str, body: dict[str, Any]
) -> _Local | None:
    """A key for the server's local socket when *transport* allows it and the socket answers
    (``auto`` falls back to HTTP, quietly, when it does not)."""
    if transport not in TRANSPORTS:
        raise NSMLError(
            f"unknown transport {transport!r}: choose from {', '.join(TRANSPORTS)}", 400
        )
    name = limits.get("local_socket")
    if transport == "http" or (not name and transport == "auto"):
        return None
    if not name:
        raise NSMLError(
            "the server offers no local transport (it runs on another machine, or its "
            "dataset_local_transport is off); use --transport http",
            reason="local_unavailable",
        )
    try:
        grant = http.call("POST", "dataset-store/local", json=body).json()
        LocalChannel(str(name), str(grant["key"]), int(grant["uid"])).close()
    except LocalError as e:
        if transport == "local":
            raise _local_failed(e) from None
        return None
    except NSMLError:
        if transport == "local":
            raise
        return None
    return _Local(str(name), str(grant["key"]), int(grant["uid"]))


def _ingest_local(
    local: _Local,
    files: Sequence[LocalFile],
    parent: dict[str, tuple[str, int]],
    progress: Tracker,
    workers: int,
) -> list[Entry]:
    """Hand *files* over to the server, which stores them and names their content; the blobs
    become durable and visible when every batch is in (the server records them under the key
    as proven, so ``POST uploads`` naming the key need not have them sent). Returns the
    entries."""
    entries: list[Entry] = []
    lock = threading.Lock()

    def one(batch: list[LocalFile]) -> None:
        fds: list[int] = []
        try:
            for f in batch:
                fds.append(open_walked(f)[0])
            items = []
            for fd, f in zip(fds, batch, strict=True):
                hint = parent.get(f.path)
                items.append((fd, f.path, hint[0] if hint and hint[1] == f.size else None))
            try:
                got = local.channel().ingest(items)
            except LocalError as e:
                raise _local_failed(e) from None
        except DatasetError as e:
            raise NSMLError(e.message, 400, getattr(e, "reason", "bad_request")) from None
        finally:
            for fd in fds:
                os.close(fd)
        out = []
        for f, (sha, n) in zip(batch, got, strict=True):
            if n != f.size:
                raise NSMLError(
                    f"{f.path!r} changed while being pushed; push again.", reason="changed"
                )
            out.append(Entry(f.path, n, sha, f.executable))
        with lock:
            entries.extend(out)
        progress.add(sum(f.size for f in batch), files=len(batch), path=batch[-1].path)

    batches = _batches(files, lambda f: f.size, MAX_FDS, LOCAL_BATCH_BYTES)
    _run_all([partial(one, b) for b in batches], max(1, workers), progress)
    for ch in local.channels:
        try:
            ch.place()
        except LocalError as e:
            raise _local_failed(e) from None
    return entries


def _parent_blobs(client: Client, name: str) -> tuple[dict[str, tuple[str, int]], int | None]:
    """The latest version's files (path -> (blake3, size)) and its ``k``, or nothing for a
    new dataset (or one the caller cannot read)."""
    try:
        m, k = manifest(client, name)
    except NSMLError as e:
        if e.status == 404:
            return {}, None
        raise
    return {e.path: (e.blake3, e.size) for e in m}, k


# ---- pushing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` made.

    Attributes:
        ref: ``NAME@k``.
        version: the server's description of the new version.
        sent_bytes: bytes this run sent (a resumed push sends only the rest).
        new_bytes: bytes of the files that no version the pusher could read already held
            (the same whatever else the store holds; the store keeps one copy of each).
        transport: ``local`` (files handed over as descriptors) or ``http``.
    """

    ref: str
    version: dict[str, Any]
    sent_bytes: int
    new_bytes: int
    transport: str = "http"


class _FileSlice:
    """``size`` bytes of a file from ``offset``, as an iterable body with a known length."""

    def __init__(self, path: str, offset: int, size: int, progress: Tracker | None) -> None:
        self.path = path
        self.offset = offset
        self.size = size
        self.progress = progress

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            left = self.size
            while left > 0:
                data = f.read(min(CHUNK, left))
                if not data:
                    raise NSMLError(
                        f"{self.path!r} got shorter while being pushed; push again.",
                        reason="changed",
                    )
                left -= len(data)
                if self.progress is not None:
                    self.progress.add(len(data))
                yield data


def _send_blob(
    http: _Sessions,
    base: str,
    path: str,
    rel: str,
    sha: str,
    size: int,
    offset: int,
    progress: Tracker | None,
) -> int:
    """PUT one blob from *offset*, in segments of at most :data:`SEGMENT` bytes."""
    if progress is not None:
        progress.add(offset)
    sent = 0
    while True:
        length = min(SEGMENT, size - offset)
        r = http.call(
            "PUT",
            f"{base}/blobs/{sha}",
            params={"offset": offset},
            data=_FileSlice(path, offset, length, progress),
            headers={"Content-Type": "application/octet-stream"},
        )
        sent += length
        out = r.json()
        if out["complete"]:
            break
        if int(out["received"]) != offset + length:
            raise NSMLError(
                f"the server holds {out['received']} bytes of {rel!r}, expected {offset + length}",
                reason="conflict",
            )
        offset = int(out["received"])
    if progress is not None:
        progress.add(0, files=1, path=rel)
    return sent


class _PackBody:
    """Small files as one body, ``<blake3> <size>\\n<bytes>`` each, read while it is sent."""

    def __init__(self, items: Sequence[tuple[str, str, int, str]]) -> None:
        self.items = items
        self.heads = [f"{sha} {size}\n".encode("ascii") for sha, _, size, _ in items]

    def __len__(self) -> int:
        return sum(len(h) for h in self.heads) + sum(i[2] for i in self.items)

    def __iter__(self) -> Iterator[bytes]:
        out: list[bytes] = []
        pending = 0
        for head, (_, path, size, rel) in zip(self.heads, self.items, strict=True):
            with open(path, "rb", buffering=0) as f:
                data = f.read(size + 1)
            if len(data) != size:
                raise NSMLError(
                    f"{rel!r} changed while being pushed; push again.", reason="changed"
                )
            out += (head, data)
            pending += size
            if pending >= CHUNK:
                yield b"".join(out)
                out, pending = [], 0
        if out:
            yield b"".join(out)


def _send_pack(
    http: _Sessions,
    base: str,
    items: Sequence[tuple[str, str, int, str]],
    progress: Tracker | None,
) -> int:
    """POST many small blobs in one body: ``<blake3> <size>\\n<bytes>`` each."""
    http.call(
        "POST",
        f"{base}/pack",
        data=_PackBody(items),
        headers={"Content-Type": "application/octet-stream"},
    )
    if progress is not None:
        progress.add(sum(i[2] for i in items), files=len(items), path=items[-1][3])
    return sum(i[2] for i in items)


def _check_labels(path: Path, what: str) -> set[str]:
    """The ids of a labels CSV file ``id,label``; NSMLError naming the problem otherwise."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            header = [h.strip().lower() for h in next(rows, [])]
            if header != ["id", "label"]:
                raise NSMLError(
                    f"{what} {os.fspath(path)!r} must start with the header 'id,label', not "
                    f"{','.join(header)!r}",
                    400,
                    "bad_request",
                )
            ids: set[str] = set()
            for n, row in enumerate(rows, start=2):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != 2 or not row[0].strip():
                    raise NSMLError(
                        f"{what} {os.fspath(path)!r} line {n}: give 'id,label'", 400, "bad_request"
                    )
                if row[0].strip() in ids:
                    raise NSMLError(
                        f"{what} {os.fspath(path)!r} line {n}: id {row[0].strip()!r} again",
                        400,
                        "bad_request",
                    )
                ids.add(row[0].strip())
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise NSMLError(
            f"cannot read {what} {os.fspath(path)!r}: {e}", 400, "bad_request"
        ) from None
    if not ids:
        raise NSMLError(f"{what} {os.fspath(path)!r} has no labels", 400, "bad_request")
    return ids


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def staged_test_split(
    inputs: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    private_labels: str | os.PathLike[str] | None = None,
) -> Iterator[str]:
    """A temporary folder in the hidden split's layout: ``inputs/`` (the files of *inputs*,
    hard-linked where the filesystem allows, else copied), ``labels.csv`` and, with
    *private_labels*, ``private-labels.csv``. Removed on leaving.

    Raises:
        NSMLError: *inputs* is not a folder, or a labels file is not ``id,label`` CSV, or
            the two labels files share ids.
    """
    src = Path(inputs)
    if not src.is_dir():
        raise NSMLError(f"--test-inputs {os.fspath(src)!r} is not a folder", 400, "bad_request")
    public = _check_labels(Path(labels), "--test-labels")
    if private_labels is not None:
        shared = public & _check_labels(Path(private_labels), "--private-labels")
        if shared:
            raise NSMLError(
                f"--test-labels and --private-labels both name id {sorted(shared)[0]!r}; a "
                "test input belongs to one part",
                400,
                "bad_request",
            )
    tmp = Path(tempfile.mkdtemp(prefix="nsml-test-split-"))
    try:
        shutil.copytree(src, tmp / "inputs", symlinks=True, copy_function=_link_or_copy)
        _link_or_copy(os.fspath(labels), os.fspath(tmp / "labels.csv"))
        if private_labels is not None:
            _link_or_copy(os.fspath(private_labels), os.fspath(tmp / "private-labels.csv"))
        yield os.fspath(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: The server's built-in leaderboard metrics and whether a higher value is better (a push
#: that names one need not say the order).
BUILTIN_METRIC_ORDER = {
    "accuracy": True,
    "macro_f1": True,
    "roc_auc": True,
    "mse": False,
    "rmse": False,
    "mae": False,
}


def push(
    client: Client,
    name: str,
    folder: str | os.PathLike[str],
    *,
    test_split: str | os.PathLike[str] | None = None,
    metric: str | None = None,
    higher_is_better: bool | None = None,
    on_progress: ProgressCallback | None = None,
    workers: int = DEFAULT_WORKERS,
    transport: str = "auto",
) -> PushResult:
    """Push *folder* as the next version of dataset *name*; return ``NAME@k``.

    Args:
        test_split: a folder holding the hidden test split (stored apart, never mounted).
        metric, higher_is_better: the dataset's leaderboard settings, set after the push.
        on_progress: progress events: ``scan`` and ``hash`` (of each folder), ``upload``;
            through the local transport ``scan`` and ``upload`` (the server hashes).
        workers: requests in flight at once.
        transport: one of :data:`TRANSPORTS`. Through the local transport the files are
            handed over as open descriptors and the server copies and hashes them (a file
            that keeps its path, size and content since the latest version is hashed in place
            and not copied); the version is then committed over HTTP as usual.

    Raises:
        NSMLError: what the server refused, or an unsafe path in the folder (named).
    """
    try:
        validate_name(name)
    except DatasetError as e:
        raise NSMLError(e.message, 400, "bad_request") from None
    if metric is not None and higher_is_better is None:
        higher_is_better = BUILTIN_METRIC_ORDER.get(metric)
    if metric is not None and higher_is_better is None:
        raise NSMLError(
            "Say whether a higher metric is better (--higher-is-better or --lower-is-better).",
            400,
            "bad_request",
        )
    http = _Sessions(client)
    limits = http.call("GET", "dataset-store").json()
    roots = {"": Path(folder)}
    if test_split is not None:
        roots["test"] = Path(test_split)
    manifests: dict[str, Manifest] = {}
    parent: dict[str, tuple[str, int]] = {}
    grant: dict[str, Any] = {}
    if transport in TRANSPORTS and transport != "http" and limits.get("local_socket"):
        # The key reads the latest version: the server then hashes a file that kept its
        # path and size in place and copies it only if it changed (a hint it takes only for
        # blobs the key may read).
        parent, k = _parent_blobs(client, name)
        if k is not None:
            grant = {"dataset": name, "version": k}
    local = _open_local(http, limits, transport, grant)
    if local is None:
        parent = {}
    for split, root in roots.items():
        try:
            if local is None:
                manifests[split] = scan(
                    root,
                    max_file_bytes=int(limits["max_file_bytes"]),
                    max_files=int(limits["max_files"]),
                    on_progress=on_progress,
                )
                continue
            files = walk(
                root,
                max_file_bytes=int(limits["max_file_bytes"]),
                max_files=int(limits["max_files"]),
                on_progress=on_progress,
            )
            tracker = Tracker(
                "upload",
                on_progress,
                total_bytes=sum(f.size for f in files),
                total_files=len(files),
            )
            try:
                entries = _ingest_local(local, files, {} if split else parent, tracker, workers)
                manifests[split] = Manifest(entries)
            finally:
                local.close()
        except DatasetError as e:
            where = f" (test split {os.fspath(root)!r})" if split else ""
            raise NSMLError(
                f"{e.message}{where}", 400, getattr(e, "reason", "bad_request")
            ) from None
    body: dict[str, Any] = {"manifest": manifests[""].to_dict()}
    if "test" in manifests:
        body["test_manifest"] = manifests["test"].to_dict()
    if local is not None:
        body["local_key"] = local.key
    up = http.call("POST", _path(name, "uploads"), json=body).json()
    base = _path(name, "uploads", up["upload_id"])
    sources: dict[str, tuple[str, str]] = {}
    for split, m in manifests.items():
        for entry in m:
            sources.setdefault(entry.blake3, (os.path.join(roots[split], entry.path), entry.path))
    missing = up["missing"]
    progress = Tracker(
        "upload",
        on_progress,
        total_bytes=sum(b["size"] for b in missing),
        total_files=len(missing),
    )
    jobs: list[Callable[[], None]] = []  # large blobs first: packs fill the end evenly
    packs: list[Callable[[], None]] = []
    sent = [0]
    lock = threading.Lock()

    def count(n: int) -> None:
        with lock:
            sent[0] += n

    def send_blob(sha: str, path: str, rel: str, size: int, offset: int) -> None:
        count(_send_blob(http, base, path, rel, sha, size, offset, progress))

    def send_pack(items: list[tuple[str, str, int, str]]) -> None:
        count(_send_pack(http, base, items, progress))

    small: list[tuple[str, str, int, str]] = []
    for b in missing:
        sha, size, offset = b["blake3"], int(b["size"]), int(b["offset"])
        path, rel = sources[sha]
        if size <= PACK_MAX and offset == 0:
            small.append((sha, path, size, rel))
        else:
            jobs.append(partial(send_blob, sha, path, rel, size, offset))
    for items in _batches(small, lambda i: i[2], PACK_FILES, PACK_BYTES):
        packs.append(partial(send_pack, items))
    try:
        _run_all(jobs + packs, max(1, workers), progress)
    except NSMLError as e:
        if e.reason == "integrity":
            raise NSMLError(
                f"{e.message} (a file changed while being pushed?); push again.",
                e.status,
                e.reason,
            ) from None
        raise
    version = http.call("POST", f"{base}/commit").json()
    if metric is not None or higher_is_better is not None:
        patch: dict[str, Any] = {"higher_is_better": higher_is_better}
        if metric is not None:
            patch["metric"] = metric
        http.call("PATCH", _path(name), json=patch)
    return PushResult(
        ref=str(version["ref"]),
        version=version,
        sent_bytes=sent[0],
        new_bytes=int(version.get("new_bytes", 0)),
        transport="http" if local is None else "local",
    )


# ---- pulling -------------------------------------------------------------------------------


def manifest(
    client: Client, name: str, version: int | None = None, *, split: str = ""
) -> tuple[Manifest, int]:
    """The manifest of ``name@version`` (verified against its digest) and the version ``k``."""
    http = _Sessions(client)
    r = http.call(
        "GET",
        _version_path(name, version) + "/manifest",
        params={"split": split} if split else None,
    )
    digest = r.headers.get("X-Manifest-Digest", "")
    if hash_bytes(r.content) != digest:
        raise NSMLError(
            f"the manifest of {name} does not match its digest {digest}", reason="integrity"
        )
    info = http.call("GET", _version_path(name, version)).json()
    try:
        return Manifest.from_json(r.content), int(info["version"])
    except DatasetError as e:
        raise NSMLError(f"the server sent a bad manifest: {e.message}", reason="integrity") from e


class _Sink:
    """Writes one blob's bytes to its first file, hashing them."""

    def __init__(
        self, build: str, entry_path: str, size: int, sha: str, rel: str, mode: int = 0o644
    ) -> None:
        self.target = os.path.join(build, entry_path)
        self.fd = os.open(
            self.target,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            mode,
        )
        self.h = new_hasher()
        self.n = 0
        self.size = size
        self.sha = sha
        self.rel = rel

    def write(self, data: bytes | memoryview) -> None:
        if self.n + len(data) > self.size:
            raise IntegrityError(
                f"{self.rel!r}: the server sent more than its {self.size} bytes",
                blake3=self.sha,
                actual=f"{self.n + len(data)}+ bytes",
            )
        self.h.update(data)
        write_all(self.fd, data)
        self.n += len(data)

    def close(self) -> None:
        os.close(self.fd)
        if self.n != self.size or self.h.hexdigest() != self.sha:
            raise IntegrityError(
                f"{self.rel!r} is corrupt: expected blake3 {self.sha} and {self.size} bytes, "
                f"got {self.h.hexdigest()} and {self.n} bytes",
                blake3=self.sha,
                actual=self.h.hexdigest(),
            )


def pull(
    client: Client,
    ref: str,
    dest: str | os.PathLike[str],
    *,
    split: str = "",
    on_progress: ProgressCallback | None = None,
    workers: int = DEFAULT_WORKERS,
    transport: str = "auto",
) -> tuple[str, Path]:
    """Download ``NAME[@k]`` into the new folder *dest*, verifying every file's BLAKE3.

    Files are the user's own, writable copies. The folder is built under a hidden sibling and
    renamed into place at the end: *dest* is complete or absent. Through the local transport
    (*transport*, one of :data:`TRANSPORTS`) the server hands over read-only descriptors of
    the blobs and they are copied in the kernel, then verified like downloaded ones.

    Returns:
        ``(NAME@k, dest)``.

    Raises:
        NSMLError: the server refused, or a file does not match its hash (nothing is left).
    """
    name, version = split_ref(ref)
    m, k = manifest(client, name, version, split=split)
    vbase = _version_path(name, k)
    target = Path(dest).absolute()
    try:
        prepare_dest(target)
    except DatasetError as e:
        raise NSMLError(e.message, 400, "exists") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    build = tmp_name(target.parent, f".{target.name}.partial-")
    http = _Sessions(client)
    local = None
    if transport != "http":
        limits = http.call("GET", "dataset-store").json()
        local = _open_local(
            http, limits, transport, {"dataset": name, "version": k, "split": split}
        )
    build.mkdir(mode=0o755)
    groups = m.by_sha()
    progress = Tracker("fetch", on_progress, total_bytes=m.blob_bytes, total_files=len(groups))
    extra = {"split": split} if split else {}
    try:
        for folder in sorted({os.path.dirname(e.path) for e in m if "/" in e.path}):
            os.makedirs(os.path.join(build, folder), exist_ok=True)

        def fetch_one(sha: str) -> None:
            first = groups[sha][0]
            sink = _Sink(os.fspath(build), first.path, first.size, sha, first.path, _mode(first))
            try:
                with http.call(
                    "GET", f"{vbase}/blobs/{sha}", params=extra or None, stream=True
                ) as r:
                    for data in r.iter_content(CHUNK):
                        sink.write(data)
                        progress.add(len(data))
            finally:
                sink.close()
            progress.add(0, files=1, path=first.path)

        def fetch_pack(shas: list[str]) -> None:
            with http.call(
                "POST", f"{vbase}/pack", json={"blobs": shas, **extra}, stream=True
            ) as r:
                buf = bytearray()
                pos = 0
                stream = r.iter_content(CHUNK)

                def more(path: str) -> None:
                    nonlocal pos
                    data = next(stream, b"")
                    if not data:
                        raise IntegrityError(
                            f"{path!r}: the server's answer ended early", blake3="", actual=""
                        )
                    del buf[:pos]
                    pos = 0
                    buf.extend(data)

                for sha in shas:
                    first = groups[sha][0]
                    while (nl := buf.find(b"\n", pos)) < 0:
                        more(first.path)
                    head = buf[pos:nl].decode("ascii").split(" ")
                    if head[0] != sha or int(head[1]) != first.size:
                        raise IntegrityError(
                            f"{first.path!r}: the server sent {head[0]} instead",
                            blake3=sha,
                            actual=head[0],
                        )
                    pos = nl + 1
                    while len(buf) - pos < first.size:
                        more(first.path)
                    sink = _Sink(
                        os.fspath(build), first.path, first.size, sha, first.path, _mode(first)
                    )
                    try:
                        sink.write(memoryview(buf)[pos : pos + first.size])
                    finally:
                        sink.close()
                    pos += first.size
                    progress.add(first.size, files=1, path=first.path)

        def fetch_local(shas: list[str]) -> None:
            assert local is not None
            try:
                opened = local.channel().open(shas)
            except LocalError as e:
                raise _local_failed(e) from None
            try:
                for sha, (fd, _) in zip(shas, opened, strict=True):
                    first = groups[sha][0]
                    out = os.open(
                        os.path.join(build, first.path),
                        os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        _mode(first),
                    )
                    try:
                        n = copy_fd(fd, out, first.size + 1)
                        actual = hash_fd(out, n) if n == first.size else f"{n} bytes"
                    finally:
                        os.close(out)
                    if actual != sha:
                        raise IntegrityError(
                            f"{first.path!r} is corrupt: expected blake3 {sha} and "
                            f"{first.size} bytes, got {actual}",
                            blake3=sha,
                            actual=actual,
                        )
                    progress.add(first.size, files=1, path=first.path)
            finally:
                for fd, _ in opened:
                    os.close(fd)

        def size_of(sha: str) -> int:
            return groups[sha][0].size

        jobs: list[Callable[[], None]] = []
        if local is not None:
            for b in _batches(groups, size_of, MAX_FDS, LOCAL_BATCH_BYTES):
                jobs.append(partial(fetch_local, b))
        else:
            jobs += [partial(fetch_one, sha) for sha in groups if size_of(sha) > PACK_MAX]
            small = [sha for sha in groups if size_of(sha) <= PACK_MAX]
            for b in _batches(small, size_of, PACK_FILES, PACK_BYTES):
                jobs.append(partial(fetch_pack, b))
        _run_all(jobs, max(1, workers), progress)
        # The other paths of a content that appears several times (files are created with
        # their final permissions, umask applied, as cp does).
        for entries in groups.values():
            first = os.path.join(build, entries[0].path)
            for other in entries[1:]:
                _copy(first, os.path.join(build, other.path), _mode(other))
        if target.is_dir():
            target.rmdir()
        os.rename(build, target)
    except IntegrityError as e:
        remove_tree(build)
        raise NSMLError(e.message, reason="integrity") from None
    except BaseException:
        remove_tree(build)
        raise
    finally:
        if local is not None:
            local.close()
    return format_ref(name, k), target


def _mode(entry: Any) -> int:
    return file_mode(entry, readonly=False)


def _copy(src: str, dst: str, mode: int) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with open(src, "rb") as f, os.fdopen(fd, "wb") as g:
        while data := f.read(CHUNK):
            g.write(data)


# ---- the rest ------------------------------------------------------------------------------


def ls(client: Client, scope: str = "all") -> list[dict[str, Any]]:
    """Datasets the caller can read (``scope``: ``mine``, ``team``, ``public`` or ``all``)."""
    out: list[dict[str, Any]] = client.request("GET", "datasets", scope=scope)["datasets"]
    return out


def info(client: Client, ref: str) -> dict[str, Any]:
    """A dataset with its versions (``NAME``), or one version (``NAME@k``)."""
    name, version = split_ref(ref)
    if version is None and "@" not in ref:
        out: dict[str, Any] = client.request("GET", _path(name))
        return out
    version_out: dict[str, Any] = client.request("GET", _version_path(name, version))
    return version_out


def rm(client: Client, ref: str) -> dict[str, Any]:
    """Remove ``NAME@k``, or the whole dataset ``NAME``; refused while a session uses it."""
    name, version = split_ref(ref)
    if version is None and "@" in ref:
        raise NSMLError(f"Name the version to remove ({name}@3), or the whole {name}.", 400)
    path = _path(name) if version is None else _version_path(name, version)
    out: dict[str, Any] = client.request("DELETE", path)
    return out


def share(client: Client, name: str, visibility: str, team: str | None = None) -> dict[str, Any]:
    """Make *name* ``private``, readable by the JupyterHub group *team``, or ``public``."""
    body: dict[str, Any] = {"visibility": visibility}
    if team is not None:
        body["team"] = team
    out: dict[str, Any] = client.request("PATCH", _path(name), body)
    return out


def set_leaderboard(
    client: Client, name: str, metric: str | None, higher_is_better: bool | None
) -> dict[str, Any]:
    """Set (or with ``metric=None`` clear) the dataset's leaderboard metric and its order."""
    out: dict[str, Any] = client.request(
        "PATCH", _path(name), {"metric": metric, "higher_is_better": higher_is_better}
    )
    return out


def gc(client: Client, older_than_s: float) -> dict[str, Any]:
    """Collect the store's garbage now (admin)."""
    out: dict[str, Any] = client.request("POST", "dataset-store/gc", {"older_than_s": older_than_s})
    return out


# ---- progress display ----------------------------------------------------------------------

PHASES = {
    "scan": "scanning",
    "hash": "hashing",
    "upload": "uploading",
    "fetch": "downloading",
    "push": "storing",
    "materialize": "building",
}


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where a widget can be shown)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except AttributeError:
        return False
    return shell is not None and hasattr(shell, "kernel")


class ProgressBar:
    """A progress callback that draws one bar per phase: ``tqdm`` in a terminal, an
    ``ipywidgets`` bar in a notebook (``widget=True``). Call :meth:`close` at the end."""

    def __init__(self, *, widget: bool | None = None, file: Any = None) -> None:
        self.widget = in_notebook() if widget is None else widget
        self.file = file if file is not None else sys.stderr
        self.phase = ""
        self.bar: Any = None
        self.label: Any = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.phase != self.phase:
            self._finish()
            self.phase = event.phase
            self._open(event)
        if self.widget:
            self.bar.max = max(1, event.total_bytes)
            self.bar.value = event.done_bytes
            self.label.value = (
                f"{PHASES.get(event.phase, event.phase)} {event.done_files}/{event.total_files} "
                f"files, {_mib(event.done_bytes)}/{_mib(event.total_bytes)} MiB"
            )
        else:
            self.bar.total = event.total_bytes or None
            self.bar.update(event.done_bytes - self.bar.n)

    def _open(self, event: ProgressEvent) -> None:
        desc = PHASES.get(event.phase, event.phase)
        if self.widget:
            import ipywidgets
            from IPython.display import display

            self.bar = ipywidgets.IntProgress(
                min=0, max=max(1, event.total_bytes), description=desc
            )
            self.label = ipywidgets.Label()
            display(ipywidgets.HBox([self.bar, self.label]))
        else:
            from tqdm import tqdm

            self.bar = tqdm(
                total=event.total_bytes or None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                file=self.file,
                leave=True,
                dynamic_ncols=True,
            )

    def _finish(self) -> None:
        if self.bar is None:
            return
        if self.widget:
            self.bar.bar_style = "success"
        else:
            self.bar.close()
        self.bar = None

    def close(self) -> None:
        self._finish()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def progress_bar(enabled: bool = True) -> ProgressBar | None:
    """A :class:`ProgressBar` for this environment, or ``None`` when *enabled* is false."""
    return ProgressBar() if enabled else None

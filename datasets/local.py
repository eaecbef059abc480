"""Pushing and pulling on the store's own machine: files handed over as open descriptors.

A client on the same machine as the NSML server (its command line, and every notebook server
and session placed on the server's node: containers share the host's network namespace) does
not need to send a dataset's bytes through HTTP. It opens its files and hands the descriptors
to the server over a Unix socket (``SCM_RIGHTS``); the server copies each one into the store
in the kernel (``copy_file_range``, as ``cp`` does) and hashes the copy, so the blob's name
is true whatever the client does to its file meanwhile. A pull is the mirror image: the server
hands over read-only descriptors of the blobs the caller may read, and the client copies them
into its own files and verifies every byte against its BLAKE3.

Nothing here grants access by itself. The HTTP API (authenticated by the hub) issues a *key*
(:class:`Grants`) for one user: a key lets its holder store blobs (as an HTTP upload does) and
open the blobs of the one version the API checked that the user may read. A version still
becomes visible only through the HTTP upload and commit, with every check they make. Every
file handed over is hashed by the server, so the key records its blobs as *proven*: the
holder had their bytes, and an upload that names the key may skip them. Nothing a key's holder
is told depends on what else the store holds: ``place`` counts what the connection handed
over, not what was new to the store, and the "unchanged since the previous version" shortcut
(``expect``) is taken only for a blob of the version the key reads.

The socket lives in the abstract namespace (no file to mount or clean up; every process of the
host's network namespace can connect, the key decides what it may do). The client checks the
peer's user id (``SO_PEERCRED``) against the one the API announced before it hands over any
descriptor, so a process squatting the name cannot collect a user's files.

Wire format, both ways: a 4-byte big-endian length, then that many bytes of JSON; descriptors
ride on the first segment of a message. Requests::

    {"op": "ingest", "key": K, "files": [{"name": REL, "expect": BLAKE3|null}, ...]} + fds
        -> {"blobs": [{"blake3": H, "size": N}, ...]}       (blobs wait, unlinked from view)
    {"op": "place", "key": K}  -> {"placed": N, "bytes": B}  (one sync, then into blobs/;
                                   N, B: the distinct blobs this connection handed over)
    {"op": "open", "key": K, "blobs": [H, ...]} -> {"sizes": [N, ...]} + fds (read-only)

An error answers ``{"error": MESSAGE, "reason": R}`` and the connection stays usable; blobs
ingested on a connection that closes before ``place`` are removed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DatasetError, InvalidName
from .manifest import validate_digest
from .store import BlobStore, Staged

log = logging.getLogger("nsml_datasets.local")

MAX_FDS = 250
"""Descriptors per message (the kernel's limit is 253)."""

MAX_MESSAGE = 4 << 20
"""Largest JSON message, in bytes."""

DEFAULT_TTL_S = 3600.0
"""How long a key stays valid."""

_HEAD = struct.Struct(">I")
_CREDS = struct.Struct("3i")


class LocalError(DatasetError):
    """The local transport failed (not reachable, refused, or a broken conversation)."""


def address(name: str) -> str | bytes:
    """The ``bind``/``connect`` address of *name*: ``@x`` is ``x`` in the abstract namespace."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def send_message(sock: socket.socket, obj: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one framed JSON message, with *fds* attached."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    frame = _HEAD.pack(len(body)) + body
    sent = socket.send_fds(sock, [frame], list(fds)) if fds else 0
    if sent < len(frame):
        sock.sendall(frame[sent:])


def recv_message(sock: socket.socket, max_fds: int = MAX_FDS) -> tuple[dict[str, Any], list[int]]:
    """Receive one framed JSON message and the descriptors that came with it (the caller
    closes them).

    Raises:
        EOFError: the peer closed the connection before a message began.
        LocalError: a malformed or truncated message (its descriptors are closed).
    """
    data, fds, flags, _ = socket.recv_fds(sock, 1 << 16, max_fds)
    if not data:
        _close(fds)
        raise EOFError
    try:
        if flags & socket.MSG_CTRUNC:
            raise LocalError(f"more than {max_fds} descriptors in one message", reason="protocol")
        buf = bytearray(data)
        while len(buf) < _HEAD.size:
            buf += _recv_some(sock, _HEAD.size - len(buf))
        (n,) = _HEAD.unpack_from(buf)
        if n > MAX_MESSAGE:
            raise LocalError(f"a message of {n} bytes is over the limit", reason="protocol")
        while len(buf) < _HEAD.size + n:
            buf += _recv_some(sock, _HEAD.size + n - len(buf))
        obj = json.loads(buf[_HEAD.size :])
        if not isinstance(obj, dict):
            raise LocalError("a message must be a JSON object", reason="protocol")
        return obj, fds
    except (ValueError, LocalError, OSError):
        _close(fds)
        raise


def _recv_some(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(min(n, 1 << 20))
    if not data:
        raise LocalError("the connection closed in the middle of a message", reason="protocol")
    return data


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- the server's side -----------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """What one key allows.

    Attributes:
        user: who it was issued to (for the logs).
        expires: ``time.monotonic()`` after which it is refused.
        readable: the blobs its holder may open (one version's), BLAKE3 to size; also the
            only blobs an ``expect`` hint may name.
        max_file_bytes: the largest file its holder may store.
        proven: the blobs of every file its holder handed over and the server hashed,
            BLAKE3 to size, whether or not the store held them before (filled under the
            :class:`Grants` lock).
    """

    user: str
    expires: float
    readable: Mapping[str, int]
    max_file_bytes: int
    proven: dict[str, int] = field(default_factory=dict)


class Grants:
    """Keys issued by the HTTP API, checked by :class:`LocalServer`; thread-safe."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._grants: dict[str, Grant] = {}
        self._lock = threading.Lock()

    def issue(
        self, user: str, *, max_file_bytes: int, readable: Mapping[str, int] | None = None
    ) -> str:
        """A new key for *user*: it may store files and open the blobs in *readable*."""
        key = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            for k in [k for k, g in self._grants.items() if g.expires < now]:
                del self._grants[k]
            self._grants[key] = Grant(user, now + self.ttl_s, dict(readable or {}), max_file_bytes)
        return key

    def check(self, key: object) -> Grant:
        """The grant of *key*.

        Raises:
            LocalError: unknown or expired (``reason="forbidden"``).
        """
        with self._lock:
            grant = self._grants.get(key) if isinstance(key, str) else None
        if grant is None or grant.expires < time.monotonic():
            raise LocalError(
                "unknown or expired key: ask the API for a new one", reason="forbidden"
            )
        return grant

    def record_proven(self, key: str, blobs: Mapping[str, int]) -> None:
        """Note that *key*'s holder handed over files holding *blobs* (BLAKE3 to size), now
        in the store."""
        with self._lock:
            grant = self._grants.get(key)
            if grant is not None:
                grant.proven.update(blobs)

    def proven_by(self, key: str, user: str) -> dict[str, int]:
        """The blobs whose bytes *user* handed over with the key *key*, BLAKE3 to size.

        Raises:
            LocalError: unknown or expired, or issued to another user (``reason="forbidden"``).
        """
        grant = self.check(key)
        if grant.user != user:
            raise LocalError("this key was issued to another user", reason="forbidden")
        with self._lock:
            return dict(grant.proven)


class LocalServer:
    """Serves :mod:`this module's <nsml_datasets.local>` protocol for one store, a thread per
    connection.

    Args:
        store: where ingested files go and opened blobs come from.
        grants: the keys the API issued.
        name: the socket's name (``@...`` for the abstract namespace, else a path); by default
            a fresh abstract name.
    """

    def __init__(self, store: BlobStore, grants: Grants, name: str | None = None) -> None:
        self.store = store
        self.grants = grants
        self.name = name or f"@jupyter-nsml-datasets-{os.getpid()}-{secrets.token_hex(8)}"
        self.uid = os.geteuid()
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> LocalServer:
        """Bind and start accepting in a background thread."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(address(self.name))
        if not self.name.startswith("@"):
            os.chmod(self.name, 0o666)  # any local user may connect: the key decides
        sock.listen(64)
        self._sock = sock
        threading.Thread(target=self._accept, name="nsml-datasets-local", daemon=True).start()
        log.info("local dataset transport on %s", self.name)
        return self

    def close(self) -> None:
        """Stop accepting and end every connection (their unplaced blobs are removed)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            if not self.name.startswith("@"):
                try:
                    os.unlink(self.name)
                except FileNotFoundError:
                    pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="nsml-datasets-local-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        staged: Staged = []
        sizes: dict[str, int] = {}
        try:
            while True:
                try:
                    req, fds = recv_message(conn)
                except EOFError:
                    return
                except LocalError as e:
                    send_message(conn, {"error": e.message, "reason": e.reason})
                    return
                out: list[int] = []
                try:
                    reply = self._handle(req, fds, staged, sizes, out)
                except Exception as e:
                    _close(out)
                    out = []
                    if isinstance(e, DatasetError):
                        reply = {"error": e.message, "reason": e.reason}
                    else:
                        log.exception("local dataset request %r failed", req.get("op"))
                        reply = {"error": "the server failed; see its log", "reason": "internal"}
                finally:
                    _close(fds)
                try:
                    send_message(conn, reply, out)
                finally:
                    _close(out)
        except OSError:
            return
        finally:
            self.store.drop_staged(staged)
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _handle(
        self,
        req: Mapping[str, Any],
        fds: list[int],
        staged: Staged,
        sizes: dict[str, int],
        out: list[int],
    ) -> dict[str, Any]:
        grant = self.grants.check(req.get("key"))
        op = req.get("op")
        if op == "ingest":
            files = req.get("files")
            if not isinstance(files, list) or len(files) != len(fds):
                raise LocalError(
                    "'files' must describe each descriptor sent, in order", reason="protocol"
                )
            blobs = []
            for f, fd in zip(files, fds, strict=True):
                name = str(f.get("name", "?")) if isinstance(f, dict) else "?"
                expect = f.get("expect") if isinstance(f, dict) else None
                if not isinstance(expect, str) or expect not in grant.readable:
                    expect = None  # a hint may name only a blob the key may read
                sha, size, _ = self.store.ingest_fd(
                    fd, name, staged=staged, limit=grant.max_file_bytes, expect=expect
                )
                blobs.append({"blake3": sha, "size": size})
                sizes[sha] = size
            return {"blobs": blobs}
        if op == "place":
            self.store.place_staged(staged)
            handed = dict(sizes)
            staged.clear()
            sizes.clear()
            self.grants.record_proven(req["key"], handed)
            return {"placed": len(handed), "bytes": sum(handed.values())}
        if op == "open":
            shas = req.get("blobs")
            if not isinstance(shas, list) or len(shas) > MAX_FDS:
                raise LocalError(f"'blobs' must list at most {MAX_FDS} blobs", reason="protocol")
            for sha in shas:
                validate_digest(sha)
                if sha not in grant.readable:
                    raise InvalidName(f"blob {sha} is not part of the version this key reads")
                out.append(os.open(self.store.blob_path(sha), os.O_RDONLY | os.O_CLOEXEC))
            return {"sizes": [grant.readable[sha] for sha in shas]}
        raise LocalError(f"unknown op {op!r}: ingest, place or open", reason="protocol")


# -- the client's side -----------------------------------------------------------------------


class LocalChannel:
    """One connection to a :class:`LocalServer`, for one thread at a time.

    Raises:
        LocalError: the socket does not answer, or answers as another user than *uid*.
    """

    def __init__(self, name: str, key: str, uid: int | None = None) -> None:
        self.key = key
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address(name))
            _, peer_uid, _ = _CREDS.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
            )
        except OSError as e:
            sock.close()
            raise LocalError(f"cannot reach {name}: {e.strerror}", reason="unreachable") from None
        if uid is not None and peer_uid != uid:
            sock.close()
            raise LocalError(
                f"{name} answers as user {peer_uid}, not as the server's user {uid}",
                reason="impostor",
            )
        self.sock = sock

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> LocalChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, req: dict[str, Any], fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        req["key"] = self.key
        try:
            send_message(self.sock, req, fds)
            reply, got = recv_message(self.sock)
        except EOFError:
            raise LocalError("the server closed the connection", reason="unreachable") from None
        except OSError as e:
            raise LocalError(f"the connection failed: {e.strerror}", reason="unreachable") from None
        if "error" in reply:
            _close(got)
            raise LocalError(str(reply["error"]), reason=str(reply.get("reason") or "refused"))
        return reply, got

    def ingest(self, files: Sequence[tuple[int, str, str | None]]) -> list[tuple[str, int]]:
        """Hand over open files ``(fd, name, expect)``; returns each one's ``(blake3, size)``.

        The descriptors stay the caller's to close.
        """
        reply, got = self._call(
            {"op": "ingest", "files": [{"name": n, "expect": x} for _, n, x in files]},
            [fd for fd, _, _ in files],
        )
        _close(got)
        return [(str(b["blake3"]), int(b["size"])) for b in reply["blobs"]]

    def place(self) -> tuple[int, int]:
        """Make what this connection ingested durable and visible; returns how many distinct
        blobs and bytes it handed over (the same whatever the store held before)."""
        reply, got = self._call({"op": "place"})
        _close(got)
        return int(reply["placed"]), int(reply["bytes"])

    def open(self, shas: Sequence[str]) -> list[tuple[int, int]]:
        """Read-only descriptors of blobs ``(fd, size)``, in order; the caller closes them."""
        reply, got = self._call({"op": "open", "blobs": list(shas)})
        sizes = reply.get("sizes")
        if not isinstance(sizes, list) or len(sizes) != len(shas) or len(got) != len(shas):
            _close(got)
            raise LocalError("the server sent a wrong number of blobs", reason="protocol")
        return list(zip(got, (int(s) for s in sizes), strict=True))

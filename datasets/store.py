"""The content-addressed blob store: immutable blobs, manifests, resumable uploads, gc.

Layout under ``root`` (plain files; the NSML server keeps names, versions, owners and
visibility in its database and refers to a version by its manifest digest)::

    blobs/ab/cdef...        one file per distinct content, named by its BLAKE3; read-only
    manifests/<digest>.json the canonical JSON of every committed manifest
    uploads/<id>/           an upload in progress: manifest.json, parts/<sha> (partial blobs),
                            credited (the blobs counted as present for this upload)
    tmp/                    files being written; removed by gc when stale
    FORMAT                  the layout and the hash that names blobs (``nsml-blob-store/2 blake3``)

Guarantees:

- A blob's name is the BLAKE3 of its bytes: every write hashes what it writes and refuses a
  mismatch or a length other than announced; a blob is written to ``tmp/`` (or its upload's
  ``parts/``), made durable (``durable=True``: an fsync per blob, or one ``syncfs`` for the
  whole batch of a local :meth:`BlobStore.push_folder`), made read-only and only then linked
  into ``blobs/``. An existing blob is never replaced.
- A manifest file appears last, only once every blob it names is present (:meth:`Upload.commit`),
  so a version is visible only when complete. A push killed at any point leaves no manifest; its
  blobs and parts are removed by :meth:`BlobStore.gc` once the upload is older than the grace
  period, unless the client resumes it first with the same upload id.
- An upload skips a blob only when it is credited to that upload (:meth:`Upload.credit`: the
  server vouches that the uploader may read it, or has just handed it over); any other blob's
  bytes must arrive and match, even when the store holds it. What an upload answers depends
  on what its uploader sent or may read, never on what else the store holds: a hash is a name,
  not a capability. Storage is still deduplicated: a blob is stored once.
- Nothing is written outside ``root``: blob names, digests and upload ids are validated before
  they become paths.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ._work import (
    LINK_FALLBACK_ERRNOS,
    READ_ONLY,
    Readable,
    Tracker,
    atomic_write,
    copy_fd,
    default_workers,
    flush_files,
    fsync_dir,
    link_anonymous,
    log,
    open_anonymous,
    open_regular,
    pump,
    remove_tree,
    run_parallel,
    sync_fds,
    tmp_name,
    write_all,
)
from .errors import (
    Busy,
    DatasetError,
    IntegrityError,
    InvalidName,
    NotFound,
    UnsafePath,
    UploadIncomplete,
)
from .hashing import ALGORITHM, hash_bytes, hash_fd, new_hasher
from .manifest import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_FILES,
    Entry,
    LocalFile,
    Manifest,
    hash_local,
    open_walked,
    validate_digest,
    walk,
)
from .materialize import Mode, build_tree
from .progress import ProgressCallback

DEFAULT_GRACE_S = 24 * 3600.0
"""Default ``older_than`` of :meth:`BlobStore.gc`: an upload idle for a day is abandoned."""

OnBytes = Callable[[int], None] | None
Staged = list[tuple[Path, str]]

_UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}\Z")

_BATCH_FDS = 256
"""Unnamed files open at once while a batch of small blobs is stored."""


STORE_FORMAT = "nsml-blob-store/2 " + ALGORITHM
"""The first line of ``ROOT/FORMAT``: the layout and the hash that names blobs."""


def validate_upload_id(upload_id: object) -> str:
    """Return *upload_id* when it is 32 lowercase hexadecimal digits.

    Raises:
        InvalidName: naming the bad value.
    """
    if not isinstance(upload_id, str) or not _UPLOAD_ID_RE.match(upload_id):
        raise InvalidName(
            f"invalid upload id {upload_id!r}: expected 32 lowercase hexadecimal digits"
        )
    return upload_id


@dataclass(frozen=True, slots=True)
class GcReport:
    """What :meth:`BlobStore.gc` removed.

    Attributes:
        blobs_removed: blobs no live manifest or active upload references.
        bytes_freed: their bytes.
        manifests_removed: manifest files not in the live set.
        uploads_removed: uploads idle for longer than the grace period.
        tmp_removed: stale temporary files and folders.
        missing_live: live digests whose manifest file does not exist (the server's records
            point at versions the store lacks: an operator should look).
    """

    blobs_removed: int = 0
    bytes_freed: int = 0
    manifests_removed: int = 0
    uploads_removed: int = 0
    tmp_removed: int = 0
    missing_live: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """Blob count and bytes of a store (``du`` of ``blobs/``, apparent sizes)."""

    blobs: int
    bytes: int


def _age_stamp(st: os.stat_result) -> float:
    """When a file was last written, linked or renamed: a hard link to an old file is new."""
    return max(st.st_mtime, st.st_ctime)


class _TooLarge(Exception):
    """A source longer than its limit (turned into a message by the caller)."""


@dataclass(frozen=True, slots=True)
class PushResult:
    """What :meth:`BlobStore.push_folder` stored.

    Attributes:
        digest: the committed manifest's digest.
        manifest: the manifest.
        new_blobs: blobs the store did not have before.
        new_bytes: their bytes: what the push added to the store.
    """

    digest: str
    manifest: Manifest
    new_blobs: int
    new_bytes: int


class BlobStore:
    """A content-addressed store of dataset files on one filesystem.

    Safe for several threads and several processes on the same root (the NSML server and a
    standby); the only coordination needed is the atomic rename and link of files.

    Args:
        root: the store folder; created when missing.
        max_blob_bytes: largest blob accepted, in bytes (default 100 GiB).
        durable: fsync blobs before they appear and manifests before a version is visible.
            ``False`` is for tests and benchmarks; after a power loss a non-durable store may
            hold truncated blobs.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_blob_bytes: int = DEFAULT_MAX_FILE_BYTES,
        durable: bool = True,
    ) -> None:
        self.root = Path(root).absolute()
        self.max_blob_bytes = max_blob_bytes
        self.durable = durable
        self.blobs_dir = self.root / "blobs"
        self.manifests_dir = self.root / "manifests"
        self.uploads_dir = self.root / "uploads"
        self.tmp_dir = self.root / "tmp"
        self._blobs = os.fspath(self.blobs_dir)
        self._check_format()
        for d in (self.blobs_dir, self.manifests_dir, self.uploads_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def _check_format(self) -> None:
        """Refuse a store whose blobs are named by another hash; mark a new store."""
        marker = self.root / "FORMAT"
        try:
            found = marker.read_text().strip()
        except FileNotFoundError:
            if self.blobs_dir.is_dir() and any(self.blobs_dir.iterdir()):
                found = "nsml-blob-store/1 sha256"
            else:
                self.root.mkdir(parents=True, exist_ok=True)
                atomic_write(marker, (STORE_FORMAT + "\n").encode(), durable=self.durable)
                return
        if found != STORE_FORMAT:
            raise DatasetError(
                f"the dataset store {os.fspath(self.root)!r} is in format {found!r}, this "
                f"version reads {STORE_FORMAT!r} (blobs named by {ALGORITHM}): point the server "
                "at a new, empty store folder and push the datasets again",
                reason="store-format",
            )

    def __repr__(self) -> str:
        return f"BlobStore({os.fspath(self.root)!r})"

    # -- blobs ---------------------------------------------------------------------------------

    def blob_path(self, sha: str) -> Path:
        """Where the blob *sha* lives (whether or not it exists).

        Raises:
            InvalidName: *sha* is not a BLAKE3 in hex.
        """
        return Path(self._blob(sha))

    def _blob(self, sha: str) -> str:
        validate_digest(sha)
        return f"{self._blobs}/{sha[:2]}/{sha[2:]}"

    def has(self, sha: str) -> bool:
        """Whether the blob is stored."""
        return os.path.exists(self._blob(sha))

    def missing(self, hashes: Iterable[str]) -> list[str]:
        """The hashes of *hashes* that are not stored, once each, in the order given."""
        seen: set[str] = set()
        out = []
        for sha in hashes:
            if sha not in seen:
                seen.add(sha)
                if not self.has(sha):
                    out.append(sha)
        return out

    def size(self, sha: str) -> int:
        """Bytes of a stored blob.

        Raises:
            NotFound: the blob is not stored.
        """
        try:
            return self.blob_path(sha).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {sha} is not in the store") from None

    def open(self, sha: str) -> BinaryIO:
        """Open a stored blob for reading (what the server streams to a remote node).

        Raises:
            NotFound: the blob is not stored.
        """
        try:
            return open(self.blob_path(sha), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {sha} is not in the store") from None

    def verify(self, sha: str) -> None:
        """Re-hash a stored blob.

        Raises:
            NotFound: the blob is not stored.
            IntegrityError: its bytes no longer match its name (disk corruption or tampering).
        """
        with self.open(sha) as f:
            h, _ = pump(f, None, limit=self.max_blob_bytes)
        if h.hexdigest() != sha:
            raise IntegrityError(
                f"blob {sha} is corrupt: its content hashes to {h.hexdigest()}",
                blake3=sha,
                actual=h.hexdigest(),
            )

    def usage(self) -> StoreUsage:
        """Count the stored blobs and their bytes."""
        count = total = 0
        for shard in os.scandir(self.blobs_dir):
            if shard.is_dir(follow_symlinks=False):
                for blob in os.scandir(shard.path):
                    count += 1
                    total += blob.stat(follow_symlinks=False).st_size
        return StoreUsage(count, total)

    def _check_size(self, sha: str, size: int) -> None:
        if size > self.max_blob_bytes:
            raise DatasetError(
                f"blob {sha} is {size} bytes, over the store's limit of "
                f"{self.max_blob_bytes} bytes",
                reason="too-large",
            )

    def _install(self, tmp: Path, fd: int, sha: str, staged: Staged | None = None) -> bool:
        """Make the verified file *tmp* (open as *fd*) the blob *sha*; ``True`` if it is new.

        With *staged*, the file is only made read-only and queued: :meth:`place_staged` makes
        the whole batch durable at once and links it into place (``True`` then means "queued").
        """
        os.fchmod(fd, READ_ONLY)
        if staged is not None:
            staged.append((tmp, sha))
            return True
        if self.durable:
            os.fsync(fd)
        return self._place(tmp, sha)

    def _place(self, tmp: Path, sha: str) -> bool:
        """Link the durable, read-only file *tmp* into ``blobs/`` (never replacing a blob)."""
        final = self._blob(sha)
        try:
            os.link(tmp, final)
            new = True
        except FileExistsError:
            new = False
        except FileNotFoundError:
            shard = os.path.dirname(final)
            if os.path.isdir(shard):
                raise
            os.makedirs(shard, exist_ok=True)  # the first blob of this shard
            try:
                os.link(tmp, final)
                new = True
            except FileExistsError:
                new = False
        os.unlink(tmp)
        return new

    def place_staged(self, staged: Staged) -> set[str]:
        """Make a batch of staged blobs (queued by :meth:`ingest_fd` or a local push) durable
        with one filesystem sync and link them into ``blobs/``; returns the names that were
        new."""
        if not staged:
            return set()
        if self.durable:
            flush_files([tmp for tmp, _ in staged], self.tmp_dir)
        return {sha for tmp, sha in staged if self._place(tmp, sha)}

    def _put_verified(self, blobs: Sequence[tuple[str, bytes | memoryview]]) -> int:
        """Write blobs already checked against their names; how many were new."""
        fds: list[tuple[int, str]] = []
        staged: Staged = []
        try:
            for sha, data in blobs:
                fd = open_anonymous(self.tmp_dir)
                if fd is None:  # no O_TMPFILE here: a named temporary, linked and unlinked
                    tmp = tmp_name(self.tmp_dir, "blob-")
                    fd = os.open(
                        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, READ_ONLY
                    )
                    try:
                        staged.append((tmp, sha))
                        write_all(fd, data)
                    finally:
                        os.close(fd)
                    continue
                fds.append((fd, sha))
                write_all(fd, data)
            if self.durable and fds:
                sync_fds([fd for fd, _ in fds], self.tmp_dir)
            new = 0
            for fd, sha in fds:
                final = self._blob(sha)
                try:
                    link_anonymous(fd, final)
                except FileExistsError:
                    continue
                except FileNotFoundError:
                    os.makedirs(os.path.dirname(final), exist_ok=True)
                    try:
                        link_anonymous(fd, final)
                    except FileExistsError:
                        continue
                new += 1
            return new + len(self.place_staged(staged))
        except BaseException:
            self.drop_staged(staged)
            raise
        finally:
            for fd, _ in fds:
                os.close(fd)

    def _write_stream(
        self,
        src: Readable,
        sha: str | None,
        size: int | None,
        on_bytes: OnBytes = None,
        *,
        limit: int | None = None,
        staged: Staged | None = None,
    ) -> tuple[str, int, bool]:
        """Copy *src* into a new blob, hashing on the way.

        With *sha*/*size* given the content must match them; else the hash names the blob.
        """
        cap = size if size is not None else (limit if limit is not None else self.max_blob_bytes)
        tmp = tmp_name(self.tmp_dir, "blob-")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            h, n = pump(src, fd, limit=cap, on_bytes=on_bytes)
            actual = h.hexdigest()
            if size is not None and n != size:
                raise IntegrityError(
                    f"blob {sha}: received {'more than ' if n > size else ''}{n} bytes, "
                    f"expected {size}",
                    blake3=sha or actual,
                    actual=f"{n} bytes",
                )
            if n > cap:
                raise _TooLarge
            return self._settle(tmp, fd, n, sha, actual, staged, "received bytes")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def _settle(
        self,
        tmp: Path,
        fd: int,
        n: int,
        expected: str | None,
        actual: str,
        staged: Staged | None,
        what: str,
    ) -> tuple[str, int, bool]:
        """Finish a blob written to *tmp*: check its hash, then install it (or drop it when the
        store already has it and *staged* defers installing). Returns ``(sha, size, new)``."""
        if expected is not None and actual != expected:
            raise IntegrityError(
                f"blob {expected} is corrupt: the {what} hash to {actual}",
                blake3=expected,
                actual=actual,
            )
        if staged is not None and self.has(actual):
            tmp.unlink()
            return actual, n, False
        return actual, n, self._install(tmp, fd, actual, staged)

    def put_stream(self, stream: Readable, sha: str, size: int) -> bool:
        """Store *size* bytes read from *stream* (to its end) as the blob *sha*.

        Returns:
            ``True`` when the blob is new, ``False`` when it was already stored (the stream is
            then not read).

        Raises:
            IntegrityError: the bytes do not hash to *sha* or their count is not *size*;
                nothing is stored.
        """
        validate_digest(sha)
        self._check_size(sha, size)
        if self.has(sha):
            return False
        return self._write_stream(stream, sha, size)[2]

    def put_file(self, path: str | os.PathLike[str], sha: str, *, link: bool = False) -> bool:
        """Store the file at *path* as the blob *sha*, verifying its content.

        With ``link=True`` the file is **handed over**: when it is on the store's filesystem the
        blob becomes a hard link to it (no bytes copied) and the store makes it read-only.
        Whoever writes to that file afterwards corrupts the store, so only pass ``link=True``
        for files nobody will modify (a staging copy, an imported archive). Otherwise, or when
        linking fails, the file is copied.

        Returns:
            ``True`` when the blob is new, ``False`` when it was already stored.

        Raises:
            IntegrityError: the content does not hash to *sha*; nothing is stored.
            UnsafePath: *path* is not a regular file.
        """
        validate_digest(sha)
        if self.has(sha):
            return False
        return self.ingest_file(path, link=link, expected_sha=sha)[2]

    def ingest_file(
        self,
        path: str | os.PathLike[str],
        *,
        link: bool = False,
        expected_sha: str | None = None,
        on_bytes: OnBytes = None,
    ) -> tuple[str, int, bool]:
        """Store the file at *path* under whatever its content hashes to, in one read.

        This is how a local push avoids reading files twice: the copy is hashed while it is
        written, then kept as a new blob or dropped when the store already had it. ``link``
        is as in :meth:`put_file` (the source is made read-only only when its blob is new).

        Returns:
            ``(blake3, size, new)``.

        Raises:
            IntegrityError: *expected_sha* is given and the content differs.
            UnsafePath: *path* is not a regular file or is over the size limit.
        """
        name = os.fspath(path)
        try:
            fd, st = open_regular(name)
        except OSError as e:
            raise UnsafePath(
                name, f"cannot read {name!r}: {e.strerror}", reason="unreadable"
            ) from None
        try:
            return self._ingest_fd(
                fd, st, name, name, link=link, expected_sha=expected_sha, on_bytes=on_bytes
            )
        finally:
            os.close(fd)

    def _ingest_fd(
        self,
        fd: int,
        st: os.stat_result,
        source: str,
        name: str,
        *,
        link: bool,
        expected_sha: str | None,
        on_bytes: OnBytes,
        limit: int | None = None,
        staged: Staged | None = None,
    ) -> tuple[str, int, bool]:
        limit = self.max_blob_bytes if limit is None else min(limit, self.max_blob_bytes)
        if st.st_size > limit:
            raise UnsafePath(
                name,
                f"{name!r} is {st.st_size} bytes, over the limit of {limit} bytes per file",
                reason="too-large",
            )
        if link:
            linked = self._ingest_link(fd, source, name, expected_sha, on_bytes, staged)
            if linked is not None:
                return linked
        try:
            sha, size, new = self._copy_file(fd, expected_sha, on_bytes, limit, staged)
        except IntegrityError as e:
            raise IntegrityError(
                f"{name!r} does not hold blob {expected_sha}: its content hashes to {e.actual}",
                blake3=e.blake3,
                actual=e.actual,
            ) from None
        except _TooLarge:
            raise UnsafePath(
                name,
                f"{name!r} grew over the limit of {limit} bytes per file while being read",
                reason="too-large",
            ) from None
        return sha, size, new

    def _copy_file(
        self,
        src_fd: int,
        expected_sha: str | None,
        on_bytes: OnBytes,
        limit: int,
        staged: Staged | None,
    ) -> tuple[str, int, bool]:
        """Copy a local file into a new blob: a kernel copy, then a hash of the copy.

        Hashing the copy (not the source) is what makes the blob's name true even when the
        source changes meanwhile; copying in the kernel (``copy_file_range``, as ``cp`` does)
        and reading the copy back from the page cache costs less CPU than a read-hash-write
        loop through user space.
        """
        tmp = tmp_name(self.tmp_dir, "blob-")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            n = copy_fd(src_fd, fd, limit + 1)
            if n > limit:
                raise _TooLarge
            actual = hash_fd(fd, n)
            if on_bytes is not None:
                on_bytes(n)
            return self._settle(tmp, fd, n, expected_sha, actual, staged, "bytes")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def ingest_fd(
        self,
        fd: int,
        name: str,
        *,
        staged: Staged,
        limit: int | None = None,
        expect: str | None = None,
    ) -> tuple[str, int, bool]:
        """Store the content of the open file *fd* (handed over by another process) as a blob.

        The file is copied in the kernel into ``tmp/`` and the copy is hashed: the blob's name
        is true whatever the sender does to its file meanwhile. With *expect* (the blob this
        file held in the previous version) and that blob stored, the file is hashed in place
        first and copied only when its content changed. Pass only an *expect* the sender may
        read: whether the copy is skipped shows in the time this call takes. The new blob
        waits in *staged* until :meth:`place_staged`.

        Returns:
            ``(blake3, size, new)``.

        Raises:
            UnsafePath: *fd* is not a regular file, or is over *limit* bytes (named *name*).
        """
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(name, f"{name!r} is not a regular file", reason="special-file")
        if expect is not None and st.st_size <= (limit or self.max_blob_bytes):
            validate_digest(expect)
            if self.has(expect) and hash_fd(fd, st.st_size) == expect:
                return expect, st.st_size, False
        return self._ingest_fd(
            fd,
            st,
            name,
            name,
            link=False,
            expected_sha=None,
            on_bytes=None,
            limit=limit,
            staged=staged,
        )

    def drop_staged(self, staged: Staged) -> None:
        """Remove the queued files of a batch that will not be placed."""
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        staged.clear()

    def push_folder(
        self,
        folder: str | os.PathLike[str],
        *,
        parent: Manifest | None = None,
        link: bool = False,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_files: int = DEFAULT_MAX_FILES,
        max_total_bytes: int | None = None,
        on_progress: ProgressCallback | None = None,
        workers: int | None = None,
    ) -> PushResult:
        """Push a local folder as a new manifest: walk, hash and store in one read per file.

        The folder is checked as by :func:`~nsml_datasets.manifest.scan` (nothing is stored
        when it holds an unsafe path). Each file is copied into ``tmp/`` (in the kernel), the
        copy is hashed and kept only when its blob is new, so a first push reads every file
        once and hashes what it stores, not what it read earlier; with *parent*
        (the previous version's manifest) a file whose path and size are unchanged is hashed
        first and copied only if its content did change, so a new version that changes 1 % of
        the files reads the folder once and writes ~1 % of its bytes. ``link=True`` hard-links
        new blobs to the folder's files instead of copying them (see :meth:`put_file` for what
        that hands over).

        Progress phases: ``scan`` then ``push``.

        Returns:
            The committed manifest's digest and what the push stored.

        Raises:
            UnsafePath: naming the first offending path, relative to *folder*.
        """
        files = walk(
            folder,
            max_file_bytes=max_file_bytes,
            max_files=max_files,
            max_total_bytes=max_total_bytes,
            on_progress=on_progress,
        )
        known = {e.path: e for e in parent} if parent is not None else {}
        tracker = Tracker(
            "push", on_progress, total_bytes=sum(f.size for f in files), total_files=len(files)
        )

        def one(f: LocalFile) -> tuple[Entry, bool]:
            hint = known.get(f.path)
            if hint is not None and hint.size == f.size and self.has(hint.blake3):
                entry = hash_local(f, max_file_bytes=max_file_bytes, tracker=tracker)
                if self.has(entry.blake3):
                    return entry, False
                counted = True
            else:
                counted = False
            fd, st = open_walked(f)
            try:
                sha, size, new = self._ingest_fd(
                    fd,
                    st,
                    f.source,
                    f.path,
                    link=link,
                    expected_sha=None,
                    on_bytes=None if counted else tracker.add,
                    limit=max_file_bytes,
                    staged=staged,
                )
            finally:
                os.close(fd)
            if not counted:
                tracker.add(0, files=1, path=f.path)
            return Entry(f.path, size, sha, f.executable), new

        # New blobs wait in tmp/ until the end: one filesystem sync makes them all durable
        # before any appears in blobs/ (instead of one fsync per file).
        staged: Staged = []
        try:
            results = run_parallel(
                files, one, workers=workers or default_workers(), tracker=tracker
            )
            placed = self.place_staged(staged)
        except BaseException:
            self.drop_staged(staged)
            raise
        manifest = Manifest(e for e, _ in results)
        new_blobs = {e.blake3: e.size for e, _ in results if e.blake3 in placed}
        upload = self.begin(manifest)
        upload.credit(manifest.blobs())  # every file was just read and hashed here
        sources = {e.blake3: e.path for e in manifest}
        for _ in range(3):
            missing = upload.missing()
            if not missing:
                break
            # A concurrent gc removed blobs this push found present: store them again.
            for sha in missing:
                upload.put_file(Path(folder) / sources[sha], sha, link=link)
                new_blobs[sha] = manifest.blobs()[sha]
        digest = upload.commit()
        log.info(
            "pushed %s as manifest %s: %d files, %d bytes, %d new blobs (%d bytes)",
            os.fspath(folder),
            digest,
            manifest.file_count,
            manifest.total_bytes,
            len(new_blobs),
            sum(new_blobs.values()),
        )
        return PushResult(
            digest=digest,
            manifest=manifest,
            new_blobs=len(new_blobs),
            new_bytes=sum(new_blobs.values()),
        )

    def _ingest_link(
        self,
        fd: int,
        source: str,
        name: str,
        expected_sha: str | None,
        on_bytes: OnBytes,
        staged: Staged | None = None,
    ) -> tuple[str, int, bool] | None:
        """Hard-link the open file into ``tmp/``, hash it there and install it; ``None``: copy."""
        tmp = tmp_name(self.tmp_dir, "link-")
        try:
            os.link(source, tmp, follow_symlinks=True)
        except OSError as e:
            if e.errno in LINK_FALLBACK_ERRNOS:
                return None
            raise
        if os.stat(tmp).st_ino != os.fstat(fd).st_ino:
            # The name points to another file than the one opened: it was swapped meanwhile.
            tmp.unlink()
            raise UnsafePath(
                name, f"{name!r} was replaced while being pushed; push again", reason="unreadable"
            )
        try:
            with open(tmp, "rb", buffering=0) as f:
                h, size = pump(f, None, limit=self.max_blob_bytes, on_bytes=on_bytes)
                sha = h.hexdigest()
                if expected_sha is not None and sha != expected_sha:
                    raise IntegrityError(
                        f"{name!r} does not hold blob {expected_sha}: its content hashes to {sha}",
                        blake3=expected_sha,
                        actual=sha,
                    )
                if size > self.max_blob_bytes:
                    raise UnsafePath(
                        name,
                        f"{name!r} grew over the limit of {self.max_blob_bytes} bytes",
                        reason="too-large",
                    )
                if self.has(sha):
                    tmp.unlink()
                    return sha, size, False
                return sha, size, self._install(tmp, f.fileno(), sha, staged)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # -- manifests -----------------------------------------------------------------------------

    def manifest_path(self, digest: str) -> Path:
        """Where the manifest *digest* lives (whether or not it exists)."""
        validate_digest(digest, what="manifest digest")
        return self.manifests_dir / f"{digest}.json"

    def has_manifest(self, digest: str) -> bool:
        """Whether a manifest with this digest was committed (and not collected since)."""
        return self.manifest_path(digest).exists()

    def load_manifest(self, digest: str) -> Manifest:
        """Read a committed manifest, checking that its bytes still hash to *digest*.

        Raises:
            NotFound: no such manifest.
            IntegrityError: the file is corrupt.
        """
        try:
            data = self.manifest_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"manifest {digest} is not in the store") from None
        actual = hash_bytes(data)
        if actual != digest:
            raise IntegrityError(
                f"manifest {digest} is corrupt: it hashes to {actual}", blake3=digest, actual=actual
            )
        return Manifest.from_json(data)

    def manifest_digests(self) -> list[str]:
        """Digests of every committed manifest, sorted."""
        return sorted(p.name[:-5] for p in self.manifests_dir.glob("*.json") if len(p.name) == 69)

    def _write_manifest(self, manifest: Manifest) -> str:
        path = self.manifest_path(manifest.digest)
        if path.exists():
            os.utime(path)
        else:
            atomic_write(path, manifest.to_json(), durable=self.durable, mode=0o444)
        return manifest.digest

    # -- uploads -------------------------------------------------------------------------------

    def begin(self, manifest: Manifest, *, upload_id: str | None = None) -> Upload:
        """Start (or, given an existing *upload_id* of the same manifest, resume) an upload.

        The upload's state lives under ``uploads/<id>/``, so another process can
        :meth:`resume` it after this one dies.

        Raises:
            DatasetError: *upload_id* exists for another manifest (``reason="conflict"``), or a
                file is over the size limit (``reason="too-large"``).
        """
        for e in manifest:
            if e.size > self.max_blob_bytes:
                raise UnsafePath(
                    e.path,
                    f"{e.path!r} is {e.size} bytes, over the limit of {self.max_blob_bytes} "
                    "bytes per file",
                    reason="too-large",
                )
        if upload_id is not None:
            validate_upload_id(upload_id)
            if (self.uploads_dir / upload_id).exists():
                upload = self.resume(upload_id)
                if upload.digest != manifest.digest:
                    raise DatasetError(
                        f"upload {upload_id} is for manifest {upload.digest}, "
                        f"not {manifest.digest}",
                        reason="conflict",
                    )
                return upload
        else:
            upload_id = secrets.token_hex(16)
        staging = tmp_name(self.tmp_dir, f"upload-{upload_id}-")
        staging.mkdir()
        try:
            (staging / "parts").mkdir()
            atomic_write(staging / "manifest.json", manifest.to_json(), durable=self.durable)
            os.rename(staging, self.uploads_dir / upload_id)
        except BaseException:
            remove_tree(staging)
            raise
        if self.durable:
            fsync_dir(self.uploads_dir)
        log.info(
            "upload %s started: manifest %s, %d files",
            upload_id,
            manifest.digest,
            manifest.file_count,
        )
        return Upload(self, upload_id, manifest)

    def resume(self, upload_id: str) -> Upload:
        """Reopen an upload started by :meth:`begin` (in this process or another).

        Raises:
            NotFound: no such upload (committed, aborted or collected by :meth:`gc`).
        """
        folder = self.uploads_dir / validate_upload_id(upload_id)
        try:
            data = (folder / "manifest.json").read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"upload {upload_id} does not exist (committed, aborted or expired); "
                "start a new push"
            ) from None
        os.utime(folder)
        return Upload(self, upload_id, Manifest.from_json(data))

    def upload_ids(self) -> list[str]:
        """Ids of the uploads in progress."""
        return sorted(p.name for p in self.uploads_dir.iterdir() if _UPLOAD_ID_RE.match(p.name))

    # -- reading -------------------------------------------------------------------------------

    def materialize(
        self,
        manifest: Manifest | str,
        dest: str | os.PathLike[str],
        *,
        mode: Mode = "copy",
        verify: bool = True,
        readonly: bool = True,
        on_progress: ProgressCallback | None = None,
        workers: int | None = None,
    ) -> Path:
        """Build the folder *dest* holding a manifest's files (see :func:`build_tree`).

        ``mode="hardlink"`` links files to the blobs (no bytes copied; same filesystem only,
        files that cannot be linked are copied; executable files are always copied since a
        blob is ``0444``); ``"copy"`` copies them. With *verify* every blob is hashed on the
        way and a corrupt one raises :class:`IntegrityError` naming it, leaving nothing at
        *dest*.

        Args:
            manifest: a :class:`Manifest` or the digest of a committed one.
        """
        if isinstance(manifest, str):
            manifest = self.load_manifest(manifest)

        def locate(sha: str) -> tuple[str, ...]:
            return (self._blob(sha),)

        return build_tree(
            manifest,
            dest,
            locate=locate,
            mode=mode,
            verify=verify,
            readonly=readonly,
            on_progress=on_progress,
            workers=workers,
        )

    # -- garbage collection --------------------------------------------------------------------

    def gc(
        self,
        live_manifests: Iterable[str],
        *,
        older_than: float = DEFAULT_GRACE_S,
        now: float | None = None,
    ) -> GcReport:
        """Remove what no live version needs.

        Roots are the *live_manifests* (digests the server's database refers to), uploads
        active within *older_than* seconds, and manifests committed within *older_than*
        seconds (committed but not recorded by the server yet). Removed: stale uploads (their
        parts with them), manifests that are not roots, blobs no root references and that are
        older than *older_than*, stale files in ``tmp/``.

        A push killed halfway leaves an upload; once it is older than *older_than* this removes
        it and every blob only it referenced, so the store holds no orphan.

        Args:
            live_manifests: digests of every version that must survive.
            older_than: grace period in seconds; anything younger is kept.
            now: the current time (seconds since the epoch), injectable for tests.
        """
        now = time.time() if now is None else now
        cutoff = now - older_than
        live = {validate_digest(d, what="manifest digest") for d in live_manifests}
        referenced: set[str] = set()
        uploads_removed = manifests_removed = tmp_removed = 0

        for folder in list(self.uploads_dir.iterdir()):
            if not _UPLOAD_ID_RE.match(folder.name):
                continue
            try:
                stale = _age_stamp(folder.stat()) < cutoff
                manifest = Manifest.from_json((folder / "manifest.json").read_bytes())
            except (FileNotFoundError, DatasetError):
                stale, manifest = True, Manifest()
            if stale:
                log.info("gc: removing stale upload %s", folder.name)
                remove_tree(folder)
                uploads_removed += 1
            else:
                referenced.update(manifest.blobs())

        missing_live = []
        for digest in live:
            if not self.has_manifest(digest):
                missing_live.append(digest)
        for path in list(self.manifests_dir.glob("*.json")):
            digest = path.name[:-5]
            young = _age_stamp(path.stat()) >= cutoff
            if digest in live or young:
                try:
                    referenced.update(self.load_manifest(digest).blobs())
                except DatasetError as e:
                    log.error(
                        "gc: manifest %s unreadable; its blobs stay only if used elsewhere: %s",
                        digest,
                        e,
                    )
            else:
                path.unlink(missing_ok=True)
                manifests_removed += 1

        blobs_removed = bytes_freed = 0
        for shard in list(os.scandir(self.blobs_dir)):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for blob in list(os.scandir(shard.path)):
                sha = shard.name + blob.name
                if sha in referenced:
                    continue
                st = blob.stat(follow_symlinks=False)
                if _age_stamp(st) >= cutoff:
                    continue
                os.unlink(blob.path)
                blobs_removed += 1
                bytes_freed += st.st_size

        for item in list(self.tmp_dir.iterdir()):
            try:
                if _age_stamp(item.lstat()) < cutoff:
                    remove_tree(item)
                    tmp_removed += 1
            except FileNotFoundError:
                continue

        report = GcReport(
            blobs_removed=blobs_removed,
            bytes_freed=bytes_freed,
            manifests_removed=manifests_removed,
            uploads_removed=uploads_removed,
            tmp_removed=tmp_removed,
            missing_live=tuple(sorted(missing_live)),
        )
        log.info("gc of %s: %s", self.root, report)
        return report


class Upload:
    """One push in progress: a manifest and the blobs still to receive.

    Obtained from :meth:`BlobStore.begin` or :meth:`BlobStore.resume`. Every method works
    after a restart of the process: the state is on disk.

    A content address is not a capability: that the store holds a blob says nothing about
    whether the uploader may have its bytes. So an upload counts a blob as present only when
    it is *credited* to the upload: its bytes arrived through this upload and hashed to its
    name (:meth:`put`, :meth:`open_part`, :meth:`put_blobs`, :meth:`put_file`), or the caller
    of :meth:`credit` vouches for it (the server credits the blobs that a version the
    uploader may read already lists, and those the uploader has just handed over as files).
    Every other blob is missing whatever the store holds: its bytes must arrive and match,
    and only then is it credited (without being written twice when the store has it). What
    an upload answers (:meth:`missing`, :meth:`offset`, :meth:`commit`'s errors) therefore
    depends only on what the uploader sent or may read, never on what other users stored.

    The credits are a list of names under ``uploads/<id>/credited``, appended to and shared
    by every process that serves the upload.
    """

    def __init__(self, store: BlobStore, upload_id: str, manifest: Manifest) -> None:
        self.store = store
        self.id = upload_id
        self.manifest = manifest
        self._dir = store.uploads_dir / upload_id
        self._sizes = manifest.blobs()
        self._credited: set[str] = set()
        self._credit_read = 0  # bytes of the credit file already read
        self._credit_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Upload {self.id} manifest={self.digest[:12]}>"

    @property
    def digest(self) -> str:
        """The digest of the manifest being uploaded."""
        return self.manifest.digest

    # -- credits -------------------------------------------------------------------------------

    def credit(self, blobs: Iterable[str]) -> list[str]:
        """Count *blobs* as present for this upload without their bytes arriving through it.

        Only for blobs the uploader may already read or has proven to hold (the caller
        decides; the store cannot). Blobs the manifest does not list are ignored. A credited
        blob the store lacks is still missing.

        Returns:
            The blobs newly credited.
        """
        with self._credit_lock:
            self._reload_credits()
            new = [
                sha
                for sha in dict.fromkeys(blobs)
                if sha in self._sizes and sha not in self._credited
            ]
            if new:
                self._append_credits(new)
        return new

    def credited(self) -> frozenset[str]:
        """The blobs credited to this upload so far (by any process serving it)."""
        with self._credit_lock:
            self._reload_credits()
            return frozenset(self._credited)

    def _credit_file(self) -> Path:
        return self._dir / "credited"

    def _append_credits(self, blobs: Sequence[str]) -> None:
        """Append *blobs* to the credit file (one write; the lock is held)."""
        try:
            fd = os.open(
                self._credit_file(), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except FileNotFoundError:
            raise NotFound(
                f"upload {self.id} does not exist any more (committed, aborted or expired)"
            ) from None
        try:
            write_all(fd, "".join(f"{sha}\n" for sha in blobs).encode("ascii"))
        finally:
            os.close(fd)
        self._credited.update(blobs)

    def _reload_credits(self) -> None:
        """Read what other processes appended to the credit file since the last read."""
        try:
            with open(self._credit_file(), "rb") as f:
                f.seek(self._credit_read)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line being written by another process waits
        for line in data[:end].split():
            sha = line.decode("ascii", "replace")
            if sha in self._sizes:
                self._credited.add(sha)
        self._credit_read += end

    def _present(self, sha: str, credited: frozenset[str] | set[str]) -> bool:
        return sha in credited and self.store.has(sha)

    # -- what is missing -----------------------------------------------------------------------

    def missing(self) -> list[str]:
        """Blobs of the manifest not received (or credited) yet, in first-use order."""
        credited = self.credited()
        return [sha for sha in self._sizes if not self._present(sha, credited)]

    def missing_bytes(self) -> int:
        """Bytes still to upload (partial blobs counted whole)."""
        return sum(self._sizes[sha] for sha in self.missing())

    def _size_of(self, sha: str) -> int:
        validate_digest(sha)
        try:
            return self._sizes[sha]
        except KeyError:
            raise NotFound(f"blob {sha} is not part of upload {self.id}") from None

    def _part(self, sha: str) -> Path:
        return self._dir / "parts" / sha

    def _touch(self) -> None:
        try:
            os.utime(self._dir)
        except FileNotFoundError:
            raise NotFound(
                f"upload {self.id} does not exist any more (committed, aborted or expired)"
            ) from None

    def offset(self, sha: str) -> int:
        """Bytes of the blob *sha* received so far: where to resume (its size once credited)."""
        size = self._size_of(sha)
        if self._present(sha, self.credited()):
            return size
        return self._part_size(sha, size)

    def _part_size(self, sha: str, size: int) -> int:
        try:
            return min(self._part(sha).stat().st_size, size)
        except FileNotFoundError:
            return 0

    def missing_offsets(self) -> list[tuple[str, int, int]]:
        """``(blake3, size, offset)`` of every missing blob, in first-use order: what
        :meth:`missing` and :meth:`offset` answer, with the credits read once."""
        credited = self.credited()
        return [
            (sha, size, self._part_size(sha, size))
            for sha, size in self._sizes.items()
            if not self._present(sha, credited)
        ]

    # -- receiving -----------------------------------------------------------------------------

    def put(self, stream: Readable, sha: str, *, offset: int = 0) -> int:
        """Receive bytes of the blob *sha* from *stream* (read to its end), starting at *offset*.

        ``offset=0`` (re)starts the blob; a positive offset must equal :meth:`offset` and
        appends. The blob is verified once its last byte arrives, then stored (unless the
        store has it already) and credited; a stream that ends early keeps what it brought
        for a later call. When the blob is already credited to this upload the stream is not
        read at all.

        Returns:
            The bytes of the blob received so far (its size when complete).

        Raises:
            IntegrityError: the complete blob does not hash to *sha*, or the stream brings more
                bytes than the blob has; the partial data is dropped.
            Busy: another request is writing the same blob of this upload.
            DatasetError: *offset* is not where the blob stands (``reason="bad-offset"``).
        """
        writer = self.open_part(sha, offset=offset)
        if writer is None:
            return self._size_of(sha)
        try:
            writer.pump(stream)
            return writer.finish()
        finally:
            writer.close()

    def open_part(self, sha: str, *, offset: int = 0, hasher: Any = None) -> PartWriter | None:
        """Open the blob *sha* for writing from *offset*, for data that arrives in pieces.

        What :meth:`put` does, for a caller that is handed chunks (a streamed HTTP body):
        :meth:`PartWriter.write` each one, then :meth:`PartWriter.finish`, and always
        :meth:`PartWriter.close`. Returns ``None`` when the blob is already credited to this
        upload (and stored); a blob that the store holds but that is not credited is received
        and verified like any other.

        Args:
            hasher: a BLAKE3 object holding the state after the first *offset* bytes (kept by
                the caller from an earlier :meth:`PartWriter.hasher`); without it a resumed
                blob is re-read and hashed whole when its last byte arrives.

        Raises:
            Busy: another writer holds this blob of this upload.
            DatasetError: *offset* is not where the blob stands (``reason="bad-offset"``).
            NotFound: *sha* is not part of this upload, or the upload is gone.
        """
        size = self._size_of(sha)
        self._touch()
        if self._present(sha, self.credited()):
            return None
        fd = os.open(self._part(sha), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy(
                    f"blob {sha} of upload {self.id} is being written by another request"
                ) from None
            have = os.fstat(fd).st_size
            if offset not in (0, have):
                raise DatasetError(
                    f"blob {sha} of upload {self.id} stands at byte {have}: "
                    f"resume there, not at {offset}",
                    reason="bad-offset",
                )
            if offset == 0:
                os.ftruncate(fd, 0)
                hasher = None
            os.lseek(fd, offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return PartWriter(self, sha, size, fd, offset, hasher)

    def put_blobs(self, blobs: Iterable[tuple[str, bytes | memoryview]]) -> int:
        """Receive several complete blobs of this upload at once (small files, sent packed).

        Each one is hashed and checked, whether or not the store has it; those the store
        lacks are written as unnamed files, made durable with one filesystem sync per batch,
        then linked into place (one directory operation per blob); all are then credited.
        Blobs already credited to this upload are skipped.

        Returns:
            How many blobs were received and verified (the same whatever the store held).

        Raises:
            IntegrityError: a blob's bytes do not hash to its name or have another length;
                nothing of the batch is stored or credited.
            NotFound: a blob is not part of this upload.
        """
        self._touch()
        credited = self.credited()
        checked: list[tuple[str, bytes | memoryview]] = []
        seen: set[str] = set()
        for sha, data in blobs:
            size = self._size_of(sha)
            if len(data) != size:
                raise IntegrityError(
                    f"blob {sha}: received {len(data)} bytes, expected {size}",
                    blake3=sha,
                    actual=f"{len(data)} bytes",
                )
            if sha in seen or self._present(sha, credited):
                continue
            seen.add(sha)
            actual = hash_bytes(data)
            if actual != sha:
                raise IntegrityError(
                    f"blob {sha} is corrupt: the received bytes hash to {actual}; upload it again",
                    blake3=sha,
                    actual=actual,
                )
            checked.append((sha, data))
        for i in range(0, len(checked), _BATCH_FDS):
            batch = checked[i : i + _BATCH_FDS]
            self.store._put_verified([(s, d) for s, d in batch if not self.store.has(s)])
        self.credit(sha for sha, _ in checked)
        return len(checked)

    def put_file(self, path: str | os.PathLike[str], sha: str, *, link: bool = False) -> bool:
        """Store a local file as the blob *sha* of this upload and credit it (the file is read
        and verified even when the store has the blob; see :meth:`BlobStore.ingest_file` for
        *link*).

        Returns:
            ``True`` when the blob is new to the store.

        Raises:
            IntegrityError: the file does not hold blob *sha*; nothing is credited.
        """
        self._size_of(sha)
        self._touch()
        new = self.store.ingest_file(path, link=link, expected_sha=sha)[2]
        self.credit([sha])
        return new

    def commit(self) -> str:
        """Make the version visible: write the manifest once every blob is credited and stored.

        Idempotent: committing again returns the same digest.

        Returns:
            The manifest digest (what the server records for ``NAME@k``).

        Raises:
            UploadIncomplete: listing the blobs still missing (upload them, commit again).
            NotFound: the upload was aborted or collected.
        """
        if not self._dir.exists():
            if self.store.has_manifest(self.digest):
                return self.digest
            raise NotFound(
                f"upload {self.id} does not exist any more (aborted or expired); push again"
            )
        self._touch()
        credited = self.credited()
        missing: list[str] = []
        shards: set[str] = set()
        for sha, size in self._sizes.items():
            if sha not in credited:
                missing.append(sha)
                continue
            path = self.store._blob(sha)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                missing.append(sha)
                continue
            if st.st_size != size or not stat.S_ISREG(st.st_mode):
                raise IntegrityError(
                    f"blob {sha} has {st.st_size} bytes in the store, the manifest says {size}",
                    blake3=sha,
                    actual=f"{st.st_size} bytes",
                )
            shards.add(os.path.dirname(path))
        if missing:
            first = next(e.path for e in self.manifest if e.blake3 == missing[0])
            raise UploadIncomplete(
                f"upload {self.id}: {len(missing)} of {len(self._sizes)} blobs are not "
                f"uploaded yet (first: {missing[0]} for {first!r}); upload them and commit again",
                missing=missing,
            )
        if self.store.durable:
            # The blobs' names (their folders) must be durable before the manifest names them.
            flush_files(sorted(Path(p) for p in shards), self.store.tmp_dir)
        digest = self.store._write_manifest(self.manifest)
        remove_tree(self._dir)
        log.info("upload %s committed: manifest %s", self.id, digest)
        return digest

    def abort(self) -> None:
        """Drop the upload and its partial blobs (complete blobs go at the next :meth:`gc`)."""
        remove_tree(self._dir)
        log.info("upload %s aborted", self.id)


class PartWriter:
    """One blob of an upload being received in pieces (see :meth:`Upload.open_part`).

    Holds the part file open and locked until :meth:`close`. Not thread-safe: one writer
    per blob, used by one thread at a time.
    """

    def __init__(
        self, upload: Upload, sha: str, size: int, fd: int, offset: int, hasher: Any
    ) -> None:
        self.upload = upload
        self.sha = sha
        self.size = size
        self.received = offset
        self._fd: int | None = fd
        self._h = hasher.copy() if hasher is not None else None
        if offset == 0:
            self._h = new_hasher()

    def write(self, data: bytes | memoryview) -> None:
        """Append *data* to the part (hashing it on the way when the hash state is known).

        Raises:
            IntegrityError: more bytes than the blob has; the part is dropped.
        """
        assert self._fd is not None, "writer closed"
        if self.received + len(data) > self.size:
            self._drop()
            raise IntegrityError(
                f"blob {self.sha}: received more than its {self.size} bytes; upload it again "
                "from byte 0",
                blake3=self.sha,
                actual=f"{self.received + len(data)}+ bytes",
            )
        if self._h is not None:
            self._h.update(data)
        write_all(self._fd, data)
        self.received += len(data)

    def pump(self, stream: Readable) -> None:
        """:meth:`write` everything *stream* brings, to its end."""
        assert self._fd is not None, "writer closed"
        limit = self.size - self.received
        _, n = pump(stream, self._fd, limit=limit, hasher=self._h or _Null())
        self.received += n
        if self.received > self.size:
            self._drop()
            raise IntegrityError(
                f"blob {self.sha}: received more than its {self.size} bytes; upload it again "
                "from byte 0",
                blake3=self.sha,
                actual=f"{self.received}+ bytes",
            )

    def hasher(self) -> Any:
        """A copy of the hash state after :attr:`received` bytes (``None`` when unknown)."""
        return self._h.copy() if self._h is not None else None

    def finish(self) -> int:
        """Once every byte arrived: verify the blob, store it (unless the store holds it
        already: then the part is dropped, the blob is not stored twice) and credit it to the
        upload. Returns the bytes received.

        Raises:
            IntegrityError: the complete blob does not hash to its name; the part is dropped.
        """
        assert self._fd is not None, "writer closed"
        if self.received < self.size:
            return self.received
        h = self._h
        if h is None:
            os.lseek(self._fd, 0, os.SEEK_SET)
            with os.fdopen(self._fd, "rb", buffering=0, closefd=False) as f:
                h, _ = pump(f, None, limit=self.size)
        if h.hexdigest() != self.sha:
            self._drop()
            raise IntegrityError(
                f"blob {self.sha} is corrupt: the received bytes hash to {h.hexdigest()}; "
                "upload it again",
                blake3=self.sha,
                actual=h.hexdigest(),
            )
        store = self.upload.store
        if store.has(self.sha):
            os.unlink(self.upload._part(self.sha))
        else:
            store._install(self.upload._part(self.sha), self._fd, self.sha)
        self.upload.credit([self.sha])
        return self.size

    def _drop(self) -> None:
        try:
            os.unlink(self.upload._part(self.sha))
        except FileNotFoundError:
            pass
        self.received = 0
        self._h = new_hasher()

    def close(self) -> None:
        """Release the part (what was received stays for a resume). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Null:
    """A hasher that ignores its input (a resumed part whose earlier state is unknown)."""

    def update(self, data: bytes | memoryview) -> None:
        pass

"""Content-addressed artifacts of sessions: code snapshots and checkpoints.

One folder (``<state_dir>/artifacts``) holds:

- ``blobs/AB/CDEF…``: file contents by SHA-256, written to ``tmp/`` while hashed, then renamed
  into place (atomic; a blob that exists is never rewritten);
- ``code/<digest>.json``: a code snapshot's manifest, ``{"files": [{"path", "sha256", "size",
  "executable"}]}`` sorted by path; its digest is the SHA-256 of that canonical JSON, so the
  same folder uploaded twice is one snapshot and two snapshots share unchanged files.

Checkpoints are blobs too (a tar archive each, checked by :func:`validate_checkpoint_archive`
before it is stored: regular files and folders only); the database names them. The store
knows nothing about users or sessions: the server checks who may read what before calling in.

A digest names content; it never grants it. :func:`may_run_code` is the one rule for naming a
code snapshot by digest (a session runs it, so its user could read it): its user uploaded it
(:func:`record_code_upload`, table ``code_uploads``), can read a session that runs it, or is
an admin. Anyone else is answered as for a snapshot that does not exist.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from nsml._checkpoint import ArchiveError, check_members, is_compressed, member_path, open_archive

from .models import CodeUpload, TrainingSession

__all__ = [
    "ArtifactError",
    "ArtifactStore",
    "BlobWriter",
    "CheckpointContents",
    "CodeFile",
    "CodeSnapshot",
    "FileChange",
    "may_run_code",
    "record_code_upload",
    "validate_checkpoint_archive",
    "validate_code_path",
]

_SHA = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
MAX_PATH = 1024
#: Changed files larger than this (or not UTF-8) are reported without a text diff.
MAX_DIFF_BYTES = 256 * 1024


class ArtifactError(Exception):
    """An upload or a lookup was refused.

    Attributes:
        message: what went wrong and what to do, for a person.
        reason: a stable code (``bad_request``, ``too_large``, ``not_found``).
        status: the HTTP status the API answers with.
    """

    def __init__(self, message: str, reason: str = "bad_request", status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class CodeFile:
    """One file of a code snapshot."""

    path: str
    sha256: str
    size: int
    executable: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size": self.size,
            "executable": self.executable,
        }


@dataclass(frozen=True)
class CodeSnapshot:
    """A stored code snapshot: its digest and what it holds."""

    digest: str
    files: tuple[CodeFile, ...]

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class FileChange:
    """How one path differs between two snapshots: ``added``, ``removed`` or ``changed``.

    ``diff`` is a unified diff for changed (or added/removed) text files up to
    :data:`MAX_DIFF_BYTES`, else None.
    """

    path: str
    change: str
    diff: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "change": self.change, "diff": self.diff}


def validate_code_path(name: str) -> str:
    """A snapshot member's path, normalised (``./a/b.py`` -> ``a/b.py``).

    Raises:
        ArtifactError: absolute paths, ``..``, empty or overlong paths, control characters.
    """
    if not name or len(name) > MAX_PATH or any(ord(c) < 32 for c in name) or "\\" in name:
        raise ArtifactError(f"invalid path {name[:200]!r} in the code snapshot")
    p = PurePosixPath(name)
    if p.is_absolute():
        raise ArtifactError(f"absolute path {name!r} in the code snapshot; use relative paths")
    parts = [x for x in p.parts if x != "."]
    if not parts or ".." in parts:
        raise ArtifactError(f"path {name!r} in the code snapshot leaves its folder")
    return "/".join(parts)


def _check_sha(sha: str) -> str:
    if not _SHA.match(sha):
        raise ArtifactError(
            f"{sha[:80]!r} is not a SHA-256 digest (64 hex digits)", "not_found", 404
        )
    return sha


class BlobWriter:
    """Receives a blob in pieces, hashing as it writes; :meth:`commit` stores it.

    Args:
        store: where the blob goes.
        limit: most bytes accepted; one more raises ``ArtifactError`` (413) and discards it.
        what: how to name the upload in that error (e.g. ``checkpoint``).
    """

    def __init__(self, store: ArtifactStore, limit: int, what: str = "upload") -> None:
        self.store = store
        self.limit = limit
        self.what = what
        self.size = 0
        self._hash = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=store.tmp_dir, prefix="blob-")
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ArtifactError(f"the {self.what} was already committed or aborted")
        self.size += len(data)
        if self.size > self.limit:
            self.abort()
            raise ArtifactError(
                f"the {self.what} is larger than the limit of {self.limit} bytes",
                "too_large",
                413,
            )
        self._hash.update(data)
        self._file.write(data)

    def commit(self) -> tuple[str, int]:
        """Store the blob under its hash; return ``(sha256, size)``."""
        if self._file is None:
            raise ArtifactError(f"the {self.what} was already committed or aborted")
        self._file.close()
        self._file = None
        sha = self._hash.hexdigest()
        dest = self.store.blob_path(sha)
        if dest.exists():
            self._tmp.unlink(missing_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(self._tmp, 0o444)
            os.replace(self._tmp, dest)
        return sha, self.size

    def abort(self) -> None:
        """Discard what was written. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def received(self) -> Path:
        """The bytes received so far, flushed to their temporary file, for checks before
        :meth:`commit` (which still stores them)."""
        if self._file is not None:
            self._file.flush()
        return self._tmp

    def digest(self) -> str:
        """SHA-256 of the bytes received so far."""
        return self._hash.hexdigest()

    def spool(self) -> Path:
        """Stop writing and return the received bytes as a temporary file, without storing
        them as a blob (for uploads that are parsed, not kept). :meth:`abort` deletes it."""
        if self._file is not None:
            self._file.close()
            self._file = None
        return self._tmp


#: Most members (files and folders) of one checkpoint archive by default.
CHECKPOINT_MAX_MEMBERS = 100_000


@dataclass(frozen=True)
class CheckpointContents:
    """What a valid checkpoint archive holds."""

    files: int
    folders: int
    bytes: int


def validate_checkpoint_archive(
    archive: str | os.PathLike[str], *, max_bytes: int, max_members: int
) -> CheckpointContents:
    """Check that *archive* is a checkpoint: a tar archive (gzip, bzip2 or xz compression
    allowed) of regular files and folders only, with relative paths that stay inside the
    folder, each path once, the data of every file present, at most *max_members* members and
    *max_bytes* bytes of file contents.

    Raises:
        ArtifactError: 400 naming the offending member (or saying the upload is no tar
            archive, or a damaged one); 413 over a limit.
    """
    path = Path(archive)
    size = path.stat().st_size
    with path.open("rb") as f:
        compressed = is_compressed(f.read(6))
    try:
        with open_archive(path) as tar:
            members = check_members(
                tar,
                max_members=max_members,
                max_bytes=max_bytes,
                archive_size=None if compressed else size,
            )
    except ArchiveError as e:
        if e.too_large:
            raise ArtifactError(
                f"the checkpoint is over the server's limit: {e}", "too_large", 413
            ) from None
        raise ArtifactError(
            f"the checkpoint is refused: {e}; upload a tar archive (gzip, bzip2 or xz "
            "compression allowed) of the checkpoint folder's regular files and folders"
        ) from None
    return CheckpointContents(
        files=sum(1 for m in members if m.isreg()),
        folders=len({member_path(m.name) for m in members if m.isdir()}),
        bytes=sum(m.size for m in members if m.isreg()),
    )


class ArtifactStore:
    """The server's content-addressed store for code snapshots and checkpoints.

    Args:
        root: the folder (created when missing, mode 0700).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs"
        self.code_dir = self.root / "code"
        self.tmp_dir = self.root / "tmp"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d in (self.blobs_dir, self.code_dir, self.tmp_dir):
            d.mkdir(exist_ok=True)

    # ---- blobs -----------------------------------------------------------------------------

    def blob_path(self, sha: str) -> Path:
        _check_sha(sha)
        return self.blobs_dir / sha[:2] / sha[2:]

    def has(self, sha: str) -> bool:
        return self.blob_path(sha).exists()

    def writer(self, limit: int, what: str = "upload") -> BlobWriter:
        return BlobWriter(self, limit, what)

    def put_bytes(self, data: bytes) -> str:
        w = self.writer(len(data))
        w.write(data)
        return w.commit()[0]

    def open(self, sha: str) -> IO[bytes]:
        """Open a blob for reading.

        Raises:
            ArtifactError: 404 when it is not stored.
        """
        try:
            return open(self.blob_path(sha), "rb")
        except FileNotFoundError:
            raise ArtifactError(f"blob {sha} is not in the store", "not_found", 404) from None

    # ---- code snapshots --------------------------------------------------------------------

    def ingest_code(
        self, archive: str | os.PathLike[str], *, max_bytes: int, max_files: int
    ) -> CodeSnapshot:
        """Store the files of a tar archive (optionally gzip-compressed) as a code snapshot.

        Only regular files and folders are accepted; links, devices and paths that leave the
        folder are refused, and so is a snapshot over *max_bytes* (uncompressed) or
        *max_files*.

        Raises:
            ArtifactError: 400 for a bad archive or member, 413 over a limit.
        """
        files: dict[str, CodeFile] = {}
        total = 0
        try:
            with tarfile.open(archive, mode="r:*") as tar:
                for member in tar:
                    if member.isdir():
                        validate_code_path(member.name)
                        continue
                    if not member.isreg():
                        raise ArtifactError(
                            f"{member.name!r} in the code snapshot is not a regular file "
                            "(links and devices are not accepted)"
                        )
                    path = validate_code_path(member.name)
                    if path in files:
                        raise ArtifactError(f"{path!r} appears twice in the code snapshot")
                    if len(files) >= max_files:
                        raise ArtifactError(
                            f"the code snapshot has more than {max_files} files; list what "
                            "the session does not need in .nsmlignore",
                            "too_large",
                            413,
                        )
                    total += member.size
                    if total > max_bytes:
                        raise ArtifactError(
                            f"the code snapshot is larger than {max_bytes} bytes; list large "
                            "files in .nsmlignore and put data in a dataset",
                            "too_large",
                            413,
                        )
                    src = tar.extractfile(member)
                    assert src is not None
                    w = self.writer(member.size, "code file")
                    try:
                        while chunk := src.read(_CHUNK):
                            w.write(chunk)
                        sha, size = w.commit()
                    except BaseException:
                        w.abort()
                        raise
                    files[path] = CodeFile(path, sha, size, bool(member.mode & 0o111))
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ArtifactError(f"the code snapshot is not a readable tar archive ({e})") from e
        if not files:
            raise ArtifactError("the code snapshot is empty: it must hold the entry point")
        return self._store_manifest(sorted(files.values(), key=lambda f: f.path))

    def _store_manifest(self, files: list[CodeFile]) -> CodeSnapshot:
        text = json.dumps(
            {"files": [f.to_json() for f in files]}, sort_keys=True, separators=(",", ":")
        )
        digest = hashlib.sha256(text.encode()).hexdigest()
        path = self.code_dir / f"{digest}.json"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="code-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        return CodeSnapshot(digest, tuple(files))

    def has_code(self, digest: str) -> bool:
        return _SHA.match(digest) is not None and (self.code_dir / f"{digest}.json").exists()

    def code(self, digest: str) -> CodeSnapshot:
        """The snapshot *digest*.

        Raises:
            ArtifactError: 404 when unknown.
        """
        _check_sha(digest)
        try:
            data = json.loads((self.code_dir / f"{digest}.json").read_text())
        except FileNotFoundError:
            raise ArtifactError(
                f"no code snapshot {digest}; upload the code first (POST api/code)",
                "not_found",
                404,
            ) from None
        return CodeSnapshot(digest, tuple(CodeFile(**f) for f in data["files"]))

    def materialize_code(self, digest: str, dest: str | os.PathLike[str]) -> None:
        """Copy snapshot *digest* into *dest* (replaced if it exists).

        Files are copies (the session may change them), writable by anyone: the folder is
        bind-mounted into a container whose user is not the server's. Keep *dest* inside a
        folder only the server can enter.
        """
        snap = self.code(digest)
        out = Path(dest)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        os.chmod(out, 0o777)
        for f in snap.files:
            target = out / f.path
            parent = target.parent
            if not parent.exists():
                parent.mkdir(parents=True)
                p = parent
                while p != out:
                    os.chmod(p, 0o777)
                    p = p.parent
            shutil.copyfile(self.blob_path(f.sha256), target)
            os.chmod(target, 0o777 if f.executable else 0o666)

    def read_text(self, sha: str, limit: int = MAX_DIFF_BYTES) -> str | None:
        """A blob as text when it is UTF-8 and at most *limit* bytes, else None."""
        path = self.blob_path(sha)
        try:
            if path.stat().st_size > limit:
                return None
            return path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    def diff_code(self, a: str, b: str) -> list[FileChange]:
        """Per-file differences from snapshot *a* to snapshot *b*, sorted by path."""
        fa = {f.path: f for f in self.code(a).files}
        fb = {f.path: f for f in self.code(b).files}
        out = []
        for path in sorted(fa.keys() | fb.keys()):
            old, new = fa.get(path), fb.get(path)
            if old is not None and new is not None and old.sha256 == new.sha256:
                continue
            change = "added" if old is None else "removed" if new is None else "changed"
            out.append(FileChange(path, change, self._text_diff(path, old, new)))
        return out

    def _text_diff(self, path: str, old: CodeFile | None, new: CodeFile | None) -> str | None:
        texts = []
        for f in (old, new):
            if f is None:
                texts.append("")
                continue
            t = self.read_text(f.sha256)
            if t is None:
                return None
            texts.append(t)
        lines = difflib.unified_diff(
            texts[0].splitlines(keepends=True),
            texts[1].splitlines(keepends=True),
            fromfile=f"a/{path}" if old else "/dev/null",
            tofile=f"b/{path}" if new else "/dev/null",
        )
        return "".join(_newline_terminated(lines))


def _newline_terminated(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        yield line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"


# ---- who may name a code snapshot ------------------------------------------------------------


def record_code_upload(s: Session, user: str, digest: str, now: datetime) -> None:
    """Note that *user* uploaded the code snapshot *digest* (idempotent)."""
    if s.get(CodeUpload, (digest, user)) is not None:
        return
    try:
        with s.begin_nested():
            s.add(CodeUpload(digest=digest, user_name=user, created=now))
    except IntegrityError:  # the same upload, recorded concurrently
        pass


def may_run_code(
    s: Session, user: str, is_admin: bool, digest: str, groups: Sequence[str] = ()
) -> bool:
    """Whether a session of *user* may run the code snapshot *digest*: *user* uploaded it, can
    read a session that runs it (their own, a public one, or a team session of one of their
    hub *groups*), or is an admin."""
    if is_admin or s.get(CodeUpload, (digest, user)) is not None:
        return True
    readable = [TrainingSession.user_name == user, TrainingSession.visibility == "public"]
    if groups:
        readable.append(
            and_(TrainingSession.visibility == "team", TrainingSession.team.in_(list(groups)))
        )
    used = s.scalar(
        select(TrainingSession.id)
        .where(TrainingSession.code_digest == digest, or_(*readable))
        .limit(1)
    )
    return used is not None

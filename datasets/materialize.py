"""Build a folder from a manifest: hard links or copies of local blobs, or verified downloads.

One builder serves three callers: :meth:`BlobStore.materialize` (blobs of a local store),
:func:`~nsml_datasets.transfer.download` (``nsml dataset pull`` over HTTP) and
:class:`~nsml_datasets.cache.NodeCache` (a node's cache, from the local store, from other
cached versions, or from the server).

The folder is built under a hidden sibling (``.NAME.partial-XXXX``) and renamed into place at
the end, so *dest* either does not exist or holds every file. Files are read-only (``0444``,
``0555`` when executable) unless ``readonly=False``; folders stay ``0755``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from ._work import (
    LINK_FALLBACK_ERRNOS,
    READ_ONLY,
    READ_ONLY_EXEC,
    Readable,
    Tracker,
    copy_fd,
    default_workers,
    log,
    pump,
    remove_tree,
    run_parallel,
    tmp_name,
)
from .errors import DatasetError, IntegrityError, NotFound
from .manifest import Entry, Manifest
from .progress import ProgressCallback

Mode = Literal["hardlink", "copy"]
"""``"hardlink"``: link files to local blobs (no bytes copied; needs the same filesystem, falls
back to copying per file); ``"copy"``: independent copies."""

MODES: tuple[Mode, ...] = ("hardlink", "copy")

Locate = Callable[[str], Iterable[str]]
"""``locate(blake3)``: paths of local files believed to hold that content, best first (may be
none)."""

Fetch = Callable[[str], Readable]
"""``fetch(blake3)``: a readable binary stream of the blob (closed after use when it has
``close``). The node agent passes one that downloads ``GET .../blobs/SHA`` from the server;
retries belong there. Whatever it returns is hashed and checked before use."""


def check_mode(mode: object) -> Mode:
    """Return *mode* when it is one of :data:`MODES`.

    Raises:
        DatasetError: listing the valid modes.
    """
    if mode not in MODES:
        raise DatasetError(
            f"invalid mode {mode!r}: use one of {', '.join(map(repr, MODES))}", reason="bad-mode"
        )
    return mode


def file_mode(entry: Entry, *, readonly: bool = True) -> int:
    """Permission bits of a materialized file."""
    if readonly:
        return READ_ONLY_EXEC if entry.executable else READ_ONLY
    return 0o755 if entry.executable else 0o644


def _corrupt(entry: Entry, where: str, actual: str) -> IntegrityError:
    return IntegrityError(
        f"{where} of blob {entry.blake3} for {entry.path!r} is corrupt: expected blake3 "
        f"{entry.blake3} and {entry.size} bytes, got {actual}",
        blake3=entry.blake3,
        actual=actual,
    )


class _Builder:
    def __init__(
        self,
        build: str,
        *,
        locate: Locate | None,
        fetch: Fetch | None,
        mode: Mode,
        verify: bool,
        readonly: bool,
        tracker: Tracker,
    ) -> None:
        self.build = build
        self.locate = locate
        self.fetch = fetch
        self.mode = mode
        self.verify = verify
        self.readonly = readonly
        self.tracker = tracker

    def group(self, group: list[Entry]) -> None:
        first = group[0]
        target = f"{self.build}/{first.path}"
        errors: list[IntegrityError] = []
        placed = False
        for candidate in self.locate(first.blake3) if self.locate is not None else ():
            try:
                self.from_local(candidate, target, first)
            except FileNotFoundError:
                continue
            except IntegrityError as e:
                log.warning(
                    "blob %s at %s is corrupt, trying another source: %s",
                    first.blake3,
                    candidate,
                    e,
                )
                errors.append(e)
                continue
            placed = True
            break
        if not placed and self.fetch is not None:
            self.from_fetch(target, first)
            placed = True
        if not placed:
            if errors:
                raise errors[0]
            raise NotFound(
                f"blob {first.blake3} for {first.path!r} is not available: no local copy and no "
                "server to fetch it from"
            )
        self.tracker.add(0, files=1, path=first.path)
        for other in group[1:]:
            self.duplicate(target, first, f"{self.build}/{other.path}", other)
            self.tracker.add(other.size, files=1, path=other.path)

    def from_local(self, src: str, target: str, entry: Entry) -> None:
        want = file_mode(entry, readonly=self.readonly)
        st = os.stat(src)
        if st.st_size != entry.size:
            raise _corrupt(entry, f"local copy {src}", f"{st.st_size} bytes")
        if self.mode == "hardlink" and stat.S_IMODE(st.st_mode) == want:
            try:
                os.link(src, target)
            except OSError as e:
                if e.errno not in LINK_FALLBACK_ERRNOS:
                    raise
            else:
                if self.verify:
                    with open(target, "rb", buffering=0) as f:
                        h, n = pump(f, None, limit=entry.size, on_bytes=self.tracker.add)
                    if n != entry.size or h.hexdigest() != entry.blake3:
                        os.unlink(target)
                        raise _corrupt(entry, f"local copy {src}", h.hexdigest())
                else:
                    self.tracker.add(entry.size)
                return
        src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst_fd = os.open(
                target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                # A kernel copy, then (verify) a hash of the copy itself: what the reader gets.
                n = copy_fd(src_fd, dst_fd, entry.size + 1)
                if n != entry.size:
                    raise _corrupt(entry, f"local copy {src}", f"{n} bytes")
                if self.verify:
                    os.lseek(dst_fd, 0, os.SEEK_SET)
                    with os.fdopen(dst_fd, "rb", buffering=0, closefd=False) as f:
                        h, _ = pump(f, None, limit=n, on_bytes=self.tracker.add)
                    if h.hexdigest() != entry.blake3:
                        raise _corrupt(entry, f"local copy {src}", h.hexdigest())
                else:
                    self.tracker.add(n)
                os.fchmod(dst_fd, want)
            except BaseException:
                os.close(dst_fd)
                _unlink(target)
                raise
            os.close(dst_fd)
        finally:
            os.close(src_fd)

    def from_fetch(self, target: str, entry: Entry) -> None:
        assert self.fetch is not None
        stream = self.fetch(entry.blake3)
        try:
            fd = os.open(
                target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                h, n = pump(stream, fd, limit=entry.size, on_bytes=self.tracker.add)
                if n != entry.size or h.hexdigest() != entry.blake3:
                    raise _corrupt(
                        entry, "download", h.hexdigest() if n == entry.size else f"{n} bytes"
                    )
                os.fchmod(fd, file_mode(entry, readonly=self.readonly))
            except BaseException:
                os.close(fd)
                _unlink(target)
                raise
            os.close(fd)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    def duplicate(self, src: str, first: Entry, target: str, entry: Entry) -> None:
        if self.mode == "hardlink" and entry.executable == first.executable:
            try:
                os.link(src, target)
                return
            except OSError as e:
                if e.errno not in LINK_FALLBACK_ERRNOS:
                    raise
        src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst_fd = os.open(
                target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                copy_fd(src_fd, dst_fd, entry.size)
                os.fchmod(dst_fd, file_mode(entry, readonly=self.readonly))
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def prepare_dest(dest: Path) -> None:
    """Refuse a *dest* that exists and is not an empty folder."""
    try:
        st = dest.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or any(dest.iterdir()):
        raise DatasetError(
            f"destination {os.fspath(dest)!r} already exists and is not an empty folder; choose "
            "another path or remove it",
            reason="exists",
        )


def build_tree(
    manifest: Manifest,
    dest: str | os.PathLike[str],
    *,
    locate: Locate | None = None,
    fetch: Fetch | None = None,
    mode: Mode = "copy",
    verify: bool = True,
    readonly: bool = True,
    on_progress: ProgressCallback | None = None,
    workers: int | None = None,
    phase: str = "materialize",
) -> Path:
    """Create *dest* holding *manifest*'s files.

    Each distinct blob is taken from the first of ``locate(sha)`` that works (a hard link in
    ``"hardlink"`` mode when the file's permission bits match, else a copy), else from
    ``fetch(sha)``; further files with the same content are hard links to the first one
    (``"hardlink"`` mode) or copies. Downloads are always verified; local files are verified
    when *verify* is true (a corrupt local copy falls through to the next source).

    Args:
        manifest: the files to create.
        dest: a path that does not exist or is an empty folder.
        locate: local sources of blobs.
        fetch: remote source of blobs.
        mode: ``"hardlink"`` or ``"copy"``.
        verify: hash local blobs while placing them (downloads are hashed regardless).
        readonly: make files read-only; must be true in ``"hardlink"`` mode (the files share
            their inode with the store).
        on_progress: progress callback (phase *phase*).
        workers: threads, default one per core (2..8).
        phase: the ``phase`` of progress events.

    Returns:
        *dest* as a :class:`~pathlib.Path`.

    Raises:
        IntegrityError: a blob's content does not match its hash (nothing is left at *dest*).
        NotFound: a blob is in no source.
        DatasetError: *dest* exists and is not empty, or a bad mode.
    """
    mode = check_mode(mode)
    if mode == "hardlink" and not readonly:
        raise DatasetError(
            "hardlink mode always gives read-only files (they share their inode with the store); "
            "use mode='copy' for writable files",
            reason="bad-mode",
        )
    dest = Path(dest).absolute()
    prepare_dest(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    build = tmp_name(dest.parent, f".{dest.name}.partial-")
    build.mkdir(mode=0o755)
    try:
        folders = sorted({str(Path(e.path).parent) for e in manifest if "/" in e.path})
        for folder in folders:
            (build / folder).mkdir(parents=True, exist_ok=True)
        groups = list(manifest.by_sha().values())
        tracker = Tracker(
            phase, on_progress, total_bytes=manifest.total_bytes, total_files=manifest.file_count
        )
        builder = _Builder(
            os.fspath(build),
            locate=locate,
            fetch=fetch,
            mode=mode,
            verify=verify,
            readonly=readonly,
            tracker=tracker,
        )
        run_parallel(groups, builder.group, workers=workers or default_workers(), tracker=tracker)
        if dest.is_dir():
            dest.rmdir()
        os.rename(build, dest)
    except BaseException:
        remove_tree(build)
        raise
    return dest


def download(
    manifest: Manifest,
    dest: str | os.PathLike[str],
    fetch: Fetch,
    *,
    readonly: bool = False,
    on_progress: ProgressCallback | None = None,
    workers: int | None = None,
) -> Path:
    """``nsml dataset pull``: build *dest* from blobs fetched one by one, each verified.

    A file whose content appears several times is downloaded once and copied. Files are
    writable by default (the user's own copy); ``readonly=True`` makes them ``0444``.

    Raises:
        IntegrityError: a download does not match its hash (nothing is left at *dest*).
    """
    return build_tree(
        manifest,
        dest,
        fetch=fetch,
        mode="copy",
        verify=True,
        readonly=readonly,
        on_progress=on_progress,
        workers=workers,
        phase="fetch",
    )

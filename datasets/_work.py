"""Internal helpers: a bounded thread pool that reports progress, and file primitives.

Nothing here is public API; the modules of the package share it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import secrets
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from .hashing import new_hasher
from .progress import EVENT_INTERVAL_S, ProgressCallback, ProgressEvent

log = logging.getLogger("nsml_datasets")

T = TypeVar("T")
R = TypeVar("R")

BUF_SIZE = 1 << 18
"""Read/write chunk, 256 KiB: large enough for few system calls, small enough to stay in L2."""

READ_ONLY = 0o444
READ_ONLY_EXEC = 0o555

LINK_FALLBACK_ERRNOS = frozenset(
    {errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP}
)
"""``os.link`` failures after which copying is the right fallback (other filesystem, too many
links to one inode, hard links refused by ``fs.protected_hardlinks`` or the filesystem)."""


def default_workers() -> int:
    """Threads for hashing and copying: one per core, at least 2, at most 8.

    Hashing (BLAKE3 releases the GIL on large buffers) and file I/O both run in parallel.
    """
    return max(2, min(8, os.cpu_count() or 1))


class Readable(Protocol):
    """A binary stream to read from: a file, ``urllib3``'s ``response.raw``, ``io.BytesIO``."""

    def read(self, size: int = -1, /) -> bytes: ...


class Tracker:
    """Counters of one progress phase; workers add to them, the calling thread emits events."""

    def __init__(
        self,
        phase: str,
        callback: ProgressCallback | None,
        *,
        total_bytes: int = 0,
        total_files: int = 0,
    ) -> None:
        self.phase = phase
        self.callback = callback
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.done_bytes = 0
        self.done_files = 0
        self.path = ""
        self._lock = threading.Lock()
        self._owner = threading.get_ident()
        self._last = 0.0

    def add(self, nbytes: int = 0, *, files: int = 0, path: str = "") -> None:
        """Count *nbytes* (and *files* finished); safe from any thread."""
        with self._lock:
            self.done_bytes += nbytes
            self.done_files += files
            if path:
                self.path = path
        if self.callback is not None and threading.get_ident() == self._owner:
            self.emit()

    def emit(self, *, force: bool = False) -> None:
        """Send an event (from the owning thread only), at most every ``EVENT_INTERVAL_S``."""
        if self.callback is None or threading.get_ident() != self._owner:
            return
        t = time.monotonic()
        if not force and t - self._last < EVENT_INTERVAL_S:
            return
        self._last = t
        with self._lock:
            # A known total caps the count: a retried transfer may count some bytes twice.
            event = ProgressEvent(
                phase=self.phase,
                done_bytes=min(self.done_bytes, self.total_bytes or self.done_bytes),
                total_bytes=self.total_bytes,
                done_files=min(self.done_files, self.total_files or self.done_files),
                total_files=self.total_files,
                path=self.path,
            )
        self.callback(event)


def run_parallel(
    items: Sequence[T],
    fn: Callable[[T], R],
    *,
    workers: int,
    tracker: Tracker | None = None,
) -> list[R]:
    """``[fn(item) for item in items]`` on up to *workers* threads, results in input order.

    At most ``4 * workers`` items are in flight (memory stays bounded for a million files).
    The first exception stops submitting new items and is re-raised once the running ones end.
    Progress events are emitted from the calling thread.
    """
    results: dict[int, R] = {}
    if workers <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            results[i] = fn(item)
            if tracker is not None:
                tracker.emit()
    else:
        window = 4 * workers
        inflight: dict[Future[R], int] = {}
        pending = iter(enumerate(items))
        exhausted = False
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nsml-datasets") as pool:
            try:
                while True:
                    while not exhausted and len(inflight) < window:
                        nxt = next(pending, None)
                        if nxt is None:
                            exhausted = True
                            break
                        inflight[pool.submit(fn, nxt[1])] = nxt[0]
                    if not inflight:
                        break
                    done, _ = wait(inflight, timeout=EVENT_INTERVAL_S, return_when=FIRST_COMPLETED)
                    for fut in done:
                        results[inflight.pop(fut)] = fut.result()
                    if tracker is not None:
                        tracker.emit()
            except BaseException:
                for fut in inflight:
                    fut.cancel()
                raise
    if tracker is not None:
        tracker.emit(force=True)
    return [results[i] for i in range(len(items))]


def pump(
    src: Any,
    dst_fd: int | None,
    *,
    limit: int,
    on_bytes: Callable[[int], None] | None = None,
    hasher: Any = None,
) -> tuple[Any, int]:
    """Copy *src* to *dst_fd* (``None``: read only), hashing on the way.

    *src* is a raw file (``readinto``) or any :class:`Readable`. Reads at most ``limit + 1``
    bytes: the caller compares the count with *limit* to detect a source larger than announced.

    Returns:
        ``(hasher, bytes read)``; the hasher is a fresh BLAKE3 unless one is passed in.
    """
    h = hasher if hasher is not None else new_hasher()
    total = 0
    readinto = getattr(src, "readinto", None)
    if readinto is not None:
        view = _buffer()
        while total <= limit:
            n = readinto(view[: min(BUF_SIZE, limit + 1 - total)])
            if not n:
                break
            chunk = view[:n]
            h.update(chunk)
            if dst_fd is not None:
                write_all(dst_fd, chunk)
            total += n
            if on_bytes is not None:
                on_bytes(n)
    else:
        while total <= limit:
            data = src.read(min(BUF_SIZE, limit + 1 - total))
            if not data:
                break
            h.update(data)
            if dst_fd is not None:
                write_all(dst_fd, data)
            total += len(data)
            if on_bytes is not None:
                on_bytes(len(data))
    return h, total


_local = threading.local()


def _buffer() -> memoryview:
    """This thread's reusable chunk buffer (allocating 256 KiB per small file costs more than
    reading it)."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(BUF_SIZE))
    return view


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    """``syncfs(2)`` from the C library, or ``None`` where there is none (loaded on first use)."""
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return cast(Callable[[int], int], func)


def _sync_filesystem(anchor: Path) -> bool:
    """``syncfs(2)`` of the filesystem holding the folder *anchor*; False where the platform
    has no syncfs or it failed (the caller then syncs file by file)."""
    syncfs = _libc_syncfs()
    if syncfs is None:
        return False
    fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return bool(syncfs(fd) == 0)
    finally:
        os.close(fd)


def flush_files(paths: Sequence[Path], anchor: Path) -> None:
    """Make *paths* (files or folders, on the filesystem of *anchor*) durable.

    One ``syncfs(2)`` of the filesystem holding *anchor* where the platform has it (one journal
    commit instead of one per path), else an ``fsync`` per path.
    """
    if _sync_filesystem(anchor):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_anonymous(folder: Path, mode: int = READ_ONLY) -> int | None:
    """An unnamed file (``O_TMPFILE``) on *folder*'s filesystem, open for writing; ``None``
    where the platform or filesystem has none (the caller then writes a named temporary).

    Giving it a name later with :func:`link_anonymous` costs one directory operation instead
    of the three of create, link and unlink; a crash before that leaves nothing behind.
    """
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag:
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None
        raise


_ROOT_FD: int | None = None


def link_anonymous(fd: int, dest: str) -> None:
    """Give the unnamed file *fd* the name *dest* (``linkat`` through ``/proc/self/fd``).

    Raises:
        FileExistsError: *dest* exists (it is never replaced).
        FileNotFoundError: *dest*'s folder does not exist.
    """
    global _ROOT_FD
    if _ROOT_FD is None:
        _ROOT_FD = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # An explicit src_dir_fd makes os.link use linkat(..., AT_SYMLINK_FOLLOW).
    os.link(f"proc/self/fd/{fd}", dest, src_dir_fd=_ROOT_FD, follow_symlinks=True)


def sync_fds(fds: Sequence[int], anchor: Path) -> None:
    """Make the open files *fds* (on *anchor*'s filesystem) durable: one ``syncfs(2)`` where
    the platform has it, else an ``fsync`` each."""
    if _sync_filesystem(anchor):
        return
    for f in fds:
        os.fsync(f)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def copy_fd(src_fd: int, dst_fd: int, size: int) -> int:
    """Copy *size* bytes between two files in the kernel (``copy_file_range``), else by reads."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src_fd, dst_fd, size - done)
            if n == 0:
                break
            done += n
        return done
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or done:
            raise
    while done < size:
        data = os.read(src_fd, min(BUF_SIZE, size - done))
        if not data:
            break
        write_all(dst_fd, data)
        done += len(data)
    return done


def open_regular(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """Open a regular file for reading without blocking on a FIFO swapped in behind our back.

    Raises:
        OSError: ``EINVAL`` when *path* is not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        return fd, st  # O_NONBLOCK changes nothing for a regular file
    except BaseException:
        os.close(fd)
        raise


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or link inside *path* durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(folder: Path, prefix: str) -> Path:
    """A fresh, unpredictable name inside *folder*."""
    return folder / f"{prefix}{secrets.token_hex(8)}"


def atomic_write(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o644) -> None:
    """Write *data* to *path* so that readers see the old file or the whole new one."""
    tmp = tmp_name(path.parent, f".{path.name}.tmp-")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Remove *path* (file or folder), read-only folders included; a missing path is fine."""

    def fix(func: Callable[..., Any], failed: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        os.chmod(os.path.dirname(failed), 0o700)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, 0o700)
        func(failed)

    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink(missing_ok=True)
    elif sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=lambda func, failed, info: fix(func, failed, info[1]))

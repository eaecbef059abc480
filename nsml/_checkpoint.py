"""Checkpoint archives on the client: pack a folder, check an archive, unpack it safely.

A checkpoint is a tar archive (gzip, bzip2 or xz compression allowed) of regular files and
folders only: no links, devices or FIFOs, no absolute paths, no path that leaves the folder,
no path twice. The server refuses other archives at upload; the client checks again before
unpacking (an archive can be damaged in the store, or come from an older server), and
unpacks into a temporary sibling folder that is renamed into place only when everything was
written, so that a failure leaves nothing behind.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

__all__ = [
    "ArchiveError",
    "check_members",
    "extract",
    "is_compressed",
    "open_archive",
    "pack",
    "sha256_of",
]

_CHUNK = 1 << 20
_MAX_PATH = 1024
#: Errors the decompressors and tarfile raise for bytes that are not a whole archive.
_DAMAGED = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


class ArchiveError(Exception):
    """The archive is not a checkpoint that may be unpacked (the message names the member),
    or a folder cannot be packed as one. ``too_large``: it passed a size or member limit."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def member_path(name: str) -> str:
    """A member's path, normalised (``./a/b`` -> ``a/b``; the root folder is ``""``).

    Raises:
        ArchiveError: absolute paths, ``..``, control characters, overlong paths.
    """
    if len(name) > _MAX_PATH or any(ord(c) < 32 for c in name) or "\\" in name:
        raise ArchiveError(f"member {name[:200]!r} has an invalid path")
    p = PurePosixPath(name)
    if p.is_absolute():
        raise ArchiveError(f"member {name!r} has an absolute path")
    parts = [x for x in p.parts if x != "."]
    if ".." in parts:
        raise ArchiveError(f"member {name!r} leaves the checkpoint folder")
    return "/".join(parts)


def _kind(m: tarfile.TarInfo) -> str | None:
    """What a member is when it is neither a regular file nor a folder."""
    if m.issym():
        return f"a symbolic link (to {m.linkname!r})"
    if m.islnk():
        return f"a hard link (to {m.linkname!r})"
    if m.ischr() or m.isblk():
        return "a device"
    if m.isfifo():
        return "a FIFO"
    if not (m.isreg() or m.isdir()):
        return "not a regular file or folder"
    return None


def check_members(
    tar: tarfile.TarFile,
    *,
    max_members: int | None = None,
    max_bytes: int | None = None,
    archive_size: int | None = None,
) -> list[tarfile.TarInfo]:
    """Every member of *tar*, checked (reads the whole member list, and a compressed stream
    to its end, where its checksum is). The one rule for checkpoints, on the server at upload
    and on the client before unpacking.

    Args:
        max_members: most members (files and folders); None: no limit.
        max_bytes: most bytes of file contents; None: no limit.
        archive_size: the archive's size when it is an uncompressed file: a member whose data
            lies past its end is reported (an uncompressed archive cut short).

    Raises:
        ArchiveError: naming the first member that is a link, a device, has a bad path,
            appears twice or sits inside a file; or the archive is damaged; ``too_large``
            is set when a limit was passed.
    """
    files: set[str] = set()
    folders: set[str] = set()
    out: list[tarfile.TarInfo] = []
    total = 0
    try:
        for m in tar:
            if max_members is not None and len(out) >= max_members:
                raise ArchiveError(
                    f"it has more than {max_members} files and folders; save fewer, larger "
                    "files (e.g. one archive of many small ones)",
                    too_large=True,
                )
            kind = _kind(m)
            if kind is not None:
                raise ArchiveError(
                    f"member {m.name!r} is {kind}; a checkpoint holds regular files and "
                    "folders only"
                )
            path = member_path(m.name)
            if not path:
                if m.isdir():
                    continue
                raise ArchiveError(f"member {m.name!r} has an empty path")
            if path in files or (m.isreg() and path in folders):
                raise ArchiveError(f"member {m.name!r} appears twice")
            parent = path.rpartition("/")[0]
            while parent:
                if parent in files:
                    raise ArchiveError(f"member {m.name!r} is inside {parent!r}, which is a file")
                parent = parent.rpartition("/")[0]
            out.append(m)
            if m.isdir():
                folders.add(path)
                continue
            files.add(path)
            total += m.size
            if max_bytes is not None and total > max_bytes:
                raise ArchiveError(
                    f"its files hold more than {max_bytes} bytes (at member {m.name!r})",
                    too_large=True,
                )
            if archive_size is not None and m.offset_data + m.size > archive_size:
                raise ArchiveError(f"it is cut short: member {m.name!r} lacks its data")
        # Read to the end: a compressed stream's checksum is checked there.
        assert tar.fileobj is not None
        while tar.fileobj.read(_CHUNK):
            pass
    except _DAMAGED as e:
        after = f" after member {out[-1].name!r}" if out else ""
        raise ArchiveError(
            f"it is not a whole tar archive: cut short or damaged{after} ({_one_line(e)})"
        ) from e
    return out


def open_archive(archive: str | os.PathLike[str] | IO[bytes]) -> tarfile.TarFile:
    """*archive* (a path, or a binary file open at its start) opened as a tar archive, plain
    or compressed.

    Raises:
        ArchiveError: it is not one.
    """
    try:
        if isinstance(archive, (str, os.PathLike)):
            return tarfile.open(archive, "r:*")
        return tarfile.open(fileobj=archive, mode="r:*")
    except tarfile.ReadError:
        raise ArchiveError(
            "it is not a tar archive (nor a gzip, bzip2 or xz compressed one)"
        ) from None


def is_compressed(head: bytes) -> bool:
    """Whether an archive starting with *head* (its first 6 bytes) is compressed."""
    return head.startswith(_COMPRESSED_MAGIC)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or e.__class__.__name__


def sha256_of(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pack(folder: str | os.PathLike[str], archive: str | os.PathLike[str]) -> str:
    """Write the files and folders under *folder* into the tar archive *archive*; return its
    SHA-256.

    A symbolic link to a file inside or outside the folder is stored as a copy of that file
    (what a load function reads through it).

    Raises:
        ArchiveError: a link to a folder, a dangling link, a device, FIFO or socket.
    """
    root = Path(folder)
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            here = Path(dirpath)
            for name in [*dirnames, *sorted(filenames)]:
                p = here / name
                rel = p.relative_to(root).as_posix()
                try:
                    st = p.stat()  # follows a link to what a reader would see
                except OSError as e:
                    raise ArchiveError(f"{rel!r} cannot be read ({e.strerror})") from e
                if stat.S_ISDIR(st.st_mode):
                    if p.is_symlink():
                        raise ArchiveError(
                            f"{rel!r} is a link to a folder; save real folders in a checkpoint"
                        )
                    tar.addfile(_info(rel, st, tarfile.DIRTYPE))
                elif stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        tar.addfile(_info(rel, st, tarfile.REGTYPE), f)
                else:
                    raise ArchiveError(
                        f"{rel!r} is not a regular file or folder; a checkpoint cannot hold it"
                    )
    return sha256_of(archive)


def _info(rel: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE or st.st_mode & 0o111 else 0o644
    info.size = st.st_size if kind == tarfile.REGTYPE else 0
    info.mtime = int(st.st_mtime)
    return info


def extract(archive: str | os.PathLike[str] | IO[bytes], dest: str | os.PathLike[str]) -> None:
    """Unpack the checkpoint *archive* (a path, or a binary file open at its start) into the
    new folder *dest* (its parent must exist).

    Everything goes into a hidden temporary sibling first, renamed to *dest* at the end: on
    any error nothing is left.

    Raises:
        ArchiveError: the archive is damaged or holds something a checkpoint may not.
        FileExistsError: *dest* exists.
        OSError: the folder cannot be written (permissions, a full disk).
    """
    target = Path(dest)
    if target.exists() or target.is_symlink():
        raise FileExistsError(17, "it already exists", str(target))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        try:
            with open_archive(archive) as tar:
                members = check_members(tar)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # Python before 3.11.4 (and Debian's 3.11.2): the same, by hand
                    _extract_plain(tar, members, tmp)
        except _DAMAGED as e:
            raise ArchiveError(f"the archive is damaged ({_one_line(e)})") from e
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _extract_plain(tar: tarfile.TarFile, members: list[tarfile.TarInfo], root: Path) -> None:
    """Write checked members (regular files and folders only) under the fresh folder *root*."""
    for m in members:
        path = root / member_path(m.name)
        if m.isdir():
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(m)
        assert src is not None
        with open(path, "xb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        os.chmod(path, 0o755 if m.mode & 0o111 else 0o644)

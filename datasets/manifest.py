"""Manifests: what a dataset version contains, file by file, by content hash.

A :class:`Manifest` is a sorted list of :class:`Entry` values (relative POSIX path, size,
BLAKE3, executable bit) with a canonical JSON form; the BLAKE3 of that form is the manifest's
*digest*, which names the version in the store. :func:`scan` builds one from a folder,
refusing anything that could write outside a destination or leak the pushing machine's files.

What a folder's manifest keeps, and what it drops:

- regular files, with their content and their owner-executable bit;
- folders only through the files in them: **empty folders are not kept**;
- **symbolic links that stay inside the folder are followed**: a link to a file is stored as a
  regular file with the target's content, a link to a folder as a folder with its files. A link
  that leaves the folder (or dangles, or loops) is refused. A dataset therefore never contains
  a link, and materializing one can never point outside its destination;
- FIFOs, sockets and device files are refused; so are names that are not UTF-8 or contain a
  control character or a backslash (they would not survive other platforms or the logs).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ._work import Tracker, default_workers, open_regular, pump, run_parallel
from .errors import DatasetError, IntegrityError, InvalidName, UnsafePath
from .hashing import hash_bytes
from .progress import ProgressCallback

FORMAT = "nsml-dataset-manifest/2"
"""The ``format`` field of a manifest's JSON form."""

DEFAULT_MAX_FILE_BYTES = 100 << 30
"""Default size limit of one file: 100 GiB."""

DEFAULT_MAX_FILES = 1_000_000
"""Default limit on the number of files of one dataset version."""

PATH_MAX_BYTES = 4096
"""Longest relative path, in UTF-8 bytes."""

COMPONENT_MAX_BYTES = 255
"""Longest file or folder name, in UTF-8 bytes."""

_SHA_RE = re.compile(r"[0-9a-f]{64}\Z")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def validate_digest(value: object, *, what: str = "BLAKE3") -> str:
    """Return *value* when it is 64 lowercase hexadecimal digits.

    Raises:
        InvalidName: naming the bad value.
    """
    if not isinstance(value, str) or not _SHA_RE.match(value):
        raise InvalidName(f"invalid {what} {value!r}: expected 64 lowercase hexadecimal digits")
    return value


def validate_relpath(path: object) -> str:
    """Return *path* when it is a safe relative POSIX path inside a dataset.

    Refused: empty paths, absolute paths, ``..`` (``parent-reference``), ``.`` or empty
    components, trailing slashes, control characters, backslashes, names that are not UTF-8,
    components over 255 bytes and paths over 4096 bytes.

    Raises:
        UnsafePath: naming the path and the rule it breaks.
    """
    if not isinstance(path, str) or not path:
        raise UnsafePath(
            str(path), f"invalid path {path!r}: expected a relative path", reason="bad-name"
        )
    if path.startswith("/"):
        raise UnsafePath(
            path,
            f"absolute path {path!r} refused: dataset paths are relative to the dataset folder",
            reason="absolute",
        )
    parts = path.split("/")
    if ".." in parts:
        raise UnsafePath(
            path,
            f"path {path!r} refused: '..' would leave the dataset folder",
            reason="parent-reference",
        )
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(
            path,
            f"path {path!r} refused: its name is not valid UTF-8; rename it",
            reason="bad-name",
        ) from None
    if any(p in ("", ".") for p in parts):
        raise UnsafePath(
            path,
            f"path {path!r} refused: empty or '.' components; write it as a/b/c",
            reason="bad-name",
        )
    if _BAD_CHARS.search(path):
        raise UnsafePath(
            path,
            f"path {path!r} refused: control characters and backslashes are not allowed in names",
            reason="bad-name",
        )
    if len(encoded) > PATH_MAX_BYTES or any(
        len(p.encode("utf-8")) > COMPONENT_MAX_BYTES for p in parts
    ):
        raise UnsafePath(
            path,
            f"path {path[:80]!r}... refused: names are limited to {COMPONENT_MAX_BYTES} bytes and "
            f"paths to {PATH_MAX_BYTES} bytes",
            reason="bad-name",
        )
    return path


@dataclass(frozen=True, slots=True, order=True)
class Entry:
    """One file of a dataset version.

    Attributes:
        path: relative POSIX path (``"train/0001.png"``), validated by :func:`validate_relpath`.
        size: length in bytes.
        blake3: BLAKE3 of the content, 64 lowercase hex digits; names the blob in the store.
        executable: the owner-executable bit; materialized files are ``0555`` instead of ``0444``.
    """

    path: str
    size: int
    blake3: str
    executable: bool = False

    def __post_init__(self) -> None:
        validate_relpath(self.path)
        validate_digest(self.blake3, what=f"BLAKE3 of {self.path!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise DatasetError(
                f"invalid size {self.size!r} for {self.path!r}: expected an integer >= 0"
            )
        if not isinstance(self.executable, bool):
            raise DatasetError(f"invalid executable flag {self.executable!r} for {self.path!r}")

    def to_dict(self) -> dict[str, Any]:
        """The entry's JSON object."""
        return {
            "path": self.path,
            "size": self.size,
            "blake3": self.blake3,
            "executable": self.executable,
        }


class Manifest:
    """The files of one dataset version, sorted by path; immutable.

    Two manifests with the same entries have the same :attr:`digest`, whatever order the
    entries were given in.

    Raises:
        UnsafePath: for an unsafe path, a duplicate path, or a path that is both a file and a
            folder (``a`` and ``a/b``).
    """

    __slots__ = ("_blobs", "_digest", "_entries", "_json", "_total")

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        ordered = tuple(sorted(entries, key=lambda e: e.path))
        folders: set[str] = set()
        previous = None
        for e in ordered:
            if not isinstance(e, Entry):
                raise TypeError(f"manifest entries must be Entry values, not {type(e).__name__}")
            if e.path == previous:
                raise UnsafePath(
                    e.path, f"path {e.path!r} appears twice in the manifest", reason="bad-name"
                )
            previous = e.path
            head = e.path
            while "/" in head:
                head = head.rsplit("/", 1)[0]
                folders.add(head)
        for e in ordered:
            if e.path in folders:
                raise UnsafePath(
                    e.path,
                    f"path {e.path!r} is both a file and a folder in the manifest",
                    reason="bad-name",
                )
        self._entries = ordered
        self._total = sum(e.size for e in ordered)
        self._json: bytes | None = None
        self._digest: str | None = None
        self._blobs: dict[str, int] | None = None

    # -- contents --------------------------------------------------------------------------

    @property
    def entries(self) -> tuple[Entry, ...]:
        """Every entry, sorted by path."""
        return self._entries

    @property
    def total_bytes(self) -> int:
        """Sum of the file sizes (duplicates counted each time): what a materialized copy holds."""
        return self._total

    @property
    def file_count(self) -> int:
        """Number of files."""
        return len(self._entries)

    def blobs(self) -> Mapping[str, int]:
        """Distinct blobs: BLAKE3 to size, in first-use order."""
        if self._blobs is None:
            self._blobs = {}
            for e in self._entries:
                self._blobs.setdefault(e.blake3, e.size)
        return self._blobs

    @property
    def blob_bytes(self) -> int:
        """Bytes of the distinct blobs: what storing the version costs in an empty store."""
        return sum(self.blobs().values())

    def by_sha(self) -> dict[str, list[Entry]]:
        """Entries grouped by content, in path order within each group."""
        groups: dict[str, list[Entry]] = {}
        for e in self._entries:
            groups.setdefault(e.blake3, []).append(e)
        return groups

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and self._entries == other._entries

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"<Manifest {self.digest[:12]} files={self.file_count} bytes={self.total_bytes}>"

    # -- canonical form --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: ``{"format": ..., "entries": [{path, size, blake3, executable}]}``."""
        return {"format": FORMAT, "entries": [e.to_dict() for e in self._entries]}

    def to_json(self) -> bytes:
        """Canonical UTF-8 JSON: sorted keys, no spaces, entries sorted by path."""
        if self._json is None:
            self._json = json.dumps(
                self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
            ).encode("utf-8")
        return self._json

    @property
    def digest(self) -> str:
        """BLAKE3 of :meth:`to_json`: the name of this version's content."""
        if self._digest is None:
            self._digest = hash_bytes(self.to_json())
        return self._digest

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        """Parse and validate a manifest's JSON object (for example from a request body).

        Raises:
            DatasetError: for a malformed object; UnsafePath for a bad path.
        """
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise DatasetError(
                f"not a dataset manifest: expected an object with format {FORMAT!r}",
                reason="bad-manifest",
            )
        raw = data.get("entries")
        if not isinstance(raw, list):
            raise DatasetError("manifest 'entries' must be a list", reason="bad-manifest")
        entries = []
        for item in raw:
            if not isinstance(item, Mapping) or set(item) - {
                "path",
                "size",
                "blake3",
                "executable",
            }:
                raise DatasetError(
                    f"bad manifest entry {item!r}: expected keys path, size, blake3, executable",
                    reason="bad-manifest",
                )
            entries.append(
                Entry(
                    path=item.get("path"),  # type: ignore[arg-type]
                    size=item.get("size"),  # type: ignore[arg-type]
                    blake3=item.get("blake3"),  # type: ignore[arg-type]
                    executable=item.get("executable", False),
                )
            )
        return cls(entries)

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse :meth:`to_json` output (or any equivalent JSON).

        Raises:
            DatasetError: for malformed JSON or a malformed manifest.
        """
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise DatasetError(f"manifest is not valid JSON: {e}", reason="bad-manifest") from None
        return cls.from_dict(obj)


# -- diff ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestDiff:
    """What changes from one version to the next.

    Attributes:
        added: entries only in the new manifest.
        removed: entries only in the old one.
        changed: ``(old, new)`` pairs of the same path whose content or executable bit differ.
        unchanged: number of identical entries.
        new_blobs: blobs of the new manifest absent from the old one (BLAKE3 to size): what a
            push of the new version uploads when the store holds the old one.
    """

    added: tuple[Entry, ...]
    removed: tuple[Entry, ...]
    changed: tuple[tuple[Entry, Entry], ...]
    unchanged: int
    new_blobs: Mapping[str, int]

    @property
    def new_bytes(self) -> int:
        """Bytes of :attr:`new_blobs`."""
        return sum(self.new_blobs.values())

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def diff(old: Manifest, new: Manifest) -> ManifestDiff:
    """Compare two manifests path by path, and blob by blob."""
    before = {e.path: e for e in old}
    after = {e.path: e for e in new}
    added = tuple(e for p, e in after.items() if p not in before)
    removed = tuple(e for p, e in before.items() if p not in after)
    changed = tuple((before[p], e) for p, e in after.items() if p in before and before[p] != e)
    unchanged = sum(1 for p, e in after.items() if before.get(p) == e)
    old_blobs = old.blobs()
    new_blobs = {sha: size for sha, size in new.blobs().items() if sha not in old_blobs}
    return ManifestDiff(added, removed, changed, unchanged, new_blobs)


# -- scanning a folder ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A regular file found by :func:`walk`.

    Attributes:
        path: relative POSIX path inside the walked folder.
        source: filesystem path to read it from (through the folder, links followed).
        size: size when walked.
        executable: owner-executable bit.
        dev: device of the file when walked; reading it checks that it is still the same file.
        ino: inode of the file when walked.
    """

    path: str
    source: str
    size: int
    executable: bool
    dev: int
    ino: int


_KINDS = {
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def _inside(target: str, root: str) -> bool:
    return root == os.sep or target == root or target.startswith(root + os.sep)


def walk(
    folder: str | os.PathLike[str],
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    max_total_bytes: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[LocalFile]:
    """List the regular files of *folder*, refusing anything unsafe (see the module docstring).

    Raises:
        UnsafePath: naming the first offending path (relative to *folder*) and why.
    """
    root = os.path.abspath(folder)
    root_real = os.path.realpath(root)
    try:
        st_root = os.stat(root)
    except OSError as e:
        raise UnsafePath(
            ".",
            f"cannot read the folder {os.fspath(folder)!r}: {e.strerror}",
            reason="not-a-folder",
        ) from None
    if not stat.S_ISDIR(st_root.st_mode):
        raise UnsafePath(".", f"{os.fspath(folder)!r} is not a folder", reason="not-a-folder")
    tracker = Tracker("scan", on_progress)
    files: list[LocalFile] = []
    total = 0
    # (absolute folder path, relative prefix, identities of the folders above it and itself)
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [
        (root, "", frozenset({(st_root.st_dev, st_root.st_ino)}))
    ]
    while stack:
        current, prefix, ancestors = stack.pop()
        try:
            with os.scandir(current) as it:
                children = sorted(it, key=lambda c: c.name)
        except OSError as e:
            raise UnsafePath(
                prefix or ".",
                f"cannot read folder {prefix or '.'!r}: {e.strerror}",
                reason="unreadable",
            ) from None
        folders: list[tuple[str, str, frozenset[tuple[int, int]]]] = []
        for child in children:
            rel = f"{prefix}{child.name}"
            try:
                if child.is_symlink():
                    target = os.path.realpath(child.path)
                    if not _inside(target, root_real):
                        raise UnsafePath(
                            rel,
                            f"{rel!r} is a symbolic link to {os.readlink(child.path)!r}, "
                            "outside the pushed folder; copy the file into the folder or "
                            "remove the link",
                            reason="symlink-escape",
                        )
                    try:
                        st = os.stat(child.path)
                    except FileNotFoundError:
                        raise UnsafePath(
                            rel,
                            f"{rel!r} is a broken symbolic link (to {os.readlink(child.path)!r}); "
                            "remove it or restore its target",
                            reason="broken-symlink",
                        ) from None
                else:
                    st = child.stat(follow_symlinks=False)
            except UnsafePath:
                raise
            except OSError as e:
                reason = "symlink-loop" if e.errno == errno.ELOOP else "unreadable"
                raise UnsafePath(rel, f"cannot read {rel!r}: {e.strerror}", reason=reason) from None
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                ident = (st.st_dev, st.st_ino)
                if ident in ancestors:
                    raise UnsafePath(
                        rel,
                        f"{rel!r} is a symbolic link to one of its own parent folders (a loop); "
                        "remove the link",
                        reason="symlink-loop",
                    )
                validate_relpath(rel)
                folders.append((child.path, rel + "/", ancestors | {ident}))
                continue
            if not stat.S_ISREG(mode):
                kind = _KINDS.get(stat.S_IFMT(mode), "special file")
                raise UnsafePath(
                    rel,
                    f"{rel!r} is a {kind}; only regular files and folders can be pushed",
                    reason="special-file",
                )
            validate_relpath(rel)
            if st.st_size > max_file_bytes:
                raise UnsafePath(
                    rel,
                    f"{rel!r} is {st.st_size} bytes, over the limit of {max_file_bytes} bytes "
                    "per file",
                    reason="too-large",
                )
            if len(files) >= max_files:
                raise UnsafePath(
                    rel,
                    f"the folder holds more than {max_files} files (limit reached at {rel!r})",
                    reason="too-many-files",
                )
            total += st.st_size
            if max_total_bytes is not None and total > max_total_bytes:
                raise UnsafePath(
                    rel,
                    f"the folder holds more than {max_total_bytes} bytes "
                    f"(limit crossed at {rel!r})",
                    reason="total-too-large",
                )
            files.append(
                LocalFile(
                    path=rel,
                    source=child.path,
                    size=st.st_size,
                    executable=bool(mode & stat.S_IXUSR),
                    dev=st.st_dev,
                    ino=st.st_ino,
                )
            )
            tracker.add(st.st_size, files=1, path=rel)
        stack.extend(reversed(folders))  # depth first, in name order: errors are reproducible
    tracker.total_bytes, tracker.total_files = total, len(files)
    tracker.emit(force=True)
    files.sort(key=lambda f: f.path)
    return files


def open_walked(file: LocalFile) -> tuple[int, os.stat_result]:
    """Open a file found by :func:`walk` for reading; the caller closes the descriptor.

    Raises:
        UnsafePath: when it cannot be read, or was replaced by another file since the walk.
    """
    try:
        fd, st = open_regular(file.source)
    except OSError as e:
        raise UnsafePath(
            file.path, f"cannot read {file.path!r}: {e.strerror}", reason="unreadable"
        ) from None
    if (st.st_dev, st.st_ino) != (file.dev, file.ino):
        os.close(fd)
        raise UnsafePath(
            file.path,
            f"{file.path!r} was replaced while being pushed; push again",
            reason="unreadable",
        )
    return fd, st


def hash_local(
    file: LocalFile,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    tracker: Tracker | None = None,
) -> Entry:
    """Hash one walked file and return its entry.

    Raises:
        UnsafePath: when the file was replaced by another one since the walk, or grew past the
            limit.
    """
    fd, _ = open_walked(file)
    try:
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            h, size = pump(
                f, None, limit=max_file_bytes, on_bytes=tracker.add if tracker is not None else None
            )
    finally:
        os.close(fd)
    if size > max_file_bytes:
        raise UnsafePath(
            file.path,
            f"{file.path!r} grew over the limit of {max_file_bytes} bytes per file "
            "while being read",
            reason="too-large",
        )
    if tracker is not None:
        tracker.add(0, files=1, path=file.path)
    return Entry(file.path, size, h.hexdigest(), file.executable)


def scan(
    folder: str | os.PathLike[str],
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    max_total_bytes: int | None = None,
    on_progress: ProgressCallback | None = None,
    workers: int | None = None,
) -> Manifest:
    """Walk *folder* and hash every file: the manifest a push of it would create.

    Files are hashed with BLAKE3 on a thread pool (``workers``, default one per core, 2..8)
    in 256 KiB chunks. Progress phases: ``scan`` (walking), then ``hash``.

    Raises:
        UnsafePath: naming the offending path (relative to *folder*): ``..``-free by
            construction, it covers links leaving the folder, special files, names that cannot
            be stored, files over *max_file_bytes*, more than *max_files* files, more than
            *max_total_bytes* in all, and unreadable files.
    """
    files = walk(
        folder,
        max_file_bytes=max_file_bytes,
        max_files=max_files,
        max_total_bytes=max_total_bytes,
        on_progress=on_progress,
    )
    tracker = Tracker(
        "hash", on_progress, total_bytes=sum(f.size for f in files), total_files=len(files)
    )
    entries = run_parallel(
        files,
        lambda f: hash_local(f, max_file_bytes=max_file_bytes, tracker=tracker),
        workers=workers or default_workers(),
        tracker=tracker,
    )
    return Manifest(entries)


def verify_folder(folder: str | os.PathLike[str], manifest: Manifest) -> None:
    """Check that *folder* holds exactly *manifest*'s files with their content.

    Raises:
        IntegrityError: naming the first file whose content differs.
        DatasetError: when files are missing or extra.
    """
    found = scan(folder)
    if found == manifest:
        return
    d = diff(manifest, found)
    for old, new in d.changed:
        if old.blake3 != new.blake3:
            raise IntegrityError(
                f"{new.path!r} differs: expected blake3 {old.blake3}, found {new.blake3}",
                blake3=old.blake3,
                actual=new.blake3,
            )
    raise DatasetError(
        f"folder differs from the manifest: {len(d.removed)} missing, {len(d.added)} extra, "
        f"{len(d.changed)} changed",
        reason="integrity",
    )

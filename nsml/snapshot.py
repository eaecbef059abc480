"""Code snapshots of a folder for ``nsml run``: what is code, ``.nsmlignore``, limits, the archive.

A snapshot takes the code of a folder, which is often a home folder full of other things:
tool state (``.ipython``, ``.jupyter``, ``.local``, ``.cache`` ...), credentials (``.ssh``,
``.aws`` ...), virtual environments, checkpoints. :data:`DEFAULT_IGNORES` leaves those out,
and a folder holding ``pyvenv.cfg`` or ``conda-meta/`` is left out as a virtual environment
whatever its name.

``.nsmlignore`` (in the folder) extends the defaults with the ``.gitignore`` syntax: one
pattern per line, ``#`` comments, ``!`` to re-include (``!.config/`` takes back a default),
a trailing ``/`` for folders only, a ``/`` inside or in front to anchor the pattern at the
folder, ``*``, ``?``, ``[...]`` and ``**``. The last matching pattern wins, and nothing inside
an ignored folder can be re-included (as with git).

Folders in use change while they are read: a notebook kernel writes its history, a training
run its logs. A file that vanishes between the listing and the read is left out; a file
that changes while it is read is read again (up to :data:`READ_ATTEMPTS` times) and left out
if it never holds still. Neither is an error; :attr:`Snapshot.skipped` says what was left out
and why. What is uploaded is what was read, consistently.
"""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ._fmt import human

__all__ = [
    "DEFAULT_IGNORES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FILES",
    "NEAR_LIMIT",
    "Entry",
    "IgnoreRules",
    "Snapshot",
    "SnapshotError",
    "biggest_entries",
    "build_archive",
    "collect",
    "describe",
]

IGNORE_FILE = ".nsmlignore"
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_FILES = 10_000
#: The share of a limit from which the upload summary names the biggest entries.
NEAR_LIMIT = 0.8
#: How many times a file that changes while it is read is read before it is left out.
READ_ATTEMPTS = 3
_CHUNK = 1 << 20
#: Patterns left out of every snapshot (``.nsmlignore`` adds to them and ``!`` takes them
#: back). Unanchored: they match at any depth.
DEFAULT_IGNORES = (
    # version control
    ".git/",
    ".hg/",
    ".svn/",
    # Python byte code, caches and environments (also any folder with pyvenv.cfg/conda-meta)
    "__pycache__/",
    "*.pyc",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".tox/",
    ".nox/",
    ".venv/",
    "venv/",
    ".conda/",
    # notebooks and the tools of a home folder: state, histories, caches, trash
    ".ipynb_checkpoints/",
    ".ipython/",
    ".jupyter/",
    ".local/",
    ".cache/",
    ".config/",
    ".virtual_documents/",
    ".jupyter_ystore.db",
    ".Trash-*/",
    ".npm/",
    ".yarn/",
    ".nv/",
    ".triton/",
    ".keras/",
    ".huggingface/",
    ".bash_history",
    ".python_history",
    ".sqlite_history",
    ".node_repl_history",
    ".lesshst",
    ".viminfo",
    ".wget-hsts",
    ".DS_Store",
    # credentials: never copied into the platform's store
    ".ssh/",
    ".gnupg/",
    ".aws/",
    ".azure/",
    ".kaggle/",
    ".docker/",
    ".kube/",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    # what training writes
    "nsml_checkpoints/",
)
#: A folder holding one of these is a virtual environment (venv/virtualenv, conda).
VENV_MARKERS = ("pyvenv.cfg", "conda-meta")


class SnapshotError(Exception):
    """The folder cannot be snapshotted as it is; the message says what to change."""


def _translate(pattern: str) -> str:
    """A gitignore glob (without ``!`` and trailing ``/``) as a regular expression body."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == n:
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
                i = j + 1
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


class IgnoreRules:
    """Compiled ``.nsmlignore`` patterns (see the module documentation)."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.rules: list[_Rule] = []
        for raw in patterns:
            line = raw.rstrip("\n").rstrip("\r")
            if line.endswith(" ") and not line.endswith("\\ "):
                line = line.rstrip(" ")
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:]
            elif line.startswith("\\!") or line.startswith("\\#"):
                line = line[1:]
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            if not line:
                continue
            anchored = "/" in line
            body = _translate(line.lstrip("/"))
            regex = f"^{body}$" if anchored else f"^(?:.*/)?{body}$"
            self.rules.append(_Rule(re.compile(regex, re.DOTALL), negate, dir_only))

    @classmethod
    def for_folder(cls, folder: Path, defaults: Sequence[str] = DEFAULT_IGNORES) -> IgnoreRules:
        """The defaults plus the folder's ``.nsmlignore`` (if any)."""
        lines = list(defaults)
        try:
            text = (folder / IGNORE_FILE).read_text(encoding="utf-8", errors="replace")
            lines += text.splitlines()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            pass
        except OSError as e:
            raise SnapshotError(f"cannot read {folder / IGNORE_FILE}: {e.strerror}") from None
        return cls(lines)

    def decision(self, relpath: str, is_dir: bool) -> bool | None:
        """True (ignored) or False (re-included by a ``!`` pattern) by the last pattern that
        matches *relpath* (posix, relative to the folder); None when no pattern matches."""
        result = None
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(relpath):
                result = not rule.negate
        return result

    def ignored(self, relpath: str, is_dir: bool) -> bool:
        """Whether *relpath* (posix, relative to the folder) is ignored."""
        return bool(self.decision(relpath, is_dir))


@dataclass(frozen=True)
class Entry:
    """A file or folder of a snapshot with its size (a folder's: all it holds)."""

    path: str
    bytes: int
    files: int
    is_dir: bool

    def __str__(self) -> str:
        return self.path + ("/" if self.is_dir else "")


@dataclass
class Snapshot:
    """The files of a folder that go into a code snapshot.

    Attributes:
        root: the folder.
        files: ``(relative posix path, absolute path, size, executable)`` sorted by path.
        extra: files that are not on disk (e.g. a notebook cell as the entry point), by path.
        skipped: paths left out and why (links that leave the folder, special files, virtual
            environments, files that vanished or kept changing while read).
        max_bytes, max_files: the limits it was collected under.
    """

    root: Path
    files: list[tuple[str, Path, int, bool]] = field(default_factory=list)
    extra: dict[str, bytes] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    max_bytes: int = DEFAULT_MAX_BYTES
    max_files: int = DEFAULT_MAX_FILES

    @property
    def paths(self) -> list[str]:
        return sorted({f[0] for f in self.files} | set(self.extra))

    @property
    def bytes(self) -> int:
        return sum(f[2] for f in self.files if f[0] not in self.extra) + sum(
            len(b) for b in self.extra.values()
        )

    @property
    def count(self) -> int:
        """How many files the snapshot holds."""
        return len(self.paths)

    @property
    def near_limit(self) -> bool:
        """At least :data:`NEAR_LIMIT` of either limit is used."""
        return (
            self.bytes >= NEAR_LIMIT * self.max_bytes or self.count >= NEAR_LIMIT * self.max_files
        )

    def biggest(self, most: int = 5) -> list[Entry]:
        """The entries that make the snapshot big: see :func:`biggest_entries`."""
        sizes = [(rel, size) for rel, _p, size, _x in self.files if rel not in self.extra]
        sizes += [(rel, len(data)) for rel, data in self.extra.items()]
        return biggest_entries(sizes, most)


def biggest_entries(sizes: Iterable[tuple[str, int]], most: int = 5) -> list[Entry]:
    """The biggest files and folders of a tree given as ``(posix path, bytes)`` per file, for
    a person who wants to make it smaller with ``.nsmlignore``.

    Largest first, at most *most*, none inside another one listed; a folder that one of its
    entries fills almost alone (90 % or more) gives way to that entry, which is the more
    precise line to ignore.
    """
    files: dict[str, int] = {}
    folders: dict[str, list[int]] = {}
    for rel, size in sizes:
        files[rel] = size
        parts = rel.split("/")
        for i in range(1, len(parts)):
            acc = folders.setdefault("/".join(parts[:i]), [0, 0])
            acc[0] += size
            acc[1] += 1
    entries = [Entry(p, b, 1, False) for p, b in files.items()]
    entries += [Entry(p, acc[0], acc[1], True) for p, acc in folders.items()]
    children: dict[str, int] = {}
    for e in entries:
        parent = e.path.rpartition("/")[0]
        if parent:
            children[parent] = max(children.get(parent, 0), e.bytes)
    candidates = [
        e
        for e in entries
        if not (e.is_dir and e.bytes and children.get(e.path, 0) >= 0.9 * e.bytes)
    ]
    candidates.sort(key=lambda e: (-e.bytes, e.path))
    shown: list[Entry] = []
    for e in candidates:
        if len(shown) >= most:
            break
        if any(e.path.startswith(s.path + "/") or s.path.startswith(e.path + "/") for s in shown):
            continue
        shown.append(e)
    return shown


def describe(entries: Sequence[Entry]) -> str:
    """``data/ (80.0 MiB), model.ckpt (15.2 MiB)``."""
    return ", ".join(f"{e} ({human(e.bytes)})" for e in entries)


def _is_venv(path: Path) -> bool:
    try:
        return any(os.path.lexists(path / marker) for marker in VENV_MARKERS)
    except OSError:
        return False


def collect(
    folder: str | os.PathLike[str],
    *,
    extra: Mapping[str, bytes] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    rules: IgnoreRules | None = None,
    lstat: Callable[[Path], os.stat_result] = os.lstat,
) -> Snapshot:
    """Walk *folder* honouring the default ignores, ``.nsmlignore`` and the limits.

    Links to files inside the folder are followed; links that leave it, links to folders,
    special files and virtual environments are skipped, and so are files that vanish while
    the folder is walked (all listed in ``skipped``). *lstat* is how a listed file is looked
    at (tests use it to make files vanish).

    Raises:
        SnapshotError: the folder is missing, or the files exceed *max_bytes* or
            *max_files* (naming the biggest entries, to add to ``.nsmlignore``).
    """
    root = Path(folder).resolve()
    if not root.is_dir():
        raise SnapshotError(f"{folder} is not a folder")
    rules = rules or IgnoreRules.for_folder(root)
    extra = dict(extra or {})
    snap = Snapshot(root=root, extra=extra, max_bytes=max_bytes, max_files=max_files)

    def unreadable(err: OSError) -> None:
        where = Path(err.filename or "").relative_to(root) if err.filename else Path("?")
        if where.as_posix() != ".":
            why = "vanished" if isinstance(err, FileNotFoundError) else err.strerror
            snap.skipped.append(f"{where.as_posix()}/ ({why} while it was read)")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for d in sorted(dirnames):
            p = here / d
            rel = prefix + d
            decision = rules.decision(rel, True)
            if decision:
                continue
            if p.is_symlink():
                snap.skipped.append(f"{rel}/ (a link to a folder)")
                continue
            if decision is None and _is_venv(p):
                snap.skipped.append(f"{rel}/ (a virtual environment)")
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = prefix + name
            if rel in extra or rules.ignored(rel, False):
                continue
            p = here / name
            try:
                st = lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    target = p.resolve()
                    if not target.is_relative_to(root):
                        snap.skipped.append(f"{rel} (a link that leaves the folder)")
                        continue
                    st = os.stat(p)
            except FileNotFoundError:
                snap.skipped.append(f"{rel} (vanished while the folder was read)")
                continue
            except OSError as e:
                snap.skipped.append(f"{rel} ({e.strerror})")
                continue
            if not stat.S_ISREG(st.st_mode):
                snap.skipped.append(f"{rel} (not a regular file)")
                continue
            snap.files.append((rel, p, st.st_size, bool(st.st_mode & 0o111)))
    snap.files.sort()
    hint = (
        f"List what the session does not need in {root / IGNORE_FILE} (e.g. data/ or *.ckpt) "
        "and put data in a dataset (nsml dataset push)."
    )
    if snap.count > max_files:
        crowded = sorted(
            (e for e in snap.biggest(most=10_000) if e.is_dir), key=lambda e: -e.files
        )[:5]
        where = ", ".join(f"{e}: {e.files} files" for e in crowded)
        raise SnapshotError(
            f"{root} has {snap.count} files to upload, more than the limit of {max_files}. "
            f"{hint}" + (f" Most files: {where}." if where else "")
        )
    if snap.bytes > max_bytes:
        raise SnapshotError(
            f"{root} holds {human(snap.bytes)} to upload, more than the limit of "
            f"{human(max_bytes)}. {hint} Biggest: {describe(snap.biggest())}."
        )
    return snap


def _read_stable(
    path: Path, open_file: Callable[[Path], BinaryIO], attempts: int = READ_ATTEMPTS
) -> tuple[BinaryIO | None, int, str]:
    """Read *path* into a spooled copy, again when it changed meanwhile.

    Returns ``(copy at offset 0, size, "")``, or ``(None, 0, why)`` when the file vanished,
    cannot be read, or kept changing through *attempts* reads.
    """
    for attempt in range(attempts):
        if attempt:
            time.sleep(0.05 * attempt)  # short: a folder may hold many files being written
        spool: BinaryIO = tempfile.SpooledTemporaryFile(max_size=8 * _CHUNK)  # type: ignore[assignment]
        try:
            with open_file(path) as f:
                before = os.fstat(f.fileno())
                size = 0
                while chunk := f.read(_CHUNK):
                    spool.write(chunk)
                    size += len(chunk)
                after = os.fstat(f.fileno())
            now = os.stat(path)
        except FileNotFoundError:
            spool.close()
            return None, 0, "vanished while it was read"
        except OSError as e:
            spool.close()
            return None, 0, f"cannot be read: {e.strerror or e}"
        unchanged = (
            before.st_size == after.st_size == size
            and before.st_mtime_ns == after.st_mtime_ns
            and (now.st_ino, now.st_dev) == (after.st_ino, after.st_dev)
        )
        if unchanged:
            spool.seek(0)
            return spool, size, ""
        spool.close()
    return None, 0, f"kept changing while it was read ({attempts} tries)"


def _open_binary(path: Path) -> BinaryIO:
    return open(path, "rb")


def build_archive(snap: Snapshot, *, open_file: Callable[[Path], BinaryIO] = _open_binary) -> Path:
    """Write the snapshot as a gzip-compressed tar archive to a temporary file; return it.

    Each file is read whole before it goes in, and read again when it changed meanwhile; a
    file that vanished or never held still is left out: it is removed from ``snap.files``
    and listed in ``snap.skipped``, so that *snap* describes the archive. Member times and
    owners are zeroed so that the same files give the same archive. *open_file* opens a file
    for reading (tests use it to change files while they are read). The caller deletes the
    archive.
    """
    fd, name = tempfile.mkstemp(prefix="nsml-code-", suffix=".tar.gz")
    os.close(fd)
    path = Path(name)
    kept: list[tuple[str, Path, int, bool]] = []
    try:
        with tarfile.open(path, "w:gz", compresslevel=6) as tar:
            for rel, abspath, _size, executable in snap.files:
                if rel in snap.extra:
                    continue
                data, size, why = _read_stable(abspath, open_file)
                if data is None:
                    snap.skipped.append(f"{rel} ({why})")
                    continue
                with data:
                    info = tarfile.TarInfo(rel)
                    info.size = size
                    _normalise(info, executable)
                    tar.addfile(info, data)
                kept.append((rel, abspath, size, executable))
            for rel, blob in sorted(snap.extra.items()):
                info = tarfile.TarInfo(rel)
                info.size = len(blob)
                _normalise(info, False)
                tar.addfile(info, io.BytesIO(blob))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    snap.files = kept
    return path


def _normalise(info: tarfile.TarInfo, executable: bool) -> None:
    info.type = tarfile.REGTYPE
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if executable else 0o644


def safe_extract(tar: tarfile.TarFile, dest: str | os.PathLike[str]) -> None:
    """Extract *tar* into *dest*, refusing members that would land outside it, links that
    point outside it, and device files (``filter="data"`` where Python has it)."""
    root = Path(dest).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if hasattr(tarfile, "data_filter"):
        tar.extractall(root, filter="data")
        return
    members = []
    for m in tar.getmembers():
        target = (root / m.name).resolve()
        if not target.is_relative_to(root):
            raise SnapshotError(f"archive member {m.name!r} would land outside {root}")
        if m.issym() or m.islnk():
            link = (target.parent / m.linkname).resolve() if m.issym() else root / m.linkname
            if not link.resolve().is_relative_to(root):
                raise SnapshotError(f"archive link {m.name!r} points outside {root}")
        elif not (m.isfile() or m.isdir()):
            raise SnapshotError(f"archive member {m.name!r} is not a file or folder")
        members.append(m)
    tar.extractall(root, members=members)

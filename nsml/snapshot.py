"""Code snapshots of a folder for ``nsml run``: ``.nsmlignore`` rules, limits, the archive.

``.nsmlignore`` (in the folder) uses the ``.gitignore`` syntax: one pattern per line, ``#``
comments, ``!`` to re-include, a trailing ``/`` for folders only, a ``/`` inside or in front to
anchor the pattern at the folder, ``*``, ``?``, ``[...]`` and ``**``. The last matching
pattern wins, and nothing inside an ignored folder can be re-included (as with git).
:data:`DEFAULT_IGNORES` apply before the file's patterns (a ``!`` line can undo them).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_IGNORES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FILES",
    "IgnoreRules",
    "Snapshot",
    "SnapshotError",
    "build_archive",
    "collect",
]

IGNORE_FILE = ".nsmlignore"
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_FILES = 10_000
DEFAULT_IGNORES = (
    ".git/",
    ".hg/",
    ".svn/",
    "__pycache__/",
    "*.pyc",
    ".ipynb_checkpoints/",
    ".venv/",
    "venv/",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".DS_Store",
    "nsml_checkpoints/",
)


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
        path = folder / IGNORE_FILE
        if path.is_file():
            lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
        return cls(lines)

    def ignored(self, relpath: str, is_dir: bool) -> bool:
        """Whether *relpath* (posix, relative to the folder) is ignored."""
        result = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(relpath):
                result = not rule.negate
        return result


@dataclass
class Snapshot:
    """The files of a folder that go into a code snapshot.

    Attributes:
        root: the folder.
        files: ``(relative posix path, absolute path, size, executable)`` sorted by path.
        extra: files that are not on disk (e.g. a notebook cell as the entry point), by path.
        skipped: paths left out and why (links that leave the folder, special files).
    """

    root: Path
    files: list[tuple[str, Path, int, bool]] = field(default_factory=list)
    extra: dict[str, bytes] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return sorted({f[0] for f in self.files} | set(self.extra))

    @property
    def bytes(self) -> int:
        return sum(f[2] for f in self.files if f[0] not in self.extra) + sum(
            len(b) for b in self.extra.values()
        )


def collect(
    folder: str | os.PathLike[str],
    *,
    extra: Mapping[str, bytes] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    rules: IgnoreRules | None = None,
) -> Snapshot:
    """Walk *folder* honouring ``.nsmlignore`` and the limits.

    Links to files inside the folder are followed; links that leave it, links to folders,
    and special files are skipped (and listed in ``skipped``).

    Raises:
        SnapshotError: the folder is missing, or the files exceed *max_bytes* or
            *max_files* (naming the largest ones, to add to ``.nsmlignore``).
    """
    root = Path(folder).resolve()
    if not root.is_dir():
        raise SnapshotError(f"{folder} is not a folder")
    rules = rules or IgnoreRules.for_folder(root)
    extra = dict(extra or {})
    snap = Snapshot(root=root, extra=extra)
    total = sum(len(b) for b in extra.values())
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for d in sorted(dirnames):
            p = here / d
            rel = prefix + d
            if rules.ignored(rel, True):
                continue
            if p.is_symlink():
                snap.skipped.append(f"{rel}/ (a link to a folder)")
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = prefix + name
            if rel in extra or rules.ignored(rel, False):
                continue
            p = here / name
            if p.is_symlink():
                target = p.resolve()
                if not target.is_relative_to(root) or not target.is_file():
                    snap.skipped.append(f"{rel} (a link that leaves the folder)")
                    continue
            elif not p.is_file():
                snap.skipped.append(f"{rel} (not a regular file)")
                continue
            st = p.stat()
            snap.files.append((rel, p, st.st_size, bool(st.st_mode & 0o111)))
            total += st.st_size
    if len(snap.files) + len(extra) > max_files:
        raise SnapshotError(
            f"{root} has {len(snap.files) + len(extra)} files to upload, more than the limit "
            f"of {max_files}; list what the session does not need in {root / IGNORE_FILE}"
        )
    if total > max_bytes:
        largest = sorted(snap.files, key=lambda f: -f[2])[:5]
        names = ", ".join(f"{f[0]} ({f[2] / 1e6:.1f} MB)" for f in largest)
        raise SnapshotError(
            f"{root} holds {total / 1e6:.1f} MB to upload, more than the limit of "
            f"{max_bytes / 1e6:.1f} MB. List large files in {root / IGNORE_FILE} and put data "
            f"in a dataset. Largest: {names}"
        )
    snap.files.sort()
    return snap


def build_archive(snap: Snapshot) -> Path:
    """Write the snapshot as a gzip-compressed tar archive to a temporary file; return it.

    Member times and owners are zeroed so that the same files give the same archive.
    The caller deletes the file.
    """
    fd, name = tempfile.mkstemp(prefix="nsml-code-", suffix=".tar.gz")
    os.close(fd)
    path = Path(name)
    try:
        with tarfile.open(path, "w:gz", compresslevel=6) as tar:
            for rel, abspath, _size, executable in snap.files:
                if rel in snap.extra:
                    continue
                info = tar.gettarinfo(str(abspath.resolve()), arcname=rel)
                _normalise(info, executable)
                with open(abspath, "rb") as f:
                    tar.addfile(info, f)
            for rel, data in sorted(snap.extra.items()):
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                _normalise(info, False)
                tar.addfile(info, io.BytesIO(data))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _normalise(info: tarfile.TarInfo, executable: bool) -> None:
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

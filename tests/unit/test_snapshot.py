"""Code snapshots of a folder in use: what is code (default ignores, `.nsmlignore`), files that
vanish or change while they are read, and what the upload says it took."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from nsml import Client, sessions
from nsml.cli_session import upload_note
from nsml.config import ClientConfig
from nsml.snapshot import (
    DEFAULT_IGNORES,
    Entry,
    Snapshot,
    SnapshotError,
    biggest_entries,
    build_archive,
    collect,
)
from tests.unit.fakeapi import FakeAPI

MiB = 1024 * 1024


def write(root: Path, files: dict[str, bytes | str]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        p.write_bytes(data)
    return root


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
    return out


def archive_of(snap: Snapshot, **kw: Any) -> dict[str, bytes]:
    path = build_archive(snap, **kw)
    try:
        return members(path)
    finally:
        path.unlink()


# What a notebook server's home folder holds after an hour of use (seen in a spawned
# container of the notebook image), next to the user's code.
HOME = {
    "train.py": "print('train')\n",
    "lib/model.py": "class Model: ...\n",
    "Untitled.ipynb": "{}",
    ".nsmlignore-not-this": "kept: not the ignore file",
    ".ipython/profile_default/history.sqlite": b"SQLite format 3\0" + b"\0" * 4096,
    ".ipython/profile_default/history.sqlite-journal": b"\0" * 512,
    ".ipython/profile_default/startup/README": "startup",
    ".local/share/jupyter/runtime/kernel-1.json": "{}",
    ".local/lib/python3.11/site-packages/pkg/__init__.py": "",
    ".local/share/Trash/files/old.py": "x",
    ".jupyter/lab/workspaces/default.jupyterlab-workspace": "{}",
    ".cache/pip/http/abc": b"\0" * 2048,
    ".cache/matplotlib/fontlist.json": "{}",
    ".config/matplotlib/matplotlibrc": "backend: agg",
    ".virtual_documents/Untitled.ipynb": "{}",
    ".Trash-1000/files/deleted.py": "x",
    ".ssh/id_ed25519": "PRIVATE KEY",
    ".aws/credentials": "[default]",
    ".kaggle/kaggle.json": "{}",
    ".netrc": "machine x password y",
    ".bash_history": "ls",
    ".python_history": "1+1",
    ".ipynb_checkpoints/Untitled-checkpoint.ipynb": "{}",
    "lib/__pycache__/model.cpython-311.pyc": b"\0",
    "lib/.ipynb_checkpoints/model-checkpoint.py": "old",
    "nsml_checkpoints/run/1/model.pt": b"\0" * 1000,
    ".git/HEAD": "ref: refs/heads/main",
    ".venv/bin/python": "",
    "myenv/pyvenv.cfg": "home = /usr/bin",
    "myenv/lib/python3.11/site-packages/big.py": "x" * 1000,
    "condaenv/conda-meta/history": "",
    "condaenv/bin/python": "",
}
CODE = [".nsmlignore-not-this", "Untitled.ipynb", "lib/model.py", "train.py"]


def test_a_home_folder_snapshot_holds_the_code_and_no_tool_state_secrets_or_envs(
    tmp_path: Path,
) -> None:
    home = write(tmp_path / "home", HOME)
    snap = collect(home)
    assert snap.paths == CODE
    assert "myenv/ (a virtual environment)" in snap.skipped
    assert "condaenv/ (a virtual environment)" in snap.skipped


@pytest.mark.parametrize(
    ("nsmlignore", "added", "removed"),
    [
        ("data/\n*.ckpt\n", [], ["data/x.bin", "w.ckpt"]),
        ("!.config/\n", [".config/matplotlib/matplotlibrc"], []),
        ("!myenv/\n", ["myenv/lib/python3.11/site-packages/big.py", "myenv/pyvenv.cfg"], []),
        ("/lib/\n", [], ["lib/model.py"]),
        ("*.ipynb\n!Untitled.ipynb\n", [], []),
        ("# only a comment\n\n", [], []),
    ],
    ids=["extends", "negates a default", "takes back an env", "anchored", "last wins", "empty"],
)
def test_nsmlignore_extends_the_defaults_and_negates_them(
    tmp_path: Path, nsmlignore: str, added: list[str], removed: list[str]
) -> None:
    home = write(tmp_path / "home", {**HOME, "data/x.bin": "d", "w.ckpt": "w"})
    (home / ".nsmlignore").write_text(nsmlignore)
    expected = sorted({*CODE, ".nsmlignore", "data/x.bin", "w.ckpt", *added} - set(removed))
    assert collect(home).paths == expected


def test_the_default_ignores_are_documented_patterns() -> None:
    for pattern in (".ipython/", ".jupyter/", ".local/", ".cache/", ".ipynb_checkpoints/"):
        assert pattern in DEFAULT_IGNORES
    for pattern in ("nsml_checkpoints/", "__pycache__/", ".git/", ".venv/", ".ssh/"):
        assert pattern in DEFAULT_IGNORES


def test_a_file_that_vanishes_while_the_folder_is_walked_is_left_out(tmp_path: Path) -> None:
    root = write(tmp_path / "code", {"a.py": "a", "b.py": "b", "sub/c.py": "c", "z.py": "z"})

    def lstat(p: Path) -> os.stat_result:
        if p.name == "b.py":  # listed, then gone before it is looked at
            p.unlink()
        if p.name == "a.py":  # a folder not walked yet goes away
            shutil.rmtree(root / "sub")
        return os.lstat(p)

    snap = collect(root, lstat=lstat)
    assert snap.paths == ["a.py", "z.py"]
    assert "b.py (vanished while the folder was read)" in snap.skipped
    assert "sub/ (vanished while it was read)" in snap.skipped
    assert archive_of(snap) == {"a.py": b"a", "z.py": b"z"}


def opener(on_open: Callable[[Path, int], None]) -> Callable[[Path], BinaryIO]:
    """An ``open_file`` for build_archive that calls *on_open(path, n)* on the n-th opening
    of each file, before the file is opened."""
    counts: dict[Path, int] = {}

    def open_file(path: Path) -> BinaryIO:
        counts[path] = counts.get(path, 0) + 1
        on_open(path, counts[path])
        return open(path, "rb")

    return open_file


class GrowingFile(io.FileIO):
    """A file that has more written to it while it is being read (a log being appended)."""

    def __init__(self, path: Path, times: int) -> None:
        super().__init__(path, "rb")
        self.target = path
        self.times = times

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        if data and self.times:
            self.times -= 1
            with open(self.target, "ab") as f:
                f.write(b"+more")
        return data


def test_a_file_that_vanishes_while_it_is_read_is_left_out(tmp_path: Path) -> None:
    root = write(tmp_path / "code", {"train.py": "t", "history.sqlite-journal": "j"})
    snap = collect(root)

    def vanish(path: Path, n: int) -> None:
        if path.name.endswith("-journal"):
            path.unlink()

    assert archive_of(snap, open_file=opener(vanish)) == {"train.py": b"t"}
    assert snap.paths == ["train.py"]
    assert "history.sqlite-journal (vanished while it was read)" in snap.skipped


def test_a_file_that_grows_while_it_is_read_is_read_again_whole(tmp_path: Path) -> None:
    root = write(tmp_path / "code", {"train.py": "t", "log.txt": "start"})
    snap = collect(root)
    grows_once = {"n": 1}

    def open_file(path: Path) -> BinaryIO:
        if path.name == "log.txt" and grows_once["n"]:
            grows_once["n"] = 0
            return GrowingFile(path, times=1)
        return open(path, "rb")

    got = archive_of(snap, open_file=open_file)
    assert got == {"log.txt": b"start+more", "train.py": b"t"}
    assert dict((rel, size) for rel, _p, size, _x in snap.files)["log.txt"] == len(b"start+more")
    assert snap.skipped == []


def test_a_file_that_never_holds_still_is_left_out_not_fatal(tmp_path: Path) -> None:
    root = write(tmp_path / "code", {"train.py": "t", "log.txt": "start"})
    snap = collect(root)

    def open_file(path: Path) -> BinaryIO:
        if path.name == "log.txt":
            return GrowingFile(path, times=1)
        return open(path, "rb")

    assert archive_of(snap, open_file=open_file) == {"train.py": b"t"}
    assert any(s.startswith("log.txt (kept changing while it was read") for s in snap.skipped)


def test_a_file_cut_short_while_it_is_read_is_read_again(tmp_path: Path) -> None:
    root = write(tmp_path / "code", {"data.csv": "1,2,3\n" * 100})
    snap = collect(root)

    def truncate(path: Path, n: int) -> None:
        if n == 1:
            with open(path, "r+b") as f:
                f.truncate(6)

    assert archive_of(snap, open_file=opener(truncate)) == {"data.csv": b"1,2,3\n"}


def test_an_entry_point_that_vanishes_is_an_error_that_says_so(tmp_path: Path) -> None:
    root = write(tmp_path / "code", {"train.py": "t"})
    with FakeAPI.running({"code": {"digest": "0" * 64, "files": 1, "bytes": 1}}) as fake:
        client = Client(ClientConfig(fake.url, "t", "test"))
        (root / ".nsmlignore").write_text("train.py\n")
        with pytest.raises(
            SnapshotError, match=r"train.py is not in the code snapshot .*nsmlignore"
        ):
            sessions.upload_code(client, root, require="train.py")
        assert fake.requests == []


# ---- what the upload says ------------------------------------------------------------------

BIGGEST = [
    # (files with sizes, most, expected entries)
    ({"a.py": 10, "data/x": 500, "data/y": 400}, 5, ["data/", "a.py"]),
    ({"src/weights.bin": 990, "src/train.py": 10}, 5, ["src/weights.bin", "src/train.py"]),
    ({"a/b/c/big": 1000, "small": 1}, 5, ["a/b/c/big", "small"]),
    ({f"f{i}": i for i in range(1, 10)}, 3, ["f9", "f8", "f7"]),
    ({}, 5, []),
]


@pytest.mark.parametrize(("sizes", "most", "expected"), BIGGEST)
def test_the_biggest_entries_are_the_lines_to_put_in_nsmlignore(
    sizes: dict[str, int], most: int, expected: list[str]
) -> None:
    assert [str(e) for e in biggest_entries(sizes.items(), most)] == expected


def test_a_folder_entry_counts_what_it_holds() -> None:
    (e,) = biggest_entries([("data/x", 5), ("data/y/z", 7)], 1)
    assert e == Entry("data", 12, 2, True)


def upload(tmp_path: Path, files: dict[str, bytes | str], **kw: Any) -> sessions.CodeUpload:
    root = write(tmp_path / "code", files)
    snap = collect(root, **kw)
    body = {"digest": "0" * 64, "files": snap.count, "bytes": snap.bytes}
    with FakeAPI.running({"code": body}) as fake:
        client = Client(ClientConfig(fake.url, "t", "test"))
        return sessions.upload_code(client, root, **kw)


def test_the_upload_says_what_it_took(tmp_path: Path) -> None:
    up = upload(tmp_path, {**HOME})
    note = upload_note(up)
    size = sum(len(str(HOME[rel])) for rel in CODE)
    assert note.splitlines()[0] == f"code: 4 files, {size} B uploaded from {up.folder}"
    assert "left out: condaenv/ (a virtual environment); myenv/ (a virtual environment)" in note
    assert "biggest" not in note


def test_near_the_limit_the_upload_names_the_biggest_entries_and_the_hint(
    tmp_path: Path,
) -> None:
    files: dict[str, bytes | str] = {
        "train.py": "t",
        "data/a.npy": b"\0" * (500 * 1024),
        "data/b.npy": b"\0" * (400 * 1024),
        "model.ckpt": b"\0" * (100 * 1024),
    }
    up = upload(tmp_path, files, max_bytes=MiB + 100 * 1024)
    note = upload_note(up)
    assert up.near_limit
    assert "close to the limit (" in note and "% of the 1.1 MiB limit" in note
    assert "the biggest: data/ (900.0 KiB), model.ckpt (100.0 KiB), train.py (1 B)" in note
    assert "List what the session does not need in .nsmlignore" in note


def test_over_the_limit_the_error_names_the_biggest_entries_and_the_hint(tmp_path: Path) -> None:
    files = {"train.py": "t", "data/a.npy": b"\0" * 3000, "data/b.npy": b"\0" * 2000}
    root = write(tmp_path / "code", files)
    with pytest.raises(SnapshotError) as e:
        collect(root, max_bytes=1000)
    assert "Biggest: data/ (4.9 KiB), train.py (1 B)" in str(e.value)
    assert ".nsmlignore" in str(e.value) and "dataset" in str(e.value)
    with pytest.raises(SnapshotError, match=r"Most files: data/: 2 files"):
        collect(root, max_files=1)

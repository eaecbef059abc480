"""Manifests and folder scans, as a specification: contents, canonical form, unsafe inputs."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from nsml_datasets import (
    BlobStore,
    DatasetError,
    Entry,
    IntegrityError,
    InvalidName,
    Manifest,
    ProgressEvent,
    UnsafePath,
    diff,
    scan,
    validate_relpath,
    verify_folder,
)
from tests.unit.conftest import sha, write

# -- what a scan keeps ---------------------------------------------------------------------------


def test_scan_lists_every_file_sorted_with_size_hash_and_executable_bit(work: Path) -> None:
    src = write(
        work / "src", {"b.txt": b"bee", "a/z.bin": b"\x00" * 10, "a/run.sh": b"#!/bin/sh\n"}
    )
    (src / "a/run.sh").chmod(0o755)
    (src / "empty-folder").mkdir()
    m = scan(src)
    assert [(e.path, e.size, e.blake3, e.executable) for e in m] == [
        ("a/run.sh", 10, sha(b"#!/bin/sh\n"), True),
        ("a/z.bin", 10, sha(b"\x00" * 10), False),
        ("b.txt", 3, sha(b"bee"), False),
    ]
    assert m.total_bytes == 23
    assert m.file_count == 3


def test_symlinks_inside_the_folder_are_followed_and_stored_as_files(work: Path) -> None:
    src = write(work / "src", {"data/real.txt": b"content"})
    os.symlink("data/real.txt", src / "alias.txt")
    os.symlink("data", src / "data-link")
    m = scan(src)
    assert [e.path for e in m] == ["alias.txt", "data-link/real.txt", "data/real.txt"]
    assert len(m.blobs()) == 1, "three paths, one content, one blob"


def test_a_large_file_hashes_like_the_reference_blake3(work: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    src = write(work / "src", {"big": data})
    assert scan(src).entries == (Entry("big", len(data), sha(data)),)


def test_progress_events_run_monotonically_to_the_totals(work: Path) -> None:
    src = write(work / "src", {f"f{i}": os.urandom(1000 * i) for i in range(20)})
    events: list[ProgressEvent] = []
    scan(src, on_progress=events.append, workers=2)
    hashing = [e for e in events if e.phase == "hash"]
    assert {e.phase for e in events} == {"scan", "hash"}
    assert hashing[-1].done_bytes == hashing[-1].total_bytes == sum(1000 * i for i in range(20))
    assert hashing[-1].done_files == hashing[-1].total_files == 20
    assert hashing[-1].fraction == 1.0
    done = [e.done_bytes for e in hashing]
    assert done == sorted(done)


# -- canonical form ------------------------------------------------------------------------------


def test_the_digest_does_not_depend_on_entry_order() -> None:
    a = Entry("a", 1, sha(b"a"))
    b = Entry("b/c", 1, sha(b"c"), executable=True)
    assert Manifest([a, b]).digest == Manifest([b, a]).digest
    assert Manifest([a, b]).digest == sha(Manifest([b, a]).to_json())


def test_json_round_trips_and_is_canonical() -> None:
    m = Manifest([Entry("dir/ü.txt", 3, sha(b"abc")), Entry("x", 0, sha(b""))])
    assert Manifest.from_json(m.to_json()) == m
    assert Manifest.from_dict(m.to_dict()).digest == m.digest
    assert b" " not in m.to_json()
    assert "ü".encode() in m.to_json()


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        pytest.param([{"path": "../etc/passwd"}], "parent-reference", id="parent reference"),
        pytest.param([{"path": "a/../../x"}], "parent-reference", id="parent reference inside"),
        pytest.param([{"path": "/etc/passwd"}], "absolute", id="absolute path"),
        pytest.param([{"path": "a//b"}], "bad-name", id="empty component"),
        pytest.param([{"path": "./a"}], "bad-name", id="dot component"),
        pytest.param([{"path": "a/"}], "bad-name", id="trailing slash"),
        pytest.param([{"path": "a\\..\\b"}], "bad-name", id="backslash"),
        pytest.param([{"path": "a\x00b"}], "bad-name", id="NUL byte"),
        pytest.param([{"path": "x" * 256}], "bad-name", id="name over 255 bytes"),
        pytest.param([{"path": "a"}, {"path": "a"}], "bad-name", id="duplicate path"),
        pytest.param(
            [{"path": "a"}, {"path": "a/b"}], "bad-name", id="a file that is also a folder"
        ),
    ],
)
def test_manifests_from_clients_with_unsafe_paths_are_refused(
    entries: list[dict[str, object]], reason: str
) -> None:
    body = {
        "format": "nsml-dataset-manifest/2",
        "entries": [{"size": 1, "blake3": "0" * 64, "executable": False, **e} for e in entries],
    }
    with pytest.raises(UnsafePath) as info:
        Manifest.from_dict(body)
    assert info.value.reason == reason
    assert repr(entries[0]["path"])[:40] in str(info.value)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        pytest.param({"entries": []}, DatasetError, id="no format"),
        pytest.param({"format": "nsml-dataset-manifest/2"}, DatasetError, id="no entries"),
        pytest.param(
            {
                "format": "nsml-dataset-manifest/2",
                "entries": [{"path": "a", "size": 1, "blake3": "XY"}],
            },
            InvalidName,
            id="bad hash",
        ),
        pytest.param(
            {
                "format": "nsml-dataset-manifest/2",
                "entries": [{"path": "a", "size": -1, "blake3": "0" * 64}],
            },
            DatasetError,
            id="negative size",
        ),
        pytest.param(
            {
                "format": "nsml-dataset-manifest/2",
                "entries": [{"path": "a", "size": 1, "blake3": "0" * 64, "mode": 511}],
            },
            DatasetError,
            id="unknown key",
        ),
    ],
)
def test_malformed_manifests_are_refused(body: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        Manifest.from_dict(body)


def test_validate_relpath_accepts_ordinary_paths() -> None:
    assert validate_relpath("train/cats/001.png") == "train/cats/001.png"
    assert validate_relpath("..hidden/...") == "..hidden/..."


# -- diff ----------------------------------------------------------------------------------------


def test_diff_names_added_removed_changed_and_the_new_blobs() -> None:
    old = Manifest(
        [Entry("keep", 1, sha(b"k")), Entry("gone", 1, sha(b"g")), Entry("edit", 1, sha(b"1"))]
    )
    new = Manifest(
        [Entry("keep", 1, sha(b"k")), Entry("edit", 1, sha(b"2")), Entry("new", 1, sha(b"g"))]
    )
    d = diff(old, new)
    assert [e.path for e in d.added] == ["new"]
    assert [e.path for e in d.removed] == ["gone"]
    assert [(o.blake3, n.blake3) for o, n in d.changed] == [(sha(b"1"), sha(b"2"))]
    assert d.unchanged == 1
    assert dict(d.new_blobs) == {sha(b"2"): 1}, "'new' reuses the content of 'gone'"
    assert d.new_bytes == 1
    assert d
    assert not diff(new, new)


# -- unsafe folders ------------------------------------------------------------------------------

Maker = Callable[[Path, Path], str]


def symlink_to_outside_file(src: Path, outside: Path) -> str:
    os.symlink(outside / "secret.txt", src / "leak.txt")
    return "leak.txt"


def relative_symlink_escaping(src: Path, outside: Path) -> str:
    (src / "sub").mkdir()
    os.symlink("../../outside/secret.txt", src / "sub" / "leak.txt")
    return "sub/leak.txt"


def symlink_to_outside_folder(src: Path, outside: Path) -> str:
    os.symlink(outside, src / "all")
    return "all"


def broken_symlink(src: Path, outside: Path) -> str:
    os.symlink("nowhere", src / "dangling")
    return "dangling"


def symlink_loop(src: Path, outside: Path) -> str:
    (src / "d").mkdir()
    os.symlink("..", src / "d" / "up")
    return "d/up"


def fifo(src: Path, outside: Path) -> str:
    os.mkfifo(src / "pipe")
    return "pipe"


def unix_socket(src: Path, outside: Path) -> str:
    s = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(src)  # AF_UNIX paths are limited to ~100 bytes: bind relative to the folder
    try:
        s.bind("sock")
    finally:
        os.chdir(cwd)
        s.close()
    return "sock"


def device_file(src: Path, outside: Path) -> str:
    try:
        os.mknod(src / "null", 0o600 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device file needs root (the FIFO and socket cases cover the rule)")
    return "null"


def oversize_file(src: Path, outside: Path) -> str:
    (src / "sub").mkdir()
    (src / "sub" / "huge.bin").write_bytes(b"x" * 1001)
    return "sub/huge.bin"


def too_many_files(src: Path, outside: Path) -> str:
    for i in range(6):
        (src / f"f{i}").write_bytes(b"x")
    return "f5"


def undecodable_name(src: Path, outside: Path) -> str:
    os.close(os.open(os.fsencode(src) + b"/bad\xff", os.O_CREAT | os.O_WRONLY, 0o644))
    return "bad\udcff"


def control_character(src: Path, outside: Path) -> str:
    (src / "line\nbreak").write_bytes(b"x")
    return "line\nbreak"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(symlink_to_outside_file, "symlink-escape", id="symlink to a file outside"),
        pytest.param(
            relative_symlink_escaping, "symlink-escape", id="relative symlink climbing out"
        ),
        pytest.param(symlink_to_outside_folder, "symlink-escape", id="symlink to a folder outside"),
        pytest.param(broken_symlink, "broken-symlink", id="dangling symlink"),
        pytest.param(symlink_loop, "symlink-loop", id="symlink to a parent folder"),
        pytest.param(fifo, "special-file", id="FIFO"),
        pytest.param(unix_socket, "special-file", id="socket"),
        pytest.param(device_file, "special-file", id="device file"),
        pytest.param(oversize_file, "too-large", id="file over the size limit"),
        pytest.param(too_many_files, "too-many-files", id="more files than allowed"),
        pytest.param(undecodable_name, "bad-name", id="name that is not UTF-8"),
        pytest.param(control_character, "bad-name", id="control character in a name"),
    ],
)
def test_unsafe_folders_are_refused_naming_the_path_and_nothing_is_written(
    work: Path, make: Maker, reason: str
) -> None:
    outside = work / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"do not copy me")
    src = work / "src"
    src.mkdir()
    (src / "fine.txt").write_bytes(b"fine")
    offending = make(src, outside)
    before = {p: (p.stat().st_mode, p.stat().st_nlink) for p in outside.rglob("*")}

    with pytest.raises(UnsafePath) as info:
        scan(src, max_file_bytes=1000, max_files=5)
    assert info.value.reason == reason
    assert info.value.path == offending
    assert repr(offending) in str(info.value)

    store = BlobStore(work / "store")
    with pytest.raises(UnsafePath) as info:
        store.push_folder(src, max_file_bytes=1000, max_files=5)
    assert info.value.path == offending
    assert store.usage().blobs == 0, "a refused push stores nothing"
    assert store.manifest_digests() == []
    assert list((work / "store" / "tmp").iterdir()) == []
    after = {p: (p.stat().st_mode, p.stat().st_nlink) for p in outside.rglob("*")}
    assert after == before, "nothing outside the folder was touched or linked"
    assert sorted(p.name for p in work.iterdir()) == ["outside", "src", "store"]


def test_a_folder_that_is_not_a_folder_is_refused(work: Path) -> None:
    (work / "file").write_bytes(b"x")
    with pytest.raises(UnsafePath, match="is not a folder"):
        scan(work / "file")
    with pytest.raises(UnsafePath, match="cannot read the folder"):
        scan(work / "missing")


def test_total_size_limit_names_the_file_that_crosses_it(work: Path) -> None:
    src = write(work / "src", {"a": b"x" * 60, "b": b"x" * 60})
    with pytest.raises(UnsafePath) as info:
        scan(src, max_total_bytes=100)
    assert info.value.reason == "total-too-large"
    assert info.value.path == "b", "files are walked in name order"


def test_verify_folder_detects_a_changed_file(work: Path) -> None:
    src = write(work / "src", {"a": b"one", "b": b"two"})
    m = scan(src)
    verify_folder(src, m)
    (src / "b").write_bytes(b"TWO")
    with pytest.raises(IntegrityError, match="'b' differs"):
        verify_folder(src, m)
    (src / "c").write_bytes(b"extra")
    (src / "b").write_bytes(b"two")
    with pytest.raises(DatasetError, match="1 extra"):
        verify_folder(src, m)

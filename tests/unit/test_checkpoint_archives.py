"""Checkpoint archives: what the server refuses at upload, what the client refuses to unpack,
and that a refusal leaves nothing behind. The same malicious archives go through both."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from nsml._checkpoint import ArchiveError, extract, pack
from nsml_server.artifacts import ArtifactError, validate_checkpoint_archive


@pytest.fixture(params=["data filter", "Python without the data filter"])
def unpacker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Unpack with tarfile's ``data`` filter, and as on Pythons before 3.11.4 (the session
    image's Debian 3.11.2 has no filter): both must give the same result."""
    if request.param != "data filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return str(request.param)


def tar_bytes(*members: tarfile.TarInfo | tuple[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def many_files(n: int) -> bytes:
    return tar_bytes(*[(f"f{i}", b"x") for i in range(n)])


GOOD = tar_bytes(("model.bin", b"weights"), ("opt/state.json", b"{}"))
CUT = GOOD[:600]  # the first header and part of its data

#: (case, archive, status, words the message must hold)
MALICIOUS: list[tuple[str, bytes, int, str]] = [
    ("not an archive", b"this is not a tar archive at all" * 40, 400, "is not a tar archive"),
    ("an empty upload", b"", 400, "is not a tar archive"),
    ("a path that climbs out", tar_bytes(("../x", b"evil")), 400, "'../x' leaves"),
    ("a path that climbs out late", tar_bytes(("a/../../x", b"e")), 400, "'a/../../x' leaves"),
    ("an absolute path", tar_bytes(("/abs", b"evil")), 400, "'/abs' has an absolute path"),
    (
        "a symbolic link to /etc/shadow",
        tar_bytes(special("shadow", tarfile.SYMTYPE, "/etc/shadow")),
        400,
        "'shadow' is a symbolic link (to '/etc/shadow')",
    ),
    (
        "a hard link to /etc/shadow",
        tar_bytes(special("shadow", tarfile.LNKTYPE, "/etc/shadow")),
        400,
        "'shadow' is a hard link (to '/etc/shadow')",
    ),
    (
        "a link inside the folder",
        tar_bytes(("a", b"x"), special("b", tarfile.SYMTYPE, "a")),
        400,
        "'b' is a symbolic link",
    ),
    ("a device", tar_bytes(special("null", tarfile.CHRTYPE)), 400, "'null' is a device"),
    ("a FIFO", tar_bytes(special("pipe", tarfile.FIFOTYPE)), 400, "'pipe' is a FIFO"),
    ("a path twice", tar_bytes(("a", b"1"), ("a", b"2")), 400, "'a' appears twice"),
    ("a file used as a folder", tar_bytes(("a", b"1"), ("a/b", b"2")), 400, "inside 'a'"),
    ("an archive cut short", CUT, 400, "'model.bin'"),
    ("a gzip stream cut short", tar_bytes(("m", b"w" * 3000), gz=True)[:-12], 400, "not a whole"),
    ("too many members", many_files(11), 413, "more than 10 files and folders"),
    ("too large unpacked", tar_bytes(("big", b"\0" * 5000), gz=True), 413, "'big'"),
]


@pytest.mark.parametrize(
    ("archive", "status", "words"),
    [pytest.param(a, st, w, id=case) for case, a, st, w in MALICIOUS],
)
def test_the_server_refuses_a_malicious_checkpoint_naming_the_member(
    tmp_path: Path, archive: bytes, status: int, words: str
) -> None:
    path = tmp_path / "upload"
    path.write_bytes(archive)
    with pytest.raises(ArtifactError) as e:
        validate_checkpoint_archive(path, max_bytes=4096, max_members=10)
    assert e.value.status == status and words in e.value.message, e.value.message
    assert "\n" not in e.value.message, "one line"
    assert e.value.reason == ("too_large" if status == 413 else "bad_request")


@pytest.mark.parametrize(
    "archive",
    [
        pytest.param(a, id=case)
        for case, a, status, _ in MALICIOUS
        if status == 400 and case != "a path twice"
    ]
    + [pytest.param(tar_bytes(("a", b"1"), ("a", b"2")), id="a path twice")],
)
def test_the_client_refuses_to_unpack_a_damaged_checkpoint_and_leaves_nothing(
    tmp_path: Path, archive: bytes, unpacker: str
) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    src = tmp_path / "ckpt.tar"
    src.write_bytes(archive)
    with pytest.raises(ArchiveError):
        extract(src, dest / "3")
    assert list(dest.iterdir()) == [], "nothing half-written, no temporary folder"
    assert not (tmp_path / "x").exists() and not Path("/abs").exists()


@pytest.mark.parametrize(
    ("archive", "files"),
    [
        pytest.param(GOOD, {"model.bin": b"weights", "opt/state.json": b"{}"}, id="plain"),
        pytest.param(tar_bytes(("./w", b"1"), gz=True), {"w": b"1"}, id="gzip, ./ paths"),
        pytest.param(tar_bytes(), {}, id="empty folder"),
        pytest.param(
            tar_bytes(special(".", tarfile.DIRTYPE), special("d", tarfile.DIRTYPE), ("d/f", b"")),
            {"d/f": b""},
            id="folders",
        ),
    ],
)
def test_a_valid_checkpoint_is_accepted_and_unpacks_whole(
    tmp_path: Path, archive: bytes, files: dict[str, bytes], unpacker: str
) -> None:
    src = tmp_path / "ckpt.tar"
    src.write_bytes(archive)
    got = validate_checkpoint_archive(src, max_bytes=4096, max_members=10)
    assert got.files == len(files)
    extract(src, tmp_path / "out")
    found = {
        p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
        for p in (tmp_path / "out").rglob("*")
        if p.is_file()
    }
    assert found == files


def test_unpacking_over_an_existing_folder_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "ckpt.tar"
    src.write_bytes(GOOD)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mine").write_text("keep")
    with pytest.raises(FileExistsError):
        extract(src, dest)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (dest / "mine").read_text() == "keep" and not (dest / "model.bin").exists()


def test_unpacking_reads_an_open_file_too(tmp_path: Path) -> None:
    with io.BytesIO(tar_bytes(("w", b"1"), gz=True)) as f:
        extract(f, tmp_path / "out")
    assert (tmp_path / "out" / "w").read_bytes() == b"1"


def test_a_saved_folder_packs_files_and_folders_and_links_to_files_as_copies(
    tmp_path: Path, unpacker: str
) -> None:
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "w.bin").write_bytes(b"weights")
    (folder / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(folder / "run.sh", 0o755)
    outside = tmp_path / "config.json"
    outside.write_text("{}")
    (folder / "config.json").symlink_to(outside)
    archive = tmp_path / "a.tar"
    sha = pack(folder, archive)
    assert len(sha) == 64
    validate_checkpoint_archive(archive, max_bytes=1 << 20, max_members=10)
    extract(archive, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "sub" / "w.bin").read_bytes() == b"weights"
    assert (out / "config.json").read_text() == "{}" and not (out / "config.json").is_symlink()
    assert os.stat(out / "run.sh").st_mode & 0o111


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda f, t: (f / "d").symlink_to(t, target_is_directory=True), "link to a folder"),
        (lambda f, t: (f / "gone").symlink_to(t / "missing"), "cannot be read"),
        (lambda f, t: os.mkfifo(f / "pipe"), "not a regular file"),
    ],
)
def test_a_folder_a_checkpoint_cannot_hold_is_refused_when_saving(
    tmp_path: Path, make: Callable[[Path, Path], None], words: str
) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    make(folder, tmp_path)
    with pytest.raises(ArchiveError) as e:
        pack(folder, tmp_path / "a.tar")
    assert words in str(e.value), e.value


def test_a_gzip_bomb_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    data = gzip.compress(tar_bytes(("zeros", b"\0" * (1 << 20))))
    assert len(data) < 4096
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(data)
    with pytest.raises(ArtifactError) as e:
        validate_checkpoint_archive(path, max_bytes=64 * 1024, max_members=10)
    assert e.value.status == 413

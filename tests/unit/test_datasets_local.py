"""The local transport: files handed to a store over a real Unix socket, as descriptors."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from nsml_datasets import BlobStore
from nsml_datasets.hashing import hash_fd
from nsml_datasets.local import Grants, LocalChannel, LocalError, LocalServer

from .conftest import write


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


@pytest.fixture
def served(work: Path) -> Iterator[tuple[BlobStore, Grants, LocalServer]]:
    store = BlobStore(work / "store", durable=False)
    grants = Grants()
    with LocalServer(store, grants) as server:
        yield store, grants, server


def blobs_in(store: BlobStore) -> set[str]:
    return {p.parent.name + p.name for p in (store.root / "blobs").rglob("*") if p.is_file()}


def leftovers(store: BlobStore) -> list[str]:
    return sorted(p.name for p in (store.root / "tmp").iterdir())


def ingest(ch: LocalChannel, paths: list[Path], expect: list[str | None] | None = None) -> list:
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        return ch.ingest(
            [
                (fd, p.name, x)
                for fd, p, x in zip(fds, paths, expect or [None] * len(paths), strict=True)
            ]
        )
    finally:
        for fd in fds:
            os.close(fd)


def test_files_handed_over_are_stored_under_their_hash_once_placed(
    served: tuple[BlobStore, Grants, LocalServer], work: Path
) -> None:
    store, grants, server = served
    data = {"a": os.urandom(3000), "b": b"", "c": os.urandom(5 << 20), "d": b"same", "e": b"same"}
    src = write(work / "src", data)
    key = grants.issue("ann", max_file_bytes=1 << 30)
    with LocalChannel(server.name, key, os.geteuid()) as ch:
        got = ingest(ch, [src / n for n in data])
        assert got == [(b3(v), len(v)) for v in data.values()]
        assert blobs_in(store) == set(), "nothing is visible before place"
        assert ch.place() == (4, 3000 + (5 << 20) + 4)
    assert blobs_in(store) == {b3(v) for v in data.values()}
    assert store.open(b3(data["c"])).read() == data["c"]
    assert leftovers(store) == []
    # The key remembers what its holder handed over (proof that they hold those bytes), for
    # the upload that names it; for its own user only.
    handed = {b3(v): len(v) for v in data.values()}
    assert grants.proven_by(key, "ann") == handed
    with pytest.raises(LocalError, match="another user"):
        grants.proven_by(key, "bob")
    # The same files again: the same answer (what was handed over, not what was new), and
    # the record is not double-counted.
    with LocalChannel(server.name, key, os.geteuid()) as ch:
        ingest(ch, [src / n for n in data])
        assert ch.place() == (4, 3000 + (5 << 20) + 4)
    assert grants.proven_by(key, "ann") == handed


def test_handing_over_a_file_the_store_holds_proves_it_and_tells_nothing_more(
    served: tuple[BlobStore, Grants, LocalServer], work: Path
) -> None:
    store, grants, server = served
    theirs, mine = os.urandom(9000), os.urandom(9000)
    store.put_stream(io.BytesIO(theirs), b3(theirs), len(theirs))  # another user's file
    src = write(work / "src", {"theirs": theirs, "mine": mine})
    answers = []
    for name in ("theirs", "mine"):
        key = grants.issue("ann", max_file_bytes=1 << 20)
        with LocalChannel(server.name, key, os.geteuid()) as ch:
            answers.append((ingest(ch, [src / name])[0][1], ch.place()))
        assert list(grants.proven_by(key, "ann")) == [b3(src.joinpath(name).read_bytes())]
    assert answers[0] == answers[1] == (9000, (1, 9000))
    assert leftovers(store) == []


def test_an_unchanged_file_is_hashed_in_place_and_not_copied_again(
    served: tuple[BlobStore, Grants, LocalServer], work: Path
) -> None:
    store, grants, server = served
    old, new = os.urandom(10_000), os.urandom(10_000)
    src = write(work / "src", {"same": old, "changed": old})
    with LocalChannel(server.name, grants.issue("ann", max_file_bytes=1 << 30)) as ch:
        ingest(ch, [src / "same"])
        ch.place()
    copies = count_copies(store)
    # The key reads the previous version (which holds `old`): its hints are taken.
    key = grants.issue("ann", max_file_bytes=1 << 30, readable={b3(old): len(old)})
    with LocalChannel(server.name, key, os.geteuid()) as ch:
        (src / "changed").write_bytes(new)
        got = ingest(ch, [src / "same", src / "changed"], [b3(old), b3(old)])
        assert got == [(b3(old), 10_000), (b3(new), 10_000)], "a stale hint is not trusted"
        ch.place()
    assert copies == ["changed"], "the unchanged file was hashed in place, not copied"
    assert blobs_in(store) == {b3(old), b3(new)}
    assert grants.proven_by(key, "ann") == {b3(old): 10_000, b3(new): 10_000}


def test_a_hint_naming_a_blob_the_key_cannot_read_is_not_taken(
    served: tuple[BlobStore, Grants, LocalServer], work: Path
) -> None:
    """Whether the in-place shortcut is taken shows in the time it takes: it must not tell
    whether the store holds a blob the holder cannot read."""
    store, grants, server = served
    theirs = os.urandom(10_000)
    store.put_stream(io.BytesIO(theirs), b3(theirs), len(theirs))
    src = write(work / "src", {"guess": theirs})
    copies = count_copies(store)
    with LocalChannel(server.name, grants.issue("ann", max_file_bytes=1 << 20)) as ch:
        assert ingest(ch, [src / "guess"], [b3(theirs)]) == [(b3(theirs), 10_000)]
        ch.place()
    assert copies == ["guess"], "copied and hashed as any file whose hint is not readable"


def count_copies(store: BlobStore) -> list[str]:
    """The names of the files the store copies from now on (the hint was not taken)."""
    names: list[str] = []
    real = store._ingest_fd

    def spy(fd: int, st: os.stat_result, source: str, name: str, **kw: object) -> object:
        names.append(name)
        return real(fd, st, source, name, **kw)  # type: ignore[arg-type]

    store._ingest_fd = spy  # type: ignore[method-assign]
    return names


def test_a_bad_key_is_refused_and_the_connection_stays_usable(
    served: tuple[BlobStore, Grants, LocalServer], work: Path
) -> None:
    store, grants, server = served
    src = write(work / "src", {"a": b"x"})
    with LocalChannel(server.name, "not-a-key", os.geteuid()) as ch:
        with pytest.raises(LocalError, match="unknown or expired key") as e:
            ingest(ch, [src / "a"])
        assert e.value.reason == "forbidden"
        ch.key = grants.issue("ann", max_file_bytes=100)
        assert ingest(ch, [src / "a"]) == [(b3(b"x"), 1)]
    expired = Grants(ttl_s=-1)
    with LocalServer(store, expired) as other:
        with LocalChannel(other.name, expired.issue("ann", max_file_bytes=9)) as ch:
            with pytest.raises(LocalError, match="expired"):
                ingest(ch, [src / "a"])


def test_special_and_oversized_files_are_refused_naming_them_and_nothing_stays(
    served: tuple[BlobStore, Grants, LocalServer], work: Path
) -> None:
    store, grants, server = served
    src = write(work / "src", {"ok": b"fine", "big": os.urandom(2000)})
    key = grants.issue("ann", max_file_bytes=1000)
    r, w = os.pipe()
    try:
        with LocalChannel(server.name, key, os.geteuid()) as ch:
            with pytest.raises(LocalError, match="'big' is 2000 bytes, over the limit of 1000"):
                ingest(ch, [src / "ok", src / "big"])
            with pytest.raises(LocalError, match="'fifo' is not a regular file"):
                ch.ingest([(r, "fifo", None)])
            ch.place()
    finally:
        os.close(r)
        os.close(w)
    assert blobs_in(store) <= {b3(b"fine")}


def test_blobs_of_a_connection_that_ends_before_place_are_removed(
    served: tuple[BlobStore, Grants, LocalServer], work: Path
) -> None:
    store, grants, server = served
    src = write(work / "src", {"a": os.urandom(4096)})
    ch = LocalChannel(server.name, grants.issue("ann", max_file_bytes=1 << 20), os.geteuid())
    ingest(ch, [src / "a"])
    assert len(leftovers(store)) == 1
    ch.close()
    deadline = time.monotonic() + 5
    while leftovers(store) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leftovers(store) == [] and blobs_in(store) == set()


def test_open_hands_out_only_the_blobs_of_the_granted_version(
    served: tuple[BlobStore, Grants, LocalServer], work: Path
) -> None:
    store, grants, server = served
    mine, theirs = os.urandom(7000), os.urandom(7000)
    for data in (mine, theirs):
        store.put_stream(io.BytesIO(data), b3(data), len(data))
    key = grants.issue("ann", max_file_bytes=1, readable={b3(mine): len(mine)})
    with LocalChannel(server.name, key, os.geteuid()) as ch:
        [(fd, size)] = ch.open([b3(mine)])
        try:
            assert size == 7000 and os.pread(fd, 8000, 0) == mine
            with pytest.raises(OSError):
                os.write(fd, b"x")
        finally:
            os.close(fd)
        with pytest.raises(LocalError, match="not part of the version this key reads"):
            ch.open([b3(mine), b3(theirs)])
        with pytest.raises(LocalError, match="64 lowercase"):
            ch.open(["../../etc/passwd"])


def test_a_socket_answering_as_another_user_gets_nothing(
    served: tuple[BlobStore, Grants, LocalServer],
) -> None:
    _, grants, server = served
    with pytest.raises(LocalError, match="answers as user") as e:
        LocalChannel(server.name, grants.issue("ann", max_file_bytes=1), os.geteuid() + 1)
    assert e.value.reason == "impostor"
    with pytest.raises(LocalError, match="cannot reach") as e:
        LocalChannel("@jupyter-nsml-datasets-nobody-listens", "k")
    assert e.value.reason == "unreachable"


def test_a_handed_over_file_is_hashed_without_mapping_it_or_moving_its_offset(
    work: Path,
) -> None:
    path = write(work / "src", {"f": b"0123456789"}) / "f"
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 3, os.SEEK_SET)
        assert hash_fd(fd, 10) == b3(b"0123456789")
        assert hash_fd(fd, 4) == b3(b"0123")
        os.truncate(path, 6)  # the owner shrinks it: what is left is hashed, no SIGBUS
        assert hash_fd(fd, 10) == b3(b"012345")
        assert os.lseek(fd, 0, os.SEEK_CUR) == 3
    finally:
        os.close(fd)

"""The blob store, as a specification: dedup, verified writes, resumable uploads, gc, pulls."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nsml_datasets import (
    BlobStore,
    Busy,
    DatasetError,
    Entry,
    IntegrityError,
    InvalidName,
    Manifest,
    NotFound,
    ProgressEvent,
    StoreUsage,
    UnsafePath,
    UploadIncomplete,
    download,
    scan,
)
from tests.conftest import REPO
from tests.unit.conftest import sha, write


@pytest.fixture()
def store(work: Path) -> BlobStore:
    return BlobStore(work / "store")


def blob_bytes(store: BlobStore) -> int:
    """Bytes of every file under ``blobs/``, measured on disk (not through the store's API)."""
    return sum(p.stat().st_size for p in (store.root / "blobs").rglob("*") if p.is_file())


def files_under(root: Path) -> list[str]:
    """Every file in a store but its FORMAT marker."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if not p.is_dir() and p != root / "FORMAT"
    )


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def dataset(n: int = 100, size: int = 4096, seed: int = 0) -> dict[str, bytes]:
    """*n* files of *size* distinct bytes each."""
    return {f"part{i // 10}/f{i:03}.bin": (f"{seed}:{i}:".encode() * size)[:size] for i in range(n)}


# -- storing blobs -------------------------------------------------------------------------------


def test_a_blob_is_stored_once_under_its_hash_and_read_only(store: BlobStore) -> None:
    data = b"hello" * 1000
    assert store.put_stream(io.BytesIO(data), sha(data), len(data)) is True
    assert store.put_stream(io.BytesIO(data), sha(data), len(data)) is False
    path = store.blob_path(sha(data))
    assert path == store.root / "blobs" / sha(data)[:2] / sha(data)[2:]
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert store.missing([sha(data), sha(b"other"), sha(data)]) == [sha(b"other")]
    with store.open(sha(data)) as f:
        assert f.read() == data
    store.verify(sha(data))


@pytest.mark.parametrize(
    ("body", "declared_sha", "declared_size", "match"),
    [
        pytest.param(b"abc", sha(b"abd"), 3, "hash to", id="content does not match the hash"),
        pytest.param(b"abc", sha(b"abc"), 4, "received 3 bytes, expected 4", id="stream too short"),
        pytest.param(b"abcd", sha(b"abc"), 3, "more than", id="stream too long"),
    ],
)
def test_a_bad_blob_is_refused_and_nothing_is_stored(
    store: BlobStore, body: bytes, declared_sha: str, declared_size: int, match: str
) -> None:
    with pytest.raises(IntegrityError, match=match):
        store.put_stream(io.BytesIO(body), declared_sha, declared_size)
    assert store.usage().blobs == 0
    assert files_under(store.root) == []


def test_a_blob_over_the_size_limit_is_refused(work: Path) -> None:
    store = BlobStore(work / "store", max_blob_bytes=10)
    with pytest.raises(DatasetError, match="over the store's limit of 10 bytes"):
        store.put_stream(io.BytesIO(b"x" * 11), sha(b"x" * 11), 11)
    assert store.usage().blobs == 0


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("../../../../etc/passwd", id="parent references"),
        pytest.param("/etc/passwd", id="absolute path"),
        pytest.param("AB" * 32, id="uppercase hex"),
        pytest.param("a" * 63, id="too short"),
    ],
)
def test_names_that_could_leave_the_store_are_refused(store: BlobStore, bad: str) -> None:
    with pytest.raises(InvalidName):
        store.blob_path(bad)
    with pytest.raises(InvalidName):
        store.put_stream(io.BytesIO(b""), bad, 0)
    with pytest.raises(InvalidName):
        store.resume(bad)
    with pytest.raises(InvalidName):
        store.load_manifest(bad)
    with pytest.raises(InvalidName):
        store.gc([bad])


def test_put_file_copies_and_verifies(work: Path, store: BlobStore) -> None:
    src = work / "f"
    src.write_bytes(b"payload")
    assert store.put_file(src, sha(b"payload")) is True
    assert store.blob_path(sha(b"payload")).stat().st_ino != src.stat().st_ino
    assert stat.S_IMODE(src.stat().st_mode) == 0o644, "a copy leaves the source alone"
    with pytest.raises(IntegrityError, match="does not hold blob"):
        store.put_file(src, sha(b"something else"))


def test_put_file_with_link_hands_the_file_over_without_copying(
    work: Path, store: BlobStore
) -> None:
    src = work / "f"
    src.write_bytes(b"payload")
    assert store.put_file(src, sha(b"payload"), link=True) is True
    blob = store.blob_path(sha(b"payload"))
    assert blob.stat().st_ino == src.stat().st_ino
    assert stat.S_IMODE(src.stat().st_mode) == 0o444, "the handed-over file becomes read-only"
    assert files_under(store.root / "tmp") == []


# -- pushing folders and deduplication -----------------------------------------------------------


def test_a_push_stores_each_distinct_content_once(work: Path, store: BlobStore) -> None:
    src = write(work / "src", {"a": b"same", "b/c": b"same", "d": b"other"})
    result = store.push_folder(src)
    assert result.digest == scan(src).digest
    assert store.has_manifest(result.digest)
    assert result.new_blobs == 2
    assert result.new_bytes == blob_bytes(store) == 9


@pytest.mark.parametrize(
    "with_parent",
    [
        pytest.param(False, id="without the parent manifest"),
        pytest.param(True, id="with the parent manifest (changed files hashed before copying)"),
    ],
)
def test_a_second_version_with_one_file_changed_stores_only_that_files_bytes(
    work: Path, store: BlobStore, with_parent: bool
) -> None:
    files = dataset(100, 4096)
    src = write(work / "src", files)
    v1 = store.push_folder(src)
    before = blob_bytes(store)
    assert before == 100 * 4096

    (src / "part3/f035.bin").write_bytes(b"changed" * 100)
    v2 = store.push_folder(src, parent=v1.manifest if with_parent else None)

    assert blob_bytes(store) - before == 700, "only the changed file's bytes are new"
    assert (v2.new_blobs, v2.new_bytes) == (1, 700)
    assert v1.digest != v2.digest
    assert store.manifest_digests() == sorted([v1.digest, v2.digest])
    assert files_under(store.root / "tmp") == [], "dropped copies do not linger"


def test_a_push_with_link_copies_no_bytes(work: Path, store: BlobStore) -> None:
    src = write(work / "src", dataset(20, 1000))
    result = store.push_folder(src, link=True)
    for e in result.manifest:
        assert store.blob_path(e.blake3).stat().st_ino == (src / e.path).stat().st_ino


def test_push_progress_reaches_the_totals(work: Path, store: BlobStore) -> None:
    src = write(work / "src", dataset(30, 5000))
    events: list[ProgressEvent] = []
    store.push_folder(src, on_progress=events.append)
    push = [e for e in events if e.phase == "push"]
    assert push[-1].done_bytes == push[-1].total_bytes == 30 * 5000
    assert push[-1].done_files == 30


# -- uploads -------------------------------------------------------------------------------------


def test_an_upload_lists_every_blob_not_credited_and_commits_when_all_are_in(
    work: Path, store: BlobStore
) -> None:
    store.put_stream(io.BytesIO(b"old"), sha(b"old"), 3)
    m = Manifest([Entry("old", 3, sha(b"old")), Entry("new", 3, sha(b"new"))])
    upload = store.begin(m)
    assert upload.missing() == [sha(b"new"), sha(b"old")], "a stored blob is not a present one"
    assert upload.credit([sha(b"old"), sha(b"stranger")]) == [sha(b"old")]
    assert upload.missing() == [sha(b"new")]
    assert upload.missing_bytes() == 3

    with pytest.raises(UploadIncomplete) as info:
        upload.commit()
    assert info.value.missing == (sha(b"new"),)
    assert "'new'" in str(info.value)
    assert not store.has_manifest(m.digest), "no manifest before every blob is in"

    assert upload.put(io.BytesIO(b"new"), sha(b"new")) == 3
    assert upload.commit() == m.digest
    assert store.load_manifest(m.digest) == m
    assert upload.commit() == m.digest, "commit is idempotent"
    assert store.upload_ids() == []


def _answers(store: BlobStore, files: dict[str, bytes], held: bytes) -> list[object]:
    """Everything an uploader is told while pushing *files* without sending *held*'s bytes
    in full (upload ids left out): what must not depend on whether the store holds *held*."""
    m = Manifest(Entry(p, len(d), sha(d)) for p, d in files.items())
    upload = store.begin(m)
    out: list[object] = [upload.missing(), upload.missing_bytes()]
    out.append(upload.put(io.BytesIO(held[:1000]), sha(held)))  # a partial send
    out.append([upload.offset(s) for s in upload.missing()])
    again = store.resume(upload.id)
    out.append([again.offset(s) for s in again.missing()])
    for bad in (b"\0" * len(held), held[:-1] + b"!"):
        try:
            again.put(io.BytesIO(bad), sha(held))
        except IntegrityError as e:
            out.append(str(e))
    try:
        again.put_blobs([(sha(held), b"x" * len(held))])
    except IntegrityError as e:
        out.append(str(e))
    for sha_, data in ((s, d) for d in files.values() if (s := sha(d)) != sha(held)):
        out.append(again.put(io.BytesIO(data), sha_))
    try:
        again.commit()
    except UploadIncomplete as e:
        out.append(str(e).replace(upload.id, "ID"))
    out.append(again.missing())
    return out


def test_what_an_upload_answers_does_not_depend_on_what_the_store_holds(work: Path) -> None:
    """A hash is a name, not a capability: an uploader who names a blob someone else stored
    is told exactly what they would be told if it existed nowhere."""
    secret = os.urandom(5000)
    files = {"mine.txt": b"my own bytes", "guessed.bin": secret}
    holding, empty = BlobStore(work / "holding"), BlobStore(work / "empty")
    holding.put_stream(io.BytesIO(secret), sha(secret), len(secret))
    assert _answers(holding, files, secret) == _answers(empty, files, secret)
    assert holding.verify(sha(secret)) is None, "the stored blob is untouched"


def test_a_blob_the_store_holds_is_verified_when_sent_and_stored_once(store: BlobStore) -> None:
    data = os.urandom(200_000)
    store.put_stream(io.BytesIO(data), sha(data), len(data))
    inode = store.blob_path(sha(data)).stat().st_ino
    upload = store.begin(Manifest([Entry("x", len(data), sha(data)), Entry("y", 1, sha(b"y"))]))
    with pytest.raises(IntegrityError, match="corrupt"):
        upload.put(io.BytesIO(os.urandom(len(data))), sha(data))
    with pytest.raises(UploadIncomplete):
        upload.commit()
    assert upload.put(io.BytesIO(data), sha(data)) == len(data)
    assert upload.open_part(sha(data)) is None, "a received blob needs no writer"
    assert upload.put_blobs([(sha(b"y"), b"y")]) == 1
    assert upload.commit()
    assert store.blob_path(sha(data)).stat().st_ino == inode, "the blob was not replaced"
    assert store.usage() == StoreUsage(2, len(data) + 1)
    assert list(store.tmp_dir.iterdir()) == []


def test_a_blob_with_the_wrong_size_is_missing_not_told_apart(store: BlobStore) -> None:
    data = b"abc" * 100
    store.put_stream(io.BytesIO(data), sha(data), len(data))
    upload = store.begin(Manifest([Entry("x", 17, sha(data))]))
    with pytest.raises(UploadIncomplete, match="1 of 1 blobs are not uploaded yet"):
        upload.commit()


def test_credits_are_kept_on_disk_and_seen_by_every_process(store: BlobStore) -> None:
    m = Manifest([Entry(f"f{i}", 1, sha(bytes([i]))) for i in range(3)])
    for i in range(3):
        store.put_stream(io.BytesIO(bytes([i])), sha(bytes([i])), 1)
    upload = store.begin(m)
    other = store.resume(upload.id)  # as another server process would
    upload.credit([sha(b"\0")])
    assert other.missing() == [sha(b"\1"), sha(b"\2")]
    with open(store.uploads_dir / upload.id / "credited", "ab") as f:
        f.write(sha(b"\1")[:20].encode())  # a line still being written elsewhere
    assert other.credited() == {sha(b"\0")}
    with open(store.uploads_dir / upload.id / "credited", "ab") as f:
        f.write(sha(b"\1")[20:].encode() + b"\n")
    assert store.resume(upload.id).missing() == [sha(b"\2")]
    other.put_blobs([(sha(b"\2"), b"\2")])
    assert upload.commit() == m.digest


def test_an_upload_refuses_blobs_it_does_not_list(store: BlobStore) -> None:
    upload = store.begin(Manifest([Entry("a", 1, sha(b"a"))]))
    with pytest.raises(NotFound, match="not part of upload"):
        upload.put(io.BytesIO(b"b"), sha(b"b"))


def test_a_blob_resumes_at_the_byte_where_the_stream_broke(store: BlobStore) -> None:
    data = os.urandom(300_000)
    upload = store.begin(Manifest([Entry("big", len(data), sha(data))]))
    assert upload.put(io.BytesIO(data[:100_000]), sha(data)) == 100_000
    again = store.resume(upload.id)
    assert again.offset(sha(data)) == 100_000
    assert again.missing_offsets() == [(sha(data), len(data), 100_000)]
    with pytest.raises(DatasetError, match="stands at byte 100000"):
        again.put(io.BytesIO(data[50_000:]), sha(data), offset=50_000)
    assert again.put(io.BytesIO(data[100_000:]), sha(data), offset=100_000) == len(data)
    assert again.offset(sha(data)) == len(data)
    assert again.commit()
    assert store.blob_path(sha(data)).read_bytes() == data


def test_a_resumed_blob_that_hashes_wrong_is_dropped(store: BlobStore) -> None:
    data = b"x" * 1000
    upload = store.begin(Manifest([Entry("x", 1000, sha(data))]))
    upload.put(io.BytesIO(data[:500]), sha(data))
    with pytest.raises(IntegrityError, match="upload it again"):
        upload.put(io.BytesIO(b"y" * 500), sha(data), offset=500)
    assert upload.offset(sha(data)) == 0
    assert not store.has(sha(data))


def test_two_writers_of_the_same_partial_blob_are_refused(store: BlobStore) -> None:
    data = b"z" * 10
    upload = store.begin(Manifest([Entry("z", 10, sha(data))]))

    class Reentrant:
        def __init__(self) -> None:
            self.error: Exception | None = None

        def read(self, n: int = -1) -> bytes:
            if self.error is None:
                try:
                    store.resume(upload.id).put(io.BytesIO(data), sha(data))
                except Exception as e:
                    self.error = e
                return data[:5]
            return b""

    stream = Reentrant()
    upload.put(stream, sha(data))
    assert isinstance(stream.error, Busy)


def test_a_blob_received_in_pieces_is_stored_when_its_last_piece_arrives(
    store: BlobStore,
) -> None:
    data = os.urandom(250_000)
    upload = store.begin(Manifest([Entry("big", len(data), sha(data))]))
    writer = upload.open_part(sha(data))
    assert writer is not None
    try:
        writer.write(data[:100_000])
        assert writer.finish() == 100_000 and not store.has(sha(data))
        state = writer.hasher()
    finally:
        writer.close()
    # Resumed with the hash state kept by the caller: the first piece is not read again.
    again = upload.open_part(sha(data), offset=100_000, hasher=state)
    assert again is not None
    try:
        again.write(data[100_000:])
        assert again.finish() == len(data)
    finally:
        again.close()
    assert store.blob_path(sha(data)).read_bytes() == data
    assert upload.open_part(sha(data)) is None, "a received blob needs no writer"


def test_a_resumed_piece_without_hash_state_is_verified_from_the_file(store: BlobStore) -> None:
    data = os.urandom(50_000)
    upload = store.begin(Manifest([Entry("x", len(data), sha(data))]))
    assert upload.put(io.BytesIO(data[:20_000]), sha(data)) == 20_000
    writer = upload.open_part(sha(data), offset=20_000)
    assert writer is not None
    try:
        writer.write(b"\0" * 30_000)
        with pytest.raises(IntegrityError, match="upload it again"):
            writer.finish()
    finally:
        writer.close()
    assert upload.offset(sha(data)) == 0 and not store.has(sha(data))


def test_a_piece_past_the_blobs_size_drops_the_part(store: BlobStore) -> None:
    data = b"abc" * 100
    upload = store.begin(Manifest([Entry("x", len(data), sha(data))]))
    writer = upload.open_part(sha(data))
    assert writer is not None
    try:
        with pytest.raises(IntegrityError, match="more than its 300 bytes"):
            writer.write(data + b"!")
    finally:
        writer.close()
    assert upload.offset(sha(data)) == 0


def test_small_blobs_are_stored_in_one_batch_and_a_bad_one_stores_nothing(
    store: BlobStore,
) -> None:
    files = {f"f{i}": os.urandom(100 + i) for i in range(20)}
    upload = store.begin(Manifest(Entry(p, len(d), sha(d)) for p, d in files.items()))
    items = [(sha(d), d) for d in files.values()]
    bad = [*items[:5], (items[5][0], b"x" * len(items[5][1]))]
    with pytest.raises(IntegrityError, match="corrupt"):
        upload.put_blobs(bad)
    assert not any(store.has(s) for s, _ in items), "nothing of a bad batch is stored"
    assert upload.put_blobs(items[:10]) == 10
    assert upload.put_blobs(items) == 10, "blobs already received are skipped"
    for s, data in items:
        assert store.blob_path(s).read_bytes() == data
        assert stat.S_IMODE(store.blob_path(s).stat().st_mode) == 0o444
    with pytest.raises(NotFound, match="not part of upload"):
        upload.put_blobs([(sha(b"other"), b"other")])
    assert upload.commit()
    assert list(store.tmp_dir.iterdir()) == []


def test_begin_with_the_same_id_resumes_and_with_another_manifest_conflicts(
    store: BlobStore,
) -> None:
    m1 = Manifest([Entry("a", 1, sha(b"a"))])
    upload = store.begin(m1)
    assert store.begin(m1, upload_id=upload.id).id == upload.id
    with pytest.raises(DatasetError, match="is for manifest") as info:
        store.begin(Manifest([Entry("b", 1, sha(b"b"))]), upload_id=upload.id)
    assert info.value.reason == "conflict"


def test_abort_drops_the_upload_and_its_parts(store: BlobStore) -> None:
    upload = store.begin(Manifest([Entry("a", 4, sha(b"abcd"))]))
    upload.put(io.BytesIO(b"ab"), sha(b"abcd"))
    upload.abort()
    assert store.upload_ids() == []
    with pytest.raises(NotFound):
        store.resume(upload.id)
    with pytest.raises(NotFound):
        upload.commit()


def test_a_file_over_the_limit_is_refused_at_begin(work: Path) -> None:
    store = BlobStore(work / "store", max_blob_bytes=10)
    with pytest.raises(UnsafePath, match="'big' is 11 bytes"):
        store.begin(Manifest([Entry("big", 11, sha(b"x" * 11))]))


# -- a push killed halfway -----------------------------------------------------------------------

KILLED_PUSH = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nsml_datasets import BlobStore, scan

    store, folder = BlobStore(sys.argv[1]), Path(sys.argv[2])
    manifest = scan(folder)
    upload = store.begin(manifest)
    print(upload.id, flush=True)
    entries = list(manifest)
    for e in entries[:5]:
        upload.put_file(folder / e.path, e.blake3)
    data = (folder / entries[5].path).read_bytes()

    class Stalled:
        sent = False

        def read(self, n=-1):
            if not self.sent:
                self.sent = True
                return data[: len(data) // 2]
            print("HALF", flush=True)
            time.sleep(60)
            return b""

    upload.put(Stalled(), entries[5].blake3)
    """
)


def kill_push_halfway(store: BlobStore, folder: Path) -> str:
    """Run a push in another process and SIGKILL it in the middle of a blob; its upload id."""
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUSH, str(store.root), str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        upload_id = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "HALF"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return upload_id


def test_a_killed_push_leaves_no_version_and_gc_leaves_no_orphan(
    work: Path, store: BlobStore
) -> None:
    folder = write(work / "src", dataset(10, 50_000))
    upload_id = kill_push_halfway(store, folder)

    assert store.manifest_digests() == [], "no version is visible"
    assert store.upload_ids() == [upload_id]
    assert store.usage().blobs == 5, "five blobs made it before the kill"

    kept = store.gc([], older_than=3600)
    assert (kept.uploads_removed, kept.blobs_removed) == (0, 0), "a recent upload may still resume"

    report = store.gc([], older_than=3600, now=time.time() + 7200)
    assert report.uploads_removed == 1
    assert report.blobs_removed == 5
    assert report.bytes_freed == 5 * 50_000
    assert files_under(store.root) == [], "no orphaned file anywhere in the store"


def test_a_killed_push_resumes_with_the_same_upload_id(work: Path, store: BlobStore) -> None:
    folder = write(work / "src", dataset(10, 50_000))
    upload_id = kill_push_halfway(store, folder)

    upload = store.resume(upload_id)
    entries = list(upload.manifest)
    assert upload.missing() == [e.blake3 for e in entries[5:]]
    assert upload.offset(entries[5].blake3) == 25_000, "half of the sixth blob survived"

    data = (folder / entries[5].path).read_bytes()
    upload.put(io.BytesIO(data[25_000:]), entries[5].blake3, offset=25_000)
    for e in entries[6:]:
        upload.put_file(folder / e.path, e.blake3)
    digest = upload.commit()

    assert digest == scan(folder).digest
    store.materialize(digest, work / "out")
    assert tree(work / "out") == tree(folder)
    assert store.gc([digest], older_than=0).blobs_removed == 0


KILLED_LOCAL_PUSH = textwrap.dedent(
    """
    import sys, time
    from nsml_datasets import BlobStore

    def stall(event):
        if event.phase == "push" and event.done_files >= 5:
            print("HALF", flush=True)
            time.sleep(60)

    BlobStore(sys.argv[1]).push_folder(sys.argv[2], on_progress=stall, workers=2)
    """
)


def test_a_local_push_killed_halfway_leaves_nothing_after_gc(work: Path, store: BlobStore) -> None:
    folder = write(work / "src", dataset(40, 20_000))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_LOCAL_PUSH, str(store.root), str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "HALF"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert store.manifest_digests() == []
    assert store.usage().blobs == 0, "new blobs wait in tmp/ until the whole folder is read"
    store.gc([], older_than=3600, now=time.time() + 7200)
    assert files_under(store.root) == []


# -- gc ------------------------------------------------------------------------------------------


def test_gc_keeps_live_versions_and_removes_unreferenced_blobs(
    work: Path, store: BlobStore
) -> None:
    v1 = store.push_folder(write(work / "v1", {"shared": b"s", "only1": b"1"}))
    v2 = store.push_folder(write(work / "v2", {"shared": b"s", "only2": b"2"}))
    later = time.time() + 10

    report = store.gc([v2.digest], older_than=1, now=later)

    assert (report.manifests_removed, report.blobs_removed, report.bytes_freed) == (1, 1, 1)
    assert store.manifest_digests() == [v2.digest]
    assert store.has(sha(b"s")) and store.has(sha(b"2")) and not store.has(sha(b"1"))
    assert report.missing_live == ()
    store.materialize(v2.digest, work / "out")
    with pytest.raises(NotFound):
        store.load_manifest(v1.digest)


def test_gc_keeps_young_blobs_and_reports_live_versions_it_lacks(
    work: Path, store: BlobStore
) -> None:
    store.put_stream(io.BytesIO(b"fresh"), sha(b"fresh"), 5)
    report = store.gc(["0" * 64], older_than=3600)
    assert report.blobs_removed == 0, "a blob written within the grace period may belong to a push"
    assert report.missing_live == ("0" * 64,)


def test_a_blob_linked_from_an_old_file_is_young_for_gc(work: Path, store: BlobStore) -> None:
    src = work / "old"
    src.write_bytes(b"from last year")
    os.utime(src, (time.time() - 365 * 86400, time.time() - 365 * 86400))
    store.put_file(src, sha(b"from last year"), link=True)
    assert store.gc([], older_than=3600).blobs_removed == 0
    assert store.gc([], older_than=3600, now=time.time() + 7200).blobs_removed == 1


# -- materialize and download --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["copy", "hardlink"])
def test_materialize_rebuilds_the_folder_read_only(work: Path, store: BlobStore, mode: str) -> None:
    src = write(
        work / "src", {"a.txt": b"a", "dup.txt": b"a", "sub/run.sh": b"#!/bin/sh\n", "e": b""}
    )
    (src / "sub/run.sh").chmod(0o755)
    digest = store.push_folder(src).digest

    out = store.materialize(digest, work / "out", mode=mode)  # type: ignore[arg-type]

    assert tree(out) == tree(src)
    assert stat.S_IMODE((out / "a.txt").stat().st_mode) == 0o444
    assert stat.S_IMODE((out / "sub/run.sh").stat().st_mode) == 0o555
    linked = (out / "a.txt").stat().st_ino == store.blob_path(sha(b"a")).stat().st_ino
    assert linked == (mode == "hardlink")
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []


def test_materialize_can_make_writable_copies(work: Path, store: BlobStore) -> None:
    digest = store.push_folder(write(work / "src", {"a": b"a"})).digest
    out = store.materialize(digest, work / "out", readonly=False)
    assert stat.S_IMODE((out / "a").stat().st_mode) == 0o644
    with pytest.raises(DatasetError, match="hardlink mode always gives read-only files"):
        store.materialize(digest, work / "out2", mode="hardlink", readonly=False)


def corrupt(store: BlobStore, blob_sha: str) -> None:
    path = store.blob_path(blob_sha)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mode", ["copy", "hardlink"])
def test_a_corrupted_blob_is_detected_and_nothing_is_left_at_the_destination(
    work: Path, store: BlobStore, mode: str
) -> None:
    src = write(work / "src", dataset(20, 1000))
    result = store.push_folder(src)
    victim = result.manifest.entries[7]
    corrupt(store, victim.blake3)

    with pytest.raises(IntegrityError) as info:
        store.materialize(result.digest, work / "out", mode=mode)  # type: ignore[arg-type]

    assert victim.blake3 in str(info.value)
    assert repr(victim.path) in str(info.value)
    assert not (work / "out").exists()
    assert sorted(p.name for p in work.iterdir()) == ["src", "store"], "no partial folder left"
    with pytest.raises(IntegrityError):
        store.verify(victim.blake3)


def test_materialize_refuses_a_destination_that_is_not_empty(work: Path, store: BlobStore) -> None:
    digest = store.push_folder(write(work / "src", {"a": b"a"})).digest
    (work / "out").mkdir()
    (work / "out" / "mine").write_bytes(b"keep")
    with pytest.raises(DatasetError, match="already exists"):
        store.materialize(digest, work / "out")
    assert (work / "out" / "mine").read_bytes() == b"keep"
    (work / "empty").mkdir()
    store.materialize(digest, work / "empty")
    assert tree(work / "empty") == {"a": b"a"}


def test_materialize_reports_a_missing_blob(work: Path, store: BlobStore) -> None:
    m = Manifest([Entry("ghost", 5, sha(b"ghost"))])
    with pytest.raises(NotFound, match="'ghost'"):
        store.materialize(m, work / "out")
    assert not (work / "out").exists()


def test_download_fetches_each_content_once_and_verifies_it(work: Path, store: BlobStore) -> None:
    src = write(work / "src", {"a": b"same", "b": b"same", "c": b"other"})
    m = store.push_folder(src).manifest
    calls: list[str] = []

    def fetch(blob: str) -> io.BytesIO:
        calls.append(blob)
        return io.BytesIO(store.blob_path(blob).read_bytes())

    out = download(m, work / "pulled", fetch)
    assert tree(out) == tree(src)
    assert sorted(calls) == sorted({sha(b"same"), sha(b"other")})
    assert stat.S_IMODE((out / "a").stat().st_mode) == 0o644, "a pull is the user's own copy"

    def tampered(blob: str) -> io.BytesIO:
        return io.BytesIO(b"evil" if blob == sha(b"other") else store.blob_path(blob).read_bytes())

    with pytest.raises(IntegrityError, match="download of blob"):
        download(m, work / "pulled2", tampered)
    assert not (work / "pulled2").exists()


def test_a_store_written_with_another_hash_is_refused_with_what_to_do(work: Path) -> None:
    old = work / "old-store"
    (old / "blobs" / "ab").mkdir(parents=True)
    (old / "blobs" / "ab" / ("c" * 62)).write_bytes(b"x")
    with pytest.raises(DatasetError, match="new, empty store folder") as e:
        BlobStore(old)
    assert e.value.reason == "store-format"
    assert not (old / "FORMAT").exists() and not (old / "tmp").exists(), "nothing written"
    BlobStore(work / "fresh")
    assert (work / "fresh" / "FORMAT").read_text() == "nsml-blob-store/2 blake3\n"
    BlobStore(work / "fresh")  # a store in the current format opens again

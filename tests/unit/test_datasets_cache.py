"""The node cache, as a specification: LRU under a budget, in-use never evicted, restarts, once."""

from __future__ import annotations

import io
import random
import stat
import threading
import time
from collections import Counter
from pathlib import Path

import blake3
import pytest

from nsml_datasets import (
    BlobStore,
    CacheFull,
    DatasetError,
    Entry,
    IntegrityError,
    InUse,
    Manifest,
    NodeCache,
    NotFound,
)


@pytest.fixture()
def store(work: Path) -> BlobStore:
    return BlobStore(work / "store", durable=False)


class Clock:
    """An injected clock that moves only when told."""

    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t

    def tick(self, seconds: float = 1.0) -> None:
        self.t += seconds


def content(tag: str, size: int) -> bytes:
    return (f"<{tag}>".encode() * (size // 3 + 2))[:size]


def version(store: BlobStore, tag: str, size: int, files: int = 1) -> Manifest:
    """A manifest of *files* files of distinct content, *size* bytes in all, stored in *store*."""
    entries = []
    for i in range(files):
        data = content(f"{tag}/{i}", size // files)
        digest = blake3.blake3(data).hexdigest()
        store.put_stream(io.BytesIO(data), digest, len(data))
        entries.append(Entry(f"f{i}.bin", len(data), digest))
    return Manifest(entries)


def cache_of(
    work: Path, store: BlobStore | None, budget: int, clock: Clock, **kw: object
) -> NodeCache:
    return NodeCache(work / "cache", budget, store=store, now=clock, **kw)  # type: ignore[arg-type]


# -- eviction order ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uses", "held", "new_size", "evicted"),
    [
        pytest.param([], [], 100, ["a"], id="the least recently used entry goes first"),
        pytest.param(["a"], [], 100, ["b"], id="a cache hit makes an entry recent again"),
        pytest.param(["b", "a"], [], 100, ["c"], id="order follows the latest use"),
        pytest.param([], ["a"], 100, ["b"], id="an entry in use is skipped"),
        pytest.param([], ["a", "b"], 100, ["c"], id="only entries nobody holds are evicted"),
        pytest.param([], [], 250, ["a", "b", "c"], id="a large dataset evicts as many as it needs"),
        pytest.param(["a"], [], 150, ["b", "c"], id="and stops as soon as it fits"),
    ],
)
def test_eviction_order(
    work: Path,
    store: BlobStore,
    uses: list[str],
    held: list[str],
    new_size: int,
    evicted: list[str],
) -> None:
    clock = Clock()
    cache = cache_of(work, store, 300, clock)
    versions = {k: version(store, k, 100) for k in "abc"}
    for k in "abc":
        clock.tick()
        cache.ensure(f"{k}@1", versions[k])
    for k in uses:
        clock.tick()
        cache.ensure(f"{k}@1", versions[k])
    for k in held:
        cache.acquire(f"{k}@1", "kim/mnist/1")

    clock.tick()
    cache.ensure("d@1", version(store, "d", new_size))

    assert sorted(set("abc") - {k[0] for k in cache.present()}) == evicted
    assert not any((work / "cache" / "entries" / f"{k}@1").exists() for k in evicted)
    assert cache.used_bytes <= 300


def test_evict_makes_room_on_demand_and_reports_what_went(work: Path, store: BlobStore) -> None:
    clock = Clock()
    cache = cache_of(work, store, 300, clock)
    for k in "abc":
        clock.tick()
        cache.ensure(f"{k}@1", version(store, k, 100))
    assert cache.evict() == [], "within budget nothing goes"
    assert cache.evict(needed_bytes=150) == ["a@1", "b@1"]
    assert cache.present() == {"c@1": 100}


def test_a_release_counts_as_a_use(work: Path, store: BlobStore) -> None:
    clock = Clock()
    cache = cache_of(work, store, 200, clock)
    a, b = version(store, "a", 100), version(store, "b", 100)
    cache.ensure("a@1", a, holder="s/1")
    clock.tick()
    cache.ensure("b@1", b)
    clock.tick()
    cache.release("a@1", "s/1")
    assert cache.evict(needed_bytes=100) == ["b@1"]


def test_an_entry_in_use_is_never_evicted_even_when_that_means_refusing(
    work: Path, store: BlobStore
) -> None:
    clock = Clock()
    cache = cache_of(work, store, 200, clock)
    cache.ensure("a@1", version(store, "a", 100), holder="kim/a/1")
    cache.ensure("b@1", version(store, "b", 100), holder="lee/b/2")

    with pytest.raises(CacheFull) as info:
        cache.ensure("c@1", version(store, "c", 100))

    assert info.value.reason == "in-use", "it fits once a session ends: retry later"
    assert "kim/a/1" in str(info.value) and "lee/b/2" in str(info.value)
    assert cache.present() == {"a@1": 100, "b@1": 100}
    assert cache.used_bytes == 200, "a refused ensure reserves nothing"

    cache.release_holder("kim/a/1")
    cache.ensure("c@1", version(store, "c", 100))
    assert cache.present() == {"b@1": 100, "c@1": 100}


def test_a_dataset_larger_than_the_budget_can_never_fit(work: Path, store: BlobStore) -> None:
    cache = cache_of(work, store, 100, Clock())
    with pytest.raises(CacheFull) as info:
        cache.ensure("huge@1", version(store, "huge", 101))
    assert info.value.reason == "larger-than-budget"
    assert "can never be cached here" in str(info.value)


def test_the_budget_is_respected_through_any_sequence_of_operations(
    work: Path, store: BlobStore
) -> None:
    rng = random.Random(7)
    clock = Clock()
    cache = cache_of(work, store, 1000, clock)
    versions = {f"d{i}@1": version(store, f"d{i}", rng.randrange(50, 400)) for i in range(12)}
    for step in range(150):
        clock.tick()
        key = rng.choice(sorted(versions))
        op = rng.random()
        try:
            if op < 0.6:
                cache.ensure(key, versions[key], holder=f"s/{step}" if rng.random() < 0.3 else None)
            elif op < 0.8:
                for k, holders in ((e.key, e.holders) for e in cache.entries()):
                    for h in holders:
                        cache.release(k, h)
            else:
                cache.evict(rng.randrange(0, 500))
        except CacheFull:
            pass
        assert sum(cache.present().values()) <= 1000
        assert cache.used_bytes <= 1000
        assert sorted(p.name for p in (work / "cache" / "entries").iterdir()) == sorted(
            cache.present()
        )


# -- use and release -----------------------------------------------------------------------------


def test_release_is_idempotent_and_acquire_needs_a_cached_key(work: Path, store: BlobStore) -> None:
    cache = cache_of(work, store, 1000, Clock())
    cache.ensure("a@1", version(store, "a", 10))
    cache.acquire("a@1", "s/1")
    cache.acquire("a@1", "s/2")
    assert cache.holders("a@1") == {"s/1", "s/2"}
    cache.release("a@1", "s/1")
    cache.release("a@1", "s/1")
    cache.release("never@1", "s/1")
    assert cache.holders("a@1") == {"s/2"}
    assert cache.release_holder("s/2") == ["a@1"]
    assert cache.release_holder("s/2") == []
    with pytest.raises(NotFound, match="ensure it first"):
        cache.acquire("b@1", "s/1")


def test_remove_refuses_an_entry_in_use(work: Path, store: BlobStore) -> None:
    cache = cache_of(work, store, 1000, Clock())
    cache.ensure("a@1", version(store, "a", 10), holder="kim/a/3")
    with pytest.raises(InUse, match="kim/a/3"):
        cache.remove("a@1")
    cache.release("a@1", "kim/a/3")
    assert cache.remove("a@1") is True
    assert cache.remove("a@1") is False
    assert cache.present() == {}


def test_a_key_never_changes_its_manifest(work: Path, store: BlobStore) -> None:
    cache = cache_of(work, store, 1000, Clock())
    cache.ensure("a@1", version(store, "a", 10))
    with pytest.raises(DatasetError) as info:
        cache.ensure("a@1", version(store, "other", 10))
    assert info.value.reason == "conflict"


# -- sources -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "shared"), [("hardlink", True), ("copy", False)])
def test_files_come_from_the_local_store_read_only(
    work: Path, store: BlobStore, mode: str, shared: bool
) -> None:
    m = version(store, "a", 3000, files=3)
    cache = cache_of(work, store, 10_000, Clock(), mode=mode)
    path = cache.ensure("a@1", m)
    assert path == cache.path("a@1") == work / "cache" / "entries" / "a@1" / "data"
    for e in m:
        f = path / e.path
        assert f.read_bytes() == store.blob_path(e.blake3).read_bytes()
        assert stat.S_IMODE(f.stat().st_mode) == 0o444
        assert (f.stat().st_ino == store.blob_path(e.blake3).stat().st_ino) == shared


def fetch_from(store: BlobStore, calls: Counter[str], *, corrupt: str = "", delay: float = 0.0):  # type: ignore[no-untyped-def]
    def fetch(blob: str) -> io.BytesIO:
        calls[blob] += 1
        if delay:
            time.sleep(delay)
        data = store.blob_path(blob).read_bytes()
        return io.BytesIO(b"tampered" if blob == corrupt else data)

    return fetch


def test_a_remote_node_downloads_each_blob_once_and_reuses_other_versions(
    work: Path, store: BlobStore
) -> None:
    v1 = version(store, "v", 4000, files=4)
    changed = version(store, "changed", 1000)
    v2 = Manifest([*v1.entries[:3], Entry(v1.entries[3].path, 1000, changed.entries[0].blake3)])
    calls: Counter[str] = Counter()
    cache = NodeCache(work / "cache", 100_000, fetch_from(store, calls), now=Clock())

    cache.ensure("v@1", v1)
    assert set(calls) == {e.blake3 for e in v1} and set(calls.values()) == {1}

    calls.clear()
    path = cache.ensure("v@2", v2)
    assert list(calls) == [changed.entries[0].blake3], "unchanged files come from v@1"
    assert (path / "f3.bin").read_bytes() == store.blob_path(changed.entries[0].blake3).read_bytes()


def test_a_download_that_does_not_match_its_hash_caches_nothing(
    work: Path, store: BlobStore
) -> None:
    m = version(store, "a", 3000, files=3)
    calls: Counter[str] = Counter()
    cache = NodeCache(
        work / "cache", 100_000, fetch_from(store, calls, corrupt=m.entries[1].blake3)
    )
    with pytest.raises(IntegrityError, match=m.entries[1].blake3):
        cache.ensure("a@1", m)
    assert cache.present() == {}
    assert cache.used_bytes == 0, "the reservation is released"
    assert list((work / "cache" / "tmp").iterdir()) == []
    assert list((work / "cache" / "entries").iterdir()) == []


def test_a_blob_in_no_source_is_reported(work: Path) -> None:
    cache = NodeCache(work / "cache", 1000)
    with pytest.raises(NotFound, match="not available"):
        cache.ensure("a@1", Manifest([Entry("x", 1, "0" * 64)]))


# -- concurrency ---------------------------------------------------------------------------------


def test_concurrent_ensures_of_one_key_do_the_work_once(work: Path, store: BlobStore) -> None:
    m = version(store, "a", 8000, files=8)
    calls: Counter[str] = Counter()
    cache = NodeCache(work / "cache", 100_000, fetch_from(store, calls, delay=0.02))
    start = threading.Barrier(8)
    paths: list[Path] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        start.wait()
        try:
            paths.append(cache.ensure("a@1", m, holder=f"s/{i}"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert errors == []
    assert set(calls.values()) == {1} and len(calls) == 8, "every blob fetched exactly once"
    assert len(set(paths)) == 1 and len(paths) == 8
    assert cache.holders("a@1") == {f"s/{i}" for i in range(8)}


def test_concurrent_ensures_of_different_keys_share_the_budget(
    work: Path, store: BlobStore
) -> None:
    versions = {f"k{i}@1": version(store, f"k{i}", 400) for i in range(6)}
    cache = NodeCache(work / "cache", 1000, fetch_from(store, Counter(), delay=0.01))
    full: list[str] = []

    def worker(key: str) -> None:
        try:
            cache.ensure(key, versions[key], holder="s/1")
        except CacheFull:
            full.append(key)

    threads = [threading.Thread(target=worker, args=(k,)) for k in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(cache.present()) == 2 and len(full) == 4, "two of 400 bytes fit in 1000, held"
    assert cache.used_bytes == 800


# -- restarts ------------------------------------------------------------------------------------


def test_a_restart_keeps_the_index_holders_and_lru_order(work: Path, store: BlobStore) -> None:
    clock = Clock()
    cache = cache_of(work, store, 300, clock)
    for k in "abc":
        clock.tick()
        cache.ensure(f"{k}@1", version(store, k, 100))
    cache.acquire("a@1", "kim/a/1")
    clock.tick()
    cache.ensure("b@1", version(store, "b", 100))

    again = cache_of(work, store, 300, clock)

    assert again.present() == {"a@1": 100, "b@1": 100, "c@1": 100}
    assert again.holders("a@1") == {"kim/a/1"}
    assert again.evict(needed_bytes=100) == ["c@1"]


def test_a_restart_drops_torn_entries_and_leftovers(work: Path, store: BlobStore) -> None:
    clock = Clock()
    cache = cache_of(work, store, 10_000, clock, mode="copy")
    cache.ensure("a@1", version(store, "a", 300, files=3))
    cache.ensure("b@1", version(store, "b", 300, files=3))
    torn = cache.path("a@1") / "f1.bin"
    torn.chmod(0o644)
    torn.write_bytes(b"short")
    (work / "cache" / "tmp" / "build-x@1-123").mkdir()
    (work / "cache" / "entries" / "stray@9").mkdir()

    again = cache_of(work, store, 10_000, clock)

    assert again.present() == {"b@1": 300}
    assert sorted(p.name for p in (work / "cache" / "entries").iterdir()) == ["b@1"]
    assert list((work / "cache" / "tmp").iterdir()) == []


def test_an_unreadable_index_starts_an_empty_cache(work: Path, store: BlobStore) -> None:
    cache = cache_of(work, store, 1000, Clock())
    cache.ensure("a@1", version(store, "a", 10))
    (work / "cache" / "index.json").write_text("{not json")
    again = cache_of(work, store, 1000, Clock())
    assert again.present() == {}
    assert list((work / "cache" / "entries").iterdir()) == []


@pytest.mark.parametrize("budget", [-1, 1.5, True])
def test_a_bad_budget_is_refused(work: Path, budget: object) -> None:
    with pytest.raises(DatasetError, match="invalid cache budget"):
        NodeCache(work / "cache", budget)  # type: ignore[arg-type]

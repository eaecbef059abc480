"""A node's dataset cache: versions materialized for sessions, evicted LRU under a byte budget.

When the scheduler places a session on a node, the node's agent calls
:meth:`NodeCache.ensure` for each dataset of the session (``NAME@k`` as the key, the version's
manifest); the returned folder is bind-mounted read-only into the container. Files come, in
order of preference, from the local :class:`~nsml_datasets.store.BlobStore` (hard links: no
bytes copied, or copies), from another cached version that shares them (hard links), or from
``fetch(sha)`` — the server's blob endpoint for a remote node — hashed and checked before use.

What the cache promises:

- **Locality**: :meth:`present` maps each cached key to its bytes; the agent reports it in its
  heartbeat and the scheduler scores nodes by it.
- **Budget**: the sum of the cached versions' sizes (their logical bytes, counted whole even
  when hard links share them with the store or with each other) plus those being built never
  exceeds ``budget_bytes``.
- **In use is never evicted**: :meth:`acquire` (or ``ensure(..., holder=...)``) marks a key as
  held by a session, :meth:`release` / :meth:`release_holder` (idempotent) end that. Only
  entries nobody holds are evicted, least recently used first (``ensure`` hits, acquires and
  releases count as uses; the clock is injected as ``now``).
- **Once**: concurrent ``ensure`` calls for the same key build it once; the others wait for it.
- **Restarts**: the index (``index.json``, written atomically) survives the agent; on start,
  entries whose folder is missing or whose file sizes do not match their manifest are dropped,
  and half-built folders are removed. Holders survive too: the server releases the sessions
  that ended while the agent was down with :meth:`release_holder`.

A hidden test split is just another manifest stored apart: cache it under its own key (by
convention ``NAME@k+test``, see :mod:`~nsml_datasets.names`); the server decides which keys are
mounted into which container, and never mounts a test split into a user's session.

One process owns a cache root (the node agent); threads within it may call every method.

Layout under ``root``: ``index.json``, ``entries/<key>/data/`` (the mount source),
``entries/<key>/manifest.json``, ``tmp/`` (builds in progress and evicted folders being removed).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from ._work import atomic_write, log, remove_tree, tmp_name
from .errors import CacheFull, DatasetError, InUse, NotFound
from .manifest import Manifest, validate_digest
from .materialize import Fetch, Mode, build_tree, check_mode
from .names import validate_key
from .progress import ProgressCallback
from .store import BlobStore

INDEX_FORMAT = "nsml-node-cache/1"
"""The ``format`` field of ``index.json``."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached version, as :meth:`NodeCache.entries` reports it.

    Attributes:
        key: the cache key (``NAME@k``).
        digest: its manifest digest.
        bytes: its logical size (what it counts against the budget).
        files: its number of files.
        last_used: time of the last ``ensure`` hit, acquire or release (seconds since the epoch).
        holders: the sessions holding it; non-empty means it cannot be evicted.
        path: the folder to mount read-only.
    """

    key: str
    digest: str
    bytes: int
    files: int
    last_used: float
    holders: frozenset[str]
    path: Path


@dataclass(slots=True)
class _Record:
    digest: str
    bytes: int
    files: int
    last_used: float
    seq: int
    holders: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Job:
    digest: str
    bytes: int
    future: Future[None]


def _validate_holder(holder: object) -> str:
    if not isinstance(holder, str) or not holder or len(holder) > 256:
        raise DatasetError(
            f"invalid holder {holder!r}: expected a non-empty session id such as 'kim/mnist/12'",
            reason="bad-holder",
        )
    return holder


class NodeCache:
    """The dataset cache of one node (see the module docstring).

    Args:
        root: the cache folder; created when missing.
        budget_bytes: most bytes of datasets kept, in bytes (logical sizes).
        fetch: ``fetch(sha) -> readable stream`` for blobs absent from *store*; every fetched
            blob is hashed and checked. ``None``: local sources only.
        store: the node's local blob store (the server's own store on its node).
        mode: ``"hardlink"`` (default: files share inodes with the store and with other cached
            versions; falls back to copies across filesystems) or ``"copy"``.
        verify_local: re-hash blobs taken from the local store or from other cached versions
            (they were verified when written; downloads are always verified).
        now: the clock, seconds since the epoch (LRU order and ``last_used``).
        workers: threads for building, default one per core (2..8).
        check_on_start: compare the sizes of every cached file with its manifest on start.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        budget_bytes: int,
        fetch: Fetch | None = None,
        *,
        store: BlobStore | None = None,
        mode: Mode = "hardlink",
        verify_local: bool = False,
        now: Callable[[], float] = time.time,
        workers: int | None = None,
        check_on_start: bool = True,
    ) -> None:
        self.root = Path(root).absolute()
        self.budget_bytes = budget_bytes
        self.fetch = fetch
        self.store = store
        self.mode = check_mode(mode)
        self.verify_local = verify_local
        self.now = now
        self.workers = workers
        self.entries_dir = self.root / "entries"
        self.tmp_dir = self.root / "tmp"
        self.index_path = self.root / "index.json"
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._jobs: dict[str, _Job] = {}
        self._seq = 0
        for d in (self.entries_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._load(check_on_start)

    def __repr__(self) -> str:
        return f"NodeCache({os.fspath(self.root)!r}, budget_bytes={self.budget_bytes})"

    @property
    def budget_bytes(self) -> int:
        """The byte budget; lowering it evicts nothing until the next :meth:`evict` or ensure."""
        return self._budget

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DatasetError(
                f"invalid cache budget {value!r}: expected a number of bytes >= 0 "
                "(e.g. 500 * 2**30)",
                reason="bad-budget",
            )
        self._budget = value

    # -- queries -------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """The folder of a cached key (the mount source).

        Raises:
            NotFound: *key* is not cached.
        """
        with self._lock:
            if validate_key(key) not in self._records:
                raise NotFound(f"{key} is not cached on this node")
        return self._data(key)

    def present(self) -> dict[str, int]:
        """Cached keys and their bytes: what the scheduler counts as locality."""
        with self._lock:
            return {k: r.bytes for k, r in sorted(self._records.items())}

    def entries(self) -> list[CacheEntry]:
        """Every cached version, sorted by key."""
        with self._lock:
            return [
                CacheEntry(
                    k, r.digest, r.bytes, r.files, r.last_used, frozenset(r.holders), self._data(k)
                )
                for k, r in sorted(self._records.items())
            ]

    def holders(self, key: str) -> frozenset[str]:
        """The sessions holding *key* (empty when not held or not cached)."""
        with self._lock:
            rec = self._records.get(key)
            return frozenset(rec.holders) if rec is not None else frozenset()

    @property
    def used_bytes(self) -> int:
        """Bytes of cached versions plus those being built."""
        with self._lock:
            return self._used()

    # -- ensure --------------------------------------------------------------------------------

    def ensure(
        self,
        key: str,
        manifest: Manifest,
        *,
        holder: str | None = None,
        on_progress: ProgressCallback | None = None,
        fetch: Fetch | None = None,
    ) -> Path:
        """Make *key* present with *manifest*'s files and return its folder.

        A hit only records the use. A miss makes room (evicting least recently used entries
        nobody holds), then builds the folder from the local store, from other cached versions
        or through ``fetch``. With *holder* the key is acquired for that session atomically
        with the lookup, so it cannot be evicted between the two. *fetch* replaces the cache's
        own ``fetch`` for this call (e.g. one that downloads from this version's URL).

        Raises:
            CacheFull: ``reason="larger-than-budget"`` (never fits on this node) or
                ``"in-use"`` (fits once sessions release what they hold).
            IntegrityError: a fetched blob does not match its hash.
            NotFound: a blob is in no source.
            DatasetError: *key* is cached with another manifest (``reason="conflict"``).
        """
        validate_key(key)
        if holder is not None:
            _validate_holder(holder)
        while True:
            trash: list[Path] = []
            with self._lock:
                rec = self._records.get(key)
                if rec is not None:
                    self._check_digest(key, rec.digest, manifest)
                    self._touch(rec)
                    if holder is not None:
                        rec.holders.add(holder)
                    # A use alone need not survive a power loss; a holder must.
                    self._save(durable=holder is not None)
                    return self._data(key)
                job = self._jobs.get(key)
                mine = job is None
                if job is None:
                    _, trash = self._make_room(manifest.total_bytes, key)
                    job = _Job(manifest.digest, manifest.total_bytes, Future())
                    self._jobs[key] = job
                else:
                    self._check_digest(key, job.digest, manifest)
            self._empty(trash)
            if not mine:
                job.future.result()
                continue
            try:
                self._build(key, manifest, on_progress, fetch or self.fetch)
            except BaseException as e:
                with self._lock:
                    del self._jobs[key]
                job.future.set_exception(e)
                raise
            with self._lock:
                self._seq += 1
                self._records[key] = _Record(
                    digest=manifest.digest,
                    bytes=manifest.total_bytes,
                    files=manifest.file_count,
                    last_used=self.now(),
                    seq=self._seq,
                    holders={holder} if holder is not None else set(),
                )
                del self._jobs[key]
                self._save()
            job.future.set_result(None)
            log.info(
                "cached %s (%d files, %d bytes) at %s",
                key,
                manifest.file_count,
                manifest.total_bytes,
                self._data(key),
            )
            return self._data(key)

    def _check_digest(self, key: str, digest: str, manifest: Manifest) -> None:
        if digest != manifest.digest:
            raise DatasetError(
                f"{key} is cached with manifest {digest}, not {manifest.digest}: a version never "
                "changes; remove the cached entry first if the server's records changed",
                reason="conflict",
            )

    def _build(
        self,
        key: str,
        manifest: Manifest,
        on_progress: ProgressCallback | None,
        fetch: Fetch | None,
    ) -> None:
        work = tmp_name(self.tmp_dir, f"build-{key}-")
        work.mkdir()
        try:
            build_tree(
                manifest,
                work / "data",
                locate=self._locator(key),
                fetch=fetch,
                mode=self.mode,
                verify=self.verify_local,
                readonly=True,
                on_progress=on_progress,
                workers=self.workers,
            )
            atomic_write(work / "manifest.json", manifest.to_json(), durable=False)
            final = self.entries_dir / key
            remove_tree(final)
            os.rename(work, final)
        except BaseException:
            remove_tree(work)
            raise

    def _locator(self, key: str) -> Callable[[str], Iterator[str]]:
        """Local sources of a blob: the store, then other cached versions (loaded on first need)."""
        with self._lock:
            others = [k for k in self._records if k != key]
        shared: dict[str, str] | None = None
        lock = threading.Lock()

        def from_others() -> dict[str, str]:
            nonlocal shared
            with lock:
                if shared is None:
                    shared = {}
                    for k in others:
                        try:
                            m = Manifest.from_json(
                                (self.entries_dir / k / "manifest.json").read_bytes()
                            )
                        except (OSError, DatasetError):
                            continue
                        data = os.fspath(self._data(k))
                        for e in m:
                            shared.setdefault(e.blake3, f"{data}/{e.path}")
                return shared

        def locate(sha: str) -> Iterator[str]:
            if self.store is not None:
                blob = self.store._blob(sha)
                if os.path.exists(blob):
                    yield blob
            if others:
                found = from_others().get(sha)
                if found is not None:
                    yield found

        return locate

    # -- use and eviction ----------------------------------------------------------------------

    def acquire(self, key: str, holder: str) -> None:
        """Mark *key* as used by the session *holder*: it will not be evicted.

        Raises:
            NotFound: *key* is not cached (call :meth:`ensure`, which can acquire atomically).
        """
        _validate_holder(holder)
        with self._lock:
            rec = self._records.get(validate_key(key))
            if rec is None:
                raise NotFound(f"{key} is not cached on this node; ensure it first")
            rec.holders.add(holder)
            self._touch(rec)
            self._save()

    def release(self, key: str, holder: str) -> None:
        """End *holder*'s use of *key*. Idempotent: releasing what is not held does nothing."""
        with self._lock:
            rec = self._records.get(key)
            if rec is None or holder not in rec.holders:
                return
            rec.holders.discard(holder)
            self._touch(rec)
            self._save()

    def release_holder(self, holder: str) -> list[str]:
        """Release every key *holder* holds (a session ended); returns those keys. Idempotent."""
        with self._lock:
            keys = sorted(k for k, r in self._records.items() if holder in r.holders)
            for k in keys:
                rec = self._records[k]
                rec.holders.discard(holder)
                self._touch(rec)
            if keys:
                self._save()
            return keys

    def evict(self, needed_bytes: int = 0) -> list[str]:
        """Evict least recently used entries nobody holds until *needed_bytes* more fit.

        Returns:
            The evicted keys, oldest use first (empty when the budget already has room).

        Raises:
            CacheFull: not enough can be evicted; nothing is evicted then.
        """
        with self._lock:
            evicted, trash = self._make_room(needed_bytes, None)
        self._empty(trash)
        return evicted

    def remove(self, key: str) -> bool:
        """Drop a cached key now (its version was deleted); ``False`` when it was not cached.

        Raises:
            InUse: a session holds it, or it is being built.
        """
        with self._lock:
            if key in self._jobs:
                raise InUse(f"{key} is being cached right now; remove it when that finishes")
            rec = self._records.get(validate_key(key))
            if rec is None:
                return False
            if rec.holders:
                raise InUse(
                    f"{key} is in use by {', '.join(sorted(rec.holders))}; "
                    "stop those sessions first"
                )
            trash = [self._drop(key)]
            self._save()
        self._empty(trash)
        return True

    # -- internals (called with the lock held unless said otherwise) ----------------------------

    def _data(self, key: str) -> Path:
        return self.entries_dir / key / "data"

    def _used(self) -> int:
        return sum(r.bytes for r in self._records.values()) + sum(
            j.bytes for j in self._jobs.values()
        )

    def _touch(self, rec: _Record) -> None:
        self._seq += 1
        rec.last_used = self.now()
        rec.seq = self._seq

    def _make_room(self, needed: int, key: str | None) -> tuple[list[str], list[Path]]:
        """Evict what *needed* more bytes require: ``(evicted keys, folders to remove)``."""
        what = key or f"{needed} bytes"
        if needed > self._budget:
            raise CacheFull(
                f"{what} needs {needed} bytes, more than this node's whole dataset cache "
                f"({self._budget} bytes); it can never be cached here",
                reason="larger-than-budget",
            )
        excess = self._used() + needed - self._budget
        if excess <= 0:
            return [], []
        candidates = sorted(
            ((k, r) for k, r in self._records.items() if not r.holders),
            key=lambda kr: (kr[1].last_used, kr[1].seq),
        )
        victims: list[str] = []
        freed = 0
        for k, r in candidates:
            if freed >= excess:
                break
            victims.append(k)
            freed += r.bytes
        if freed < excess:
            held = sorted(
                f"{k} ({r.bytes} bytes, held by {', '.join(sorted(r.holders))})"
                for k, r in self._records.items()
                if r.holders
            )
            held += sorted(f"{k} ({j.bytes} bytes, being cached)" for k, j in self._jobs.items())
            raise CacheFull(
                f"no room for {what}: it needs {needed} bytes, {self._budget - self._used()} are "
                f"free and only {freed} more can be evicted; "
                f"in use: {'; '.join(held) or 'nothing'}. "
                "Retry when sessions end.",
                reason="in-use",
            )
        trash = [self._drop(k) for k in victims]
        self._save()
        for k in victims:
            log.info("evicted %s from the dataset cache (least recently used)", k)
        return victims, trash

    def _drop(self, key: str) -> Path:
        """Forget *key* and move its folder to ``tmp/`` (removed by :meth:`_empty`)."""
        del self._records[key]
        src = self.entries_dir / key
        dst = tmp_name(self.tmp_dir, f"evicted-{key}-")
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            pass
        return dst

    def _empty(self, trash: list[Path]) -> None:
        """Remove evicted folders (without the lock: this can take a while)."""
        for path in trash:
            remove_tree(path)

    def _save(self, *, durable: bool = True) -> None:
        data = {
            "format": INDEX_FORMAT,
            "seq": self._seq,
            "entries": {
                k: {
                    "digest": r.digest,
                    "bytes": r.bytes,
                    "files": r.files,
                    "last_used": r.last_used,
                    "seq": r.seq,
                    "holders": sorted(r.holders),
                }
                for k, r in sorted(self._records.items())
            },
        }
        atomic_write(
            self.index_path, json.dumps(data, indent=1, sort_keys=True).encode(), durable=durable
        )

    def _load(self, check: bool) -> None:
        """Read the index, drop entries whose folder is gone or torn, remove leftovers."""
        try:
            data = json.loads(self.index_path.read_bytes())
            if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
                raise ValueError(f"format is not {INDEX_FORMAT!r}")
        except FileNotFoundError:
            data = {"entries": {}, "seq": 0}
        except ValueError as e:
            log.error(
                "dataset cache index %s is unreadable (%s): starting empty", self.index_path, e
            )
            data = {"entries": {}, "seq": 0}
        self._seq = int(data.get("seq", 0))
        for key, raw in dict(data.get("entries", {})).items():
            try:
                validate_key(key)
                rec = _Record(
                    digest=validate_digest(raw["digest"]),
                    bytes=int(raw["bytes"]),
                    files=int(raw["files"]),
                    last_used=float(raw["last_used"]),
                    seq=int(raw["seq"]),
                    holders={str(h) for h in raw.get("holders", [])},
                )
            except (KeyError, TypeError, ValueError, DatasetError) as e:
                log.error("dataset cache: dropping unreadable index entry %r: %s", key, e)
                continue
            problem = self._problem(key, rec, check)
            if problem:
                log.warning("dataset cache: dropping %s: %s", key, problem)
                continue
            self._records[key] = rec
        for folder in self.entries_dir.iterdir():
            if folder.name not in self._records:
                log.info("dataset cache: removing leftover %s", folder)
                remove_tree(folder)
        for item in self.tmp_dir.iterdir():
            remove_tree(item)
        self._save()

    def _problem(self, key: str, rec: _Record, check: bool) -> str:
        data = self._data(key)
        if not data.is_dir():
            return "its folder is missing"
        if not check:
            return ""
        try:
            manifest = Manifest.from_json((self.entries_dir / key / "manifest.json").read_bytes())
        except (OSError, DatasetError) as e:
            return f"its manifest is unreadable ({e})"
        if manifest.digest != rec.digest:
            return "its manifest does not match the index"
        for entry in manifest:
            try:
                if (data / entry.path).stat().st_size != entry.size:
                    return f"{entry.path!r} has the wrong size"
            except OSError:
                return f"{entry.path!r} is missing"
        return ""

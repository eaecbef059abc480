"""Datasets in the NSML server: names, versions, who may read them, pushes, and node-cache holds.

The files live in a content-addressed :class:`~nsml_datasets.BlobStore` under the server's
state folder; this module keeps what the database knows (names, owners, visibility, versions,
uploads in progress, which allocation holds which version on which node) and applies the
access rules. The HTTP handlers in :mod:`nsml_server.api.datasets` are thin over it.

Access rules (one place: :func:`can_read`):

- ``private``: the owner; ``team``: also every member of the JupyterHub group ``team``;
  ``public``: every user. Hub admins and trusted services read everything.
- Only the owner (or an admin) pushes new versions, removes versions, shares the dataset or
  changes its leaderboard settings.
- A dataset the caller may not read answers **404**, exactly as a missing one does: its
  existence is not leaked. A dataset the caller may read but not change answers **403**.
  Names are global, so pushing to a name someone else owns and the caller cannot see answers
  409 ``name_taken``.
- The hidden test split of a version is never mounted into a container and only admins (and
  the server itself) may read it: 403 for everyone else.
- A content hash is a name, never a capability. A pull by hash answers only blobs of the
  version asked for, which the caller may read (404 otherwise, as for a blob that exists
  nowhere). A push may skip a blob only when a version the caller may read lists it or the
  caller has just handed it over (the local transport); every other blob's bytes must
  arrive and hash right, even when the store holds them. Nothing a push answers (missing
  blobs, offsets, errors, the version's ``new_bytes``) depends on what the store holds for
  others. The store still keeps one copy of each blob.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session, selectinload

from nsml_datasets import (
    BlobStore,
    CacheFull,
    DatasetError,
    InUse,
    InvalidName,
    Manifest,
    NodeCache,
    NotFound,
    UnsafePath,
    UploadIncomplete,
    format_ref,
    parse_ref,
    validate_name,
)
from nsml_datasets.local import LocalError, LocalServer
from nsml_datasets.store import PartWriter, Upload, validate_upload_id

from .api.base import APIError
from .db import Database
from .models import (
    Allocation,
    Dataset,
    DatasetHold,
    DatasetUpload,
    DatasetVersion,
    Node,
    PlacementRequestRow,
)
from .schemas import (
    DatasetInfo,
    DatasetOut,
    DeletedOut,
    GcOut,
    HiddenSplitOut,
    HoldOut,
    LeaderboardOut,
    MissingBlob,
    MountOut,
    MountsOut,
    UploadOut,
    VersionOut,
)
from .scoring import METRICS

log = logging.getLogger("nsml_server.datasets")

T = TypeVar("T")

CONTAINER_ROOT = "/data"
_ALLOCATION = re.compile(r"allocation:[0-9]{1,18}\Z")
"""Datasets appear read-only under ``/data/NAME`` in containers."""

PUSH_HINT = "push one with `nsml dataset push NAME FOLDER`"

BLOB_SET_BUDGET = 500_000
"""Blob names of parsed manifests kept in memory to find what an upload may skip (about
200 bytes each, so about 100 MB at most; the least recently used manifest goes first)."""


@dataclass(frozen=True)
class Caller:
    """Who asks: a user name, their JupyterHub groups (teams), and whether they are an admin."""

    name: str
    groups: frozenset[str] = frozenset()
    is_admin: bool = False


@dataclass(frozen=True)
class Resolved:
    """A dataset reference resolved to one version.

    Attributes:
        name: the dataset.
        version: its version ``k``.
        key: ``name@k``, the node caches' key.
        digest: the version's manifest digest.
        bytes: the version's size (what copying it to a node costs).
        files: its number of files.
    """

    name: str
    version: int
    key: str
    digest: str
    bytes: int
    files: int = 0


def iso(t: datetime | None) -> str | None:
    return t.isoformat() + "Z" if t else None


# ---- errors --------------------------------------------------------------------------------

_REASONS: dict[str, tuple[int, str]] = {
    "invalid-name": (400, "bad_request"),
    "bad-manifest": (400, "bad_request"),
    "integrity": (400, "integrity"),
    "too-large": (400, "too_large"),
    "not-found": (404, "not_found"),
    "upload-incomplete": (409, "upload_incomplete"),
    "bad-offset": (409, "bad_offset"),
    "busy": (409, "busy"),
    "in-use": (409, "in_use"),
    "conflict": (409, "conflict"),
    "larger-than-budget": (409, "dataset_cache_too_small"),
}


def api_error(e: DatasetError) -> APIError:
    """The API's answer to an error of the dataset library (a 4xx with its message)."""
    if isinstance(e, UnsafePath):
        status, reason = 400, "too_large" if e.reason == "too-large" else "unsafe_path"
        return APIError(status, e.message, reason)
    status, reason = _REASONS.get(e.reason, (400, "bad_request"))
    if isinstance(e, CacheFull) and e.reason == "in-use":
        status, reason = 409, "dataset_cache_full"
    return APIError(status, e.message, reason)


def parse(ref: str) -> tuple[str, int | None]:
    """``name``, ``name@k`` or ``name@latest`` -> ``(name, k or None)``; a 400 otherwise."""
    if ref.endswith("@latest"):
        ref = ref[: -len("@latest")]
    try:
        return parse_ref(ref)
    except InvalidName as e:
        raise APIError(400, e.message, "bad_request") from None


def check_name(name: str) -> str:
    try:
        return validate_name(name)
    except InvalidName as e:
        raise APIError(400, e.message, "bad_request") from None


# ---- access --------------------------------------------------------------------------------


def can_read(ds: Dataset, c: Caller) -> bool:
    """Whether *c* may list, pull and mount *ds*."""
    return (
        c.is_admin
        or ds.owner == c.name
        or ds.visibility == "public"
        or (ds.visibility == "team" and ds.team is not None and ds.team in c.groups)
    )


def scope_of(ds: Dataset, c: Caller) -> str:
    """Why *c* sees *ds*: ``mine``, ``team``, ``public`` or ``admin``."""
    if ds.owner == c.name:
        return "mine"
    if ds.visibility == "team" and ds.team in c.groups:
        return "team"
    if ds.visibility == "public":
        return "public"
    return "admin"


def _invisible(name: str) -> APIError:
    return APIError(
        404,
        f"No dataset {name!r} that you can read: check the name (`nsml dataset ls`), ask its "
        f"owner to share it (`nsml dataset share {name} --team TEAM` or `--public`), or "
        f"{PUSH_HINT}.",
        "not_found",
    )


def readable(s: Session, c: Caller, name: str) -> Dataset:
    """The dataset *name* if *c* may read it; 404 otherwise (missing or not visible alike)."""
    ds = s.scalar(select(Dataset).where(Dataset.name == check_name(name)))
    if ds is None or not can_read(ds, c):
        raise _invisible(name)
    return ds


def owned(s: Session, c: Caller, name: str) -> Dataset:
    """The dataset *name* if *c* owns it (or is an admin); 404 if invisible, 403 if only read."""
    ds = readable(s, c, name)
    if not (c.is_admin or ds.owner == c.name):
        raise APIError(
            403,
            f"Dataset {name!r} belongs to {ds.owner}: only its owner (or an admin) may change "
            "it. Push your own copy under another name.",
            "forbidden",
        )
    return ds


def version_of(s: Session, ds: Dataset, version: int | None) -> DatasetVersion:
    """Version *version* of *ds* (``None``: the newest); 404 naming the versions there are."""
    q = select(DatasetVersion).where(DatasetVersion.dataset_id == ds.id)
    if version is None:
        row = s.scalar(q.order_by(DatasetVersion.version.desc()).limit(1))
    else:
        row = s.scalar(q.where(DatasetVersion.version == version))
    if row is None:
        have = list(
            s.scalars(
                select(DatasetVersion.version)
                .where(DatasetVersion.dataset_id == ds.id)
                .order_by(DatasetVersion.version)
            )
        )
        listed = ", ".join(str(v) for v in have) or "none"
        what = f"has no version {version}" if version is not None else "has no version yet"
        raise APIError(
            404,
            f"Dataset {ds.name!r} {what} (its versions: {listed}); {PUSH_HINT}.",
            "not_found",
        )
    return row


def resolve_refs(
    session: Session, user_name: str, groups: Iterable[str], is_admin: bool, refs: Sequence[str]
) -> list[Resolved]:
    """Resolve dataset references for *user_name* to concrete versions.

    ``"name"`` and ``"name@latest"`` mean the newest version, ``"name@k"`` version *k*.

    Raises:
        APIError: 400 for a malformed reference or one dataset named twice (both would be
            mounted at ``/data/NAME``); 404 for a dataset the user cannot read (missing or not
            shared with them alike) or a version that does not exist, naming it and what to do.
    """
    c = Caller(user_name, frozenset(groups), is_admin)
    out: list[Resolved] = []
    seen: set[str] = set()
    parsed = [parse(ref) for ref in refs]  # every malformed or repeated one before any lookup
    for name, _ in parsed:
        if name in seen:
            raise APIError(
                400,
                f"Dataset {name!r} is asked for twice; a session mounts one version of each "
                f"dataset (at {CONTAINER_ROOT}/{name}).",
                "bad_request",
            )
        seen.add(name)
    for name, version in parsed:
        ds = readable(session, c, name)
        v = version_of(session, ds, version)
        out.append(
            Resolved(
                name=ds.name,
                version=v.version,
                key=format_ref(ds.name, v.version),
                digest=v.digest,
                bytes=v.bytes,
                files=v.files,
            )
        )
    return out


# ---- views ---------------------------------------------------------------------------------


def hold_out(h: DatasetHold) -> HoldOut:
    """The API view of a node's hold on a dataset version."""
    return HoldOut(
        id=h.id,
        allocation=h.allocation_id,
        key=h.key,
        dataset=h.dataset,
        version=h.version,
        digest=h.digest,
        bytes=h.bytes,
        state=h.state,  # type: ignore[arg-type]
        host_path=h.host_path,
    )


def dataset_out(ds: Dataset, c: Caller, versions: Sequence[DatasetVersion]) -> dict[str, Any]:
    latest = versions[-1] if versions else None
    return {
        "name": ds.name,
        "owner": ds.owner,
        "visibility": ds.visibility,
        "team": ds.team,
        "scope": scope_of(ds, c),
        "versions": len(versions),
        "latest": latest.version if latest else None,
        "bytes": latest.bytes if latest else 0,
        "total_bytes": sum(v.bytes for v in versions),
        "leaderboard": LeaderboardOut(metric=ds.metric, higher_is_better=bool(ds.higher_is_better))
        if ds.metric
        else None,
        "created": iso(ds.created) or "",
        "last_access": iso(ds.last_access),
    }


def version_out(ds: Dataset, v: DatasetVersion, c: Caller) -> VersionOut:
    split = None
    if v.test_digest:
        split = HiddenSplitOut(
            digest=v.test_digest if c.is_admin else None,
            files=v.test_files if c.is_admin else None,
            bytes=v.test_bytes if c.is_admin else None,
        )
    return VersionOut(
        version=v.version,
        ref=format_ref(ds.name, v.version),
        digest=v.digest,
        files=v.files,
        bytes=v.bytes,
        new_bytes=v.new_bytes,
        created=iso(v.created) or "",
        created_by=v.created_by,
        last_access=iso(v.last_access),
        test_split=split,
    )


# ---- the service ---------------------------------------------------------------------------


class DatasetService:
    """The server's datasets: its blob store, the local node's cache, and the rules above.

    Args:
        db: the NSML database.
        store: the blob store (the server's state folder).
        cache: the local node's cache (``None`` when the server runs no local node).
        node_name: the local node's name.
        now: the clock (naive UTC).
        max_file_bytes: largest file of a version.
        max_files: most files of a version.
        workers: threads for store and cache work.
    """

    def __init__(
        self,
        db: Database,
        store: BlobStore,
        cache: NodeCache | None,
        *,
        node_name: str,
        now: Callable[[], datetime],
        max_file_bytes: int,
        max_files: int,
        workers: int = 4,
        local: LocalServer | None = None,
    ) -> None:
        self.db = db
        self.local = local
        self.store = store
        self.cache = cache
        self.node_name = node_name
        self.now = now
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nsml-datasets")
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._hashers: OrderedDict[tuple[str, str], tuple[int, Any]] = OrderedDict()
        self._fills: dict[int, asyncio.Future[None]] = {}
        # Open uploads by id: resuming one parses its manifest, too slow to do per request.
        self._uploads: OrderedDict[str, Upload] = OrderedDict()
        self._uploads_lock = threading.Lock()
        self._resume_lock = threading.Lock()
        # Parsed manifests' blobs by digest (immutable), least recently used first.
        self._blob_sets: OrderedDict[str, Mapping[str, int]] = OrderedDict()
        self._blob_set_entries = 0
        self._blob_sets_lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking store/cache/database work in the service's threads."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- manifests ---------------------------------------------------------------------------

    def manifest(self, digest: str) -> Manifest:
        """A committed manifest, from a small in-memory cache or the store (verified)."""
        m = self._manifests.get(digest)
        if m is None:
            try:
                m = self.store.load_manifest(digest)
            except DatasetError as e:
                log.error("manifest %s: %s", digest, e)
                raise api_error(e) from None
            self._manifests[digest] = m
            while len(self._manifests) > 64:
                self._manifests.popitem(last=False)
        else:
            self._manifests.move_to_end(digest)
        return m

    def manifest_bytes(self, digest: str) -> bytes:
        return self.manifest(digest).to_json()

    def _parse_manifest(self, data: object, what: str) -> Manifest:
        try:
            m = Manifest.from_dict(data)
        except DatasetError as e:
            raise APIError(400, f"{what}: {e.message}", api_error(e).error_reason) from None
        if m.file_count > self.max_files:
            raise APIError(
                400,
                f"{what} lists {m.file_count} files, more than this server's limit of "
                f"{self.max_files} per version.",
                "too_large",
            )
        for entry in m:
            if entry.size > self.max_file_bytes:
                raise APIError(
                    400,
                    f"{entry.path!r} is {entry.size} bytes, over this server's limit of "
                    f"{self.max_file_bytes} bytes per file; leave it out or split it.",
                    "too_large",
                )
        return m

    def _resume(self, upload_id: str) -> Upload:
        """The store's upload *upload_id* (kept open between requests).

        Raises:
            NotFound: it was committed, aborted or collected.
        """
        with self._uploads_lock:
            up = self._uploads.get(upload_id)
            if up is not None:
                self._uploads.move_to_end(upload_id)
        if up is None or not (self.store.uploads_dir / upload_id).is_dir():
            # One thread reads and parses the manifest; requests arriving meanwhile wait for it.
            with self._resume_lock:
                with self._uploads_lock:
                    again = self._uploads.get(upload_id)
                if again is not None and again is not up:
                    return again
                self._remember(self.store.resume(upload_id))
                up = self._uploads[upload_id]
        return up

    def _remember(self, up: Upload) -> None:
        """Keep *up* open for the requests that follow (the last 64 uploads)."""
        with self._uploads_lock:
            self._uploads[up.id] = up
            self._uploads.move_to_end(up.id)
            while len(self._uploads) > 64:
                self._uploads.popitem(last=False)

    def _forget(self, *upload_ids: str | None) -> None:
        with self._uploads_lock:
            for i in upload_ids:
                if i:
                    self._uploads.pop(i, None)

    # -- listing and info --------------------------------------------------------------------

    def list(self, c: Caller, scope: str | None) -> list[DatasetOut]:
        with self.db.session() as s:
            rows = s.scalars(
                select(Dataset).options(selectinload(Dataset.versions)).order_by(Dataset.name)
            ).all()
            out = []
            for ds in rows:
                if not can_read(ds, c):
                    continue
                sc = scope_of(ds, c)
                if scope not in (None, "all") and sc != scope:
                    continue
                out.append(DatasetOut(**dataset_out(ds, c, ds.versions)))
            return out

    def info(self, c: Caller, name: str) -> DatasetInfo:
        with self.db.session() as s:
            ds = readable(s, c, name)
            versions = list(ds.versions)
            return DatasetInfo(
                **dataset_out(ds, c, versions),
                version_list=[version_out(ds, v, c) for v in versions],
            )

    def version(self, c: Caller, name: str, version: int | None) -> VersionOut:
        with self.db.session() as s:
            ds = readable(s, c, name)
            return version_out(ds, version_of(s, ds, version), c)

    def digest_for(
        self, c: Caller, name: str, version: int | None, *, split: str = "", touch: bool = False
    ) -> tuple[str, int]:
        """The manifest digest of ``name@version`` (or of its hidden test split) and ``k``.

        Raises:
            APIError: 404 as :func:`readable` / :func:`version_of`; 403 for a test split asked
                by a non-admin; 404 when the version has no test split.
        """
        with self.db.session() as s:
            ds = readable(s, c, name)
            v = version_of(s, ds, version)
            if touch:
                now = self.now()
                ds.last_access = v.last_access = now
            if split == "test":
                if not c.is_admin:
                    raise APIError(
                        403,
                        f"The test split of {ds.name}@{v.version} is hidden: only admins and "
                        "the evaluator read it.",
                        "forbidden",
                    )
                if not v.test_digest:
                    raise APIError(
                        404, f"{ds.name}@{v.version} has no hidden test split.", "not_found"
                    )
                return v.test_digest, v.version
            if split:
                raise APIError(
                    400, f"Unknown split {split!r}; the only one is 'test'.", "bad_request"
                )
            return v.digest, v.version

    # -- pushing -----------------------------------------------------------------------------

    def _check_pushable(self, s: Session, c: Caller, name: str) -> None:
        ds = s.scalar(select(Dataset).where(Dataset.name == name))
        if ds is None or c.is_admin or ds.owner == c.name:
            return
        if can_read(ds, c):
            raise APIError(
                403,
                f"Dataset {name!r} belongs to {ds.owner}: only its owner (or an admin) pushes "
                "new versions. Push yours under another name.",
                "forbidden",
            )
        raise APIError(
            409,
            f"The dataset name {name!r} is taken by another user; choose another name.",
            "name_taken",
        )

    def begin(
        self,
        c: Caller,
        name: str,
        manifest: object,
        test_manifest: object | None,
        local_key: str | None = None,
    ) -> UploadOut:
        """Start pushing a new version, or resume the upload of the same manifest(s).

        The answer lists as missing every blob the caller must send: all but those a version
        the caller may read already lists (:meth:`readable_blobs`) and, with *local_key*,
        those the caller just handed over as files through the local transport. Whether the
        store holds a blob the caller cannot read changes nothing in it. The version's
        ``new_bytes`` are the bytes of the blobs that no version readable by the caller
        listed when the push began (less what became readable before a resume).
        """
        check_name(name)
        m = self._parse_manifest(manifest, "manifest")
        tm = self._parse_manifest(test_manifest, "test_manifest") if test_manifest else None
        if tm is not None and tm.file_count == 0:
            raise APIError(400, "The test split holds no file.", "bad_request")
        proven = self._proven_locally(c, local_key)
        with self.db.session() as s:
            self._check_pushable(s, c, name)
            row = s.scalar(
                select(DatasetUpload).where(
                    DatasetUpload.owner == c.name,
                    DatasetUpload.name == name,
                    DatasetUpload.digest == m.digest,
                    DatasetUpload.test_digest.is_(None)
                    if tm is None
                    else DatasetUpload.test_digest == tm.digest,
                )
            )
            existing = (row.id, row.test_upload_id) if row is not None else None
        if existing is not None:
            try:
                up = self._resume(existing[0])
                tup = self._resume(existing[1]) if existing[1] else None
            except NotFound:
                self._forget(*existing)
                with self.db.session() as s:
                    s.execute(delete(DatasetUpload).where(DatasetUpload.id == existing[0]))
            else:
                # What became readable since the push began need not be brought any more.
                known = self._credit(c, name, (up, tup), proven)
                with self.db.session() as s:
                    s.execute(
                        update(DatasetUpload)
                        .where(DatasetUpload.id == up.id)
                        .values(
                            updated=self.now(),
                            missing_bytes=DatasetUpload.missing_bytes - sum(known.values()),
                        )
                    )
                log.info("%s/%s: upload %s resumed", c.name, name, up.id)
                return self._upload_out(name, up, tup, resumed=True)
        try:
            up = self.store.begin(m)
            tup = self.store.begin(tm) if tm is not None else None
        except DatasetError as e:
            raise api_error(e) from None
        self._remember(up)
        if tup is not None:
            self._remember(tup)
        known = self._credit(c, name, (up, tup), proven)
        # What the version brings that the pusher could not read before: the same answer
        # whatever else the store holds (it is shown to the pusher).
        brought = dict(m.blobs())
        if tm is not None:
            brought.update(tm.blobs())
        new_bytes = sum(size for sha, size in brought.items() if known.get(sha) != size)
        now = self.now()
        with self.db.session() as s:
            s.add(
                DatasetUpload(
                    id=up.id,
                    name=name,
                    owner=c.name,
                    digest=m.digest,
                    bytes=m.total_bytes,
                    files=m.file_count,
                    missing_bytes=new_bytes,
                    test_upload_id=tup.id if tup is not None else None,
                    test_digest=tm.digest if tm is not None else None,
                    created=now,
                    updated=now,
                )
            )
        log.info(
            "%s/%s: upload %s begun (%d files, %d bytes, %d bytes new to the pusher)",
            c.name,
            name,
            up.id,
            m.file_count,
            m.total_bytes,
            new_bytes,
        )
        return self._upload_out(name, up, tup, resumed=False)

    def _proven_locally(self, c: Caller, key: str | None) -> dict[str, int]:
        """The blobs *c* handed over as files with their local-transport *key*, BLAKE3 to
        size (the server hashed them: proof that *c* holds their bytes)."""
        if key is None:
            return {}
        if self.local is None:
            raise APIError(
                400, "This server offers no local transport: leave local_key out.", "bad_request"
            )
        try:
            return self.local.grants.proven_by(key, c.name)
        except LocalError as e:
            raise APIError(
                403, f"local_key: {e.message}; push again to get a new one.", "forbidden"
            ) from None

    def _credit(
        self,
        c: Caller,
        name: str,
        uploads: Sequence[Upload | None],
        proven: Mapping[str, int],
    ) -> dict[str, int]:
        """Credit to *uploads* the blobs *c* need not send: those a version *c* may read
        lists, and those *c* has just proven to hold (*proven*), each with the size the
        upload's manifest gives it. Every other blob stays missing, whatever the store holds.

        Returns:
            The blobs a readable version lists, BLAKE3 to size (of those the uploads name and
            had not been credited yet).
        """
        live = [u for u in uploads if u is not None]
        wanted: dict[str, int] = {}
        for u in live:
            credited = u.credited()
            for sha, size in u.manifest.blobs().items():
                if sha not in credited:
                    wanted.setdefault(sha, size)
        known = self.readable_blobs(c, name, wanted)
        for u in live:
            u.credit(
                sha
                for sha, size in u.manifest.blobs().items()
                if known.get(sha) == size or proven.get(sha) == size
            )
        return known

    # -- which blobs a caller may read -------------------------------------------------------

    def readable_blobs(self, c: Caller, name: str, wanted: Mapping[str, int]) -> dict[str, int]:
        """The blobs of *wanted* (BLAKE3 to size) that a version *c* may read lists with that
        size: a dataset version's files where :func:`can_read` allows, a hidden test split
        only for admins.

        Fast in the common cases: a blob the store lacks is listed by no version, so only
        stored blobs are looked for; the versions of *name* (the dataset being pushed) come
        first, then *c*'s own datasets, then the rest *c* may read, newest version first; the
        search stops once every blob is found; each manifest's blobs are parsed once and
        kept (manifests are immutable).
        """
        left = {sha: size for sha, size in wanted.items() if self.store.has(sha)}
        found: dict[str, int] = {}
        if not left:
            return found
        for digest in self._readable_digests(c, name):
            blobs = self._blobs_of(digest)
            if blobs is None:
                continue
            if len(left) <= len(blobs):
                hits = [sha for sha, size in left.items() if blobs.get(sha) == size]
            else:
                hits = [sha for sha, size in blobs.items() if left.get(sha) == size]
            for sha in hits:
                found[sha] = left.pop(sha)
            if not left:
                break
        return found

    def _readable_digests(self, c: Caller, name: str) -> tuple[str, ...]:
        """Manifest digests of every version *c* may read (a hidden test split only where
        :meth:`_may_skip_test`), in the order to search them."""
        q = select(Dataset).options(selectinload(Dataset.versions))
        if not c.is_admin:
            q = q.where(
                or_(
                    Dataset.owner == c.name,
                    Dataset.visibility == "public",
                    and_(Dataset.visibility == "team", Dataset.team.in_(sorted(c.groups))),
                )
            )
        with self.db.session() as s:
            rows = sorted(
                (ds for ds in s.scalars(q) if can_read(ds, c)),
                key=lambda ds: (ds.name != name, ds.owner != c.name, ds.name),
            )
            return tuple(
                digest
                for ds in rows
                for v in reversed(ds.versions)
                for digest in (v.digest, v.test_digest if self._may_skip_test(c, v) else None)
                if digest
            )

    @staticmethod
    def _may_skip_test(c: Caller, v: DatasetVersion) -> bool:
        """Whether *c* need not send again the hidden test split of version *v*: admins read
        every split, and whoever pushed *v* has already sent those bytes."""
        return c.is_admin or v.created_by == c.name

    def _blobs_of(self, digest: str) -> Mapping[str, int] | None:
        """The blobs a committed manifest lists (kept while the budget allows); ``None`` when
        the store lacks it or it is damaged (logged)."""
        with self._blob_sets_lock:
            blobs = self._blob_sets.get(digest)
            if blobs is not None:
                self._blob_sets.move_to_end(digest)
                return blobs
        try:
            blobs = self.store.load_manifest(digest).blobs()
        except DatasetError as e:
            log.error("manifest %s of a version cannot be read: %s", digest, e)
            return None
        with self._blob_sets_lock:
            if digest not in self._blob_sets:
                self._blob_sets[digest] = blobs
                self._blob_set_entries += len(blobs)
            while self._blob_set_entries > BLOB_SET_BUDGET and len(self._blob_sets) > 1:
                _, gone = self._blob_sets.popitem(last=False)
                self._blob_set_entries -= len(gone)
        return blobs

    def _upload_out(self, name: str, up: Upload, tup: Upload | None, *, resumed: bool) -> UploadOut:
        missing = []
        for u in (up, tup):
            if u is None:
                continue
            for sha, size, offset in u.missing_offsets():
                missing.append(MissingBlob(blake3=sha, size=size, offset=offset))
        return UploadOut(
            upload_id=up.id,
            name=name,
            digest=up.digest,
            test_digest=tup.digest if tup is not None else None,
            files=up.manifest.file_count,
            bytes=up.manifest.total_bytes,
            missing=missing,
            missing_bytes=sum(b.size - b.offset for b in missing),
            resumed=resumed,
        )

    def _upload_row(self, s: Session, c: Caller, name: str, upload_id: str) -> DatasetUpload:
        try:
            validate_upload_id(upload_id)
        except InvalidName as e:
            raise APIError(400, e.message, "bad_request") from None
        row = s.get(DatasetUpload, upload_id)
        if row is None or row.name != name or (row.owner != c.name and not c.is_admin):
            raise APIError(
                404,
                f"No upload {upload_id} of dataset {name!r} in progress (committed, aborted or "
                "expired); push again.",
                "not_found",
            )
        return row

    def uploads_of(self, c: Caller, name: str, upload_id: str) -> tuple[Upload, Upload | None]:
        """The store uploads behind an upload id the caller owns."""
        with self.db.session() as s:
            row = self._upload_row(s, c, name, upload_id)
            ids = (row.id, row.test_upload_id)
        try:
            return self._resume(ids[0]), self._resume(ids[1]) if ids[1] else None
        except NotFound as e:
            self._forget(*ids)
            raise api_error(e) from None

    def status(self, c: Caller, name: str, upload_id: str) -> UploadOut:
        up, tup = self.uploads_of(c, name, upload_id)
        return self._upload_out(name, up, tup, resumed=True)

    def upload_for_blob(self, c: Caller, name: str, upload_id: str, sha: str) -> Upload:
        """The store upload (files or test split) that lists blob *sha*; 404 otherwise."""
        up, tup = self.uploads_of(c, name, upload_id)
        for u in (up, tup):
            if u is not None and sha in u.manifest.blobs():
                return u
        raise APIError(
            404, f"Blob {sha} is not part of upload {upload_id} of {name!r}.", "not_found"
        )

    def open_part(self, upload: Upload, sha: str, offset: int) -> PartWriter | None:
        """A writer for a blob of *upload* at *offset*, continuing a kept hash state."""
        kept = self._hashers.pop((upload.id, sha), None)
        hasher = kept[1] if kept is not None and kept[0] == offset else None
        try:
            return upload.open_part(sha, offset=offset, hasher=hasher)
        except DatasetError as e:
            raise api_error(e) from None

    def keep_hasher(self, upload: Upload, writer: PartWriter) -> None:
        """Remember a partial blob's hash state so that resuming it need not re-read it."""
        state = writer.hasher()
        if state is not None and 0 < writer.received < writer.size:
            self._hashers[(upload.id, writer.sha)] = (writer.received, state)
            while len(self._hashers) > 256:
                self._hashers.popitem(last=False)

    def commit(self, c: Caller, name: str, upload_id: str) -> VersionOut:
        """Turn a complete upload into the next version ``name@k`` (the dataset on k = 1)."""
        with self.db.session() as s:
            row = self._upload_row(s, c, name, upload_id)
            info = (row.test_upload_id, row.missing_bytes, row.owner)
        up, tup = self.uploads_of(c, name, upload_id)
        try:
            digest = up.commit()
            test_digest = tup.commit() if tup is not None else None
        except UploadIncomplete as e:
            raise APIError(
                409,
                f"{e.message}. `nsml dataset push` resumes where it stopped.",
                "upload_incomplete",
            ) from None
        except DatasetError as e:
            raise api_error(e) from None
        self._forget(up.id, tup.id if tup is not None else None)
        m = self.manifest(digest)
        tm = self.manifest(test_digest) if test_digest else None
        owner = info[2]
        for attempt in range(5):
            try:
                with self.db.session() as s:
                    ds = s.scalar(select(Dataset).where(Dataset.name == name))
                    now = self.now()
                    if ds is None:
                        ds = Dataset(
                            name=name,
                            owner=owner,
                            visibility="private",
                            next_version=1,
                            created=now,
                        )
                        s.add(ds)
                        s.flush()
                    elif ds.owner != owner and not c.is_admin:
                        raise APIError(
                            409,
                            f"The dataset name {name!r} was taken by another user meanwhile; "
                            "push under another name.",
                            "name_taken",
                        )
                    k = ds.next_version
                    moved = s.execute(
                        update(Dataset)
                        .where(Dataset.id == ds.id, Dataset.next_version == k)
                        .values(next_version=k + 1)
                        .execution_options(synchronize_session=False)
                    )
                    if cast(CursorResult[Any], moved).rowcount != 1:
                        raise _Retry
                    v = DatasetVersion(
                        dataset_id=ds.id,
                        version=k,
                        digest=digest,
                        bytes=m.total_bytes,
                        files=m.file_count,
                        new_bytes=info[1],
                        test_digest=test_digest,
                        test_bytes=tm.total_bytes if tm is not None else 0,
                        test_files=tm.file_count if tm is not None else 0,
                        created=now,
                        created_by=c.name,
                    )
                    s.add(v)
                    s.execute(delete(DatasetUpload).where(DatasetUpload.id == upload_id))
                    s.flush()
                    out = version_out(ds, v, c)
                log.info(
                    "%s/%s@%d committed: manifest %s, %d files, %d bytes (%d new)",
                    owner,
                    name,
                    k,
                    digest,
                    m.file_count,
                    m.total_bytes,
                    info[1],
                )
                return out
            except (_Retry, DBIntegrityError):
                time.sleep(0.01 * (attempt + 1))
        raise APIError(
            503, f"Could not commit {name!r}: too many concurrent pushes; retry.", "busy"
        )

    def abort(self, c: Caller, name: str, upload_id: str) -> None:
        with self.db.session() as s:
            row = self._upload_row(s, c, name, upload_id)
            ids = [row.id, row.test_upload_id]
            s.delete(row)
        self._forget(*ids)
        for i in ids:
            if i:
                try:
                    self.store.resume(i).abort()
                except NotFound:
                    pass
        log.info("%s/%s: upload %s aborted", c.name, name, upload_id)

    # -- sharing, settings, removal ----------------------------------------------------------

    def patch(
        self,
        c: Caller,
        name: str,
        *,
        fields: set[str],
        visibility: str | None,
        team: str | None,
        metric: str | None,
        higher_is_better: bool | None,
        rules: Mapping[str, Any] | None = None,
    ) -> DatasetInfo:
        """Change a dataset's sharing and leaderboard settings (owner or admin).

        *rules* are leaderboard rules to set: ``daily_limit`` (None: no limit),
        ``eval_timeout_s``, ``eval_gpus`` (None: as the session had), ``closed``.
        """
        with self.db.session() as s:
            ds = owned(s, c, name)
            for key, value in (rules or {}).items():
                if key == "eval_timeout_s" and value is None:
                    raise APIError(400, "eval_timeout_s needs a number of seconds.", "bad_request")
                if key == "closed":
                    value = bool(value)
                setattr(ds, key, value)
            if "visibility" in fields and visibility is not None:
                if visibility == "team":
                    team = team or ds.team
                    if not team:
                        raise APIError(
                            400,
                            "Sharing with a team needs the team: a JupyterHub group, e.g. "
                            f"`nsml dataset share {name} --team vision`.",
                            "bad_request",
                        )
                    if not c.is_admin and team not in c.groups:
                        groups = ", ".join(sorted(c.groups)) or "none"
                        raise APIError(
                            403,
                            f"You are not a member of the group {team!r}; share with one of "
                            f"your groups ({groups}), or ask an admin.",
                            "forbidden",
                        )
                    ds.team = team
                elif "team" in fields and team:
                    raise APIError(400, "A team goes with visibility 'team' only.", "bad_request")
                else:
                    ds.team = None
                ds.visibility = visibility
            elif "team" in fields and team:
                raise APIError(
                    400, "Give visibility 'team' with the team to share it.", "bad_request"
                )
            if "metric" in fields:
                ds.metric = metric
                if metric in METRICS and "higher_is_better" not in fields:
                    ds.higher_is_better = METRICS[metric].higher_is_better
                elif metric and "higher_is_better" not in fields and ds.higher_is_better is None:
                    raise APIError(
                        400,
                        "Say whether a higher metric is better: higher_is_better true or false.",
                        "bad_request",
                    )
            if "higher_is_better" in fields:
                ds.higher_is_better = higher_is_better
            log.info(
                "%s: %s is %s%s",
                c.name,
                name,
                ds.visibility,
                f" (team {ds.team})" if ds.team else "",
            )
            s.flush()
            return DatasetInfo(
                **dataset_out(ds, c, list(ds.versions)),
                version_list=[version_out(ds, v, c) for v in ds.versions],
            )

    def users_of(self, s: Session, name: str, version: int | None) -> builtins.list[str]:
        """What uses ``name`` (or ``name@version``): waiting or placed requests, active holds."""
        keys: set[str] | None = None if version is None else {format_ref(name, version)}

        def match(key: str) -> bool:
            return key.partition("@")[0] == name if keys is None else key in keys

        users: dict[str, list[str]] = {}  # holder -> what it uses, where
        covered: set[str] = set()
        R = PlacementRequestRow
        rows = s.execute(
            select(R.id, R.holder, R.state, R.spec, Allocation.state, Allocation.id)
            .outerjoin(Allocation, Allocation.id == R.allocation_id)
            .where(R.state.in_(("waiting", "placed")))
        ).all()
        for rid, holder, state, spec, alloc_state, aid in rows:
            if state == "placed" and alloc_state != "active":
                continue
            for d in (spec or {}).get("datasets") or ():
                if match(str(d.get("ref", ""))):
                    users.setdefault(holder, []).append(f"{d.get('ref')}, placement {rid}")
                    if aid is not None:
                        covered.add(self.holder(aid))
        held = s.execute(
            select(DatasetHold.key, Allocation.holder, Allocation.id, Node.name)
            .join(Allocation, Allocation.id == DatasetHold.allocation_id)
            .join(Node, Node.id == DatasetHold.node_id)
            .where(
                DatasetHold.dataset == name,
                DatasetHold.state != "released",
                Allocation.state == "active",
            )
        ).all()
        for key, holder, aid, node in held:
            if match(key):
                users.setdefault(holder, []).append(f"mounted on {node}")
                covered.add(self.holder(aid))
        if self.cache is not None:
            for e in self.cache.entries():
                if match(e.key.partition("+")[0]):
                    for h in sorted(e.holders - covered):
                        users.setdefault(h, []).append(f"{e.key} in {self.node_name}'s cache")
        return [f"{h} ({'; '.join(what)})" for h, what in sorted(users.items())]

    def remove(self, c: Caller, name: str, version: int | None) -> DeletedOut:
        """Remove a version (or the whole dataset); 409 while anything uses it."""
        self.reconcile()
        with self.db.session() as s:
            ds = owned(s, c, name)
            if version is not None:
                version_of(s, ds, version)
            users = self.users_of(s, name, version)
            what = format_ref(name, version) if version is not None else name
            if users:
                raise APIError(
                    409,
                    f"{what} is in use by {'; '.join(users[:5])}"
                    f"{'; ...' if len(users) > 5 else ''}. Stop those sessions or servers, "
                    "then remove it.",
                    "in_use",
                )
            gone = [v.version for v in ds.versions if version is None or v.version == version]
            if version is None:
                s.delete(ds)
            else:
                s.execute(
                    delete(DatasetVersion).where(
                        DatasetVersion.dataset_id == ds.id, DatasetVersion.version == version
                    )
                )
        if self.cache is not None:
            for k in gone:
                for key in (format_ref(name, k), f"{format_ref(name, k)}+test"):
                    try:
                        self.cache.remove(key)
                    except InUse as e:  # a race with a new mount; the reconcile retries later
                        log.warning("%s stays cached: %s", key, e)
        log.info("%s removed %s (versions %s)", c.name, what, gone)
        return DeletedOut(name=name, versions=gone, dataset_removed=version is None)

    # -- store maintenance -------------------------------------------------------------------

    def live_digests(self) -> set[str]:
        with self.db.session() as s:
            live = set(s.scalars(select(DatasetVersion.digest)))
            live.update(d for d in s.scalars(select(DatasetVersion.test_digest)) if d is not None)
        return live

    def gc(self, older_than_s: float) -> GcOut:
        """Collect what no version needs: stale uploads (their records too), orphan blobs."""
        report = self.store.gc(self.live_digests(), older_than=older_than_s)
        alive = set(self.store.upload_ids())
        with self._uploads_lock:
            for i in [i for i in self._uploads if i not in alive]:
                del self._uploads[i]
        with self.db.session() as s:
            stale = [
                r.id
                for r in s.scalars(select(DatasetUpload))
                if r.id not in alive or (r.test_upload_id and r.test_upload_id not in alive)
            ]
            if stale:
                s.execute(delete(DatasetUpload).where(DatasetUpload.id.in_(stale)))
        for key in [k for k in self._hashers if k[0] not in alive]:
            self._hashers.pop(key, None)
        if report.missing_live:
            log.error(
                "the database names %d versions whose manifests the store lacks: %s",
                len(report.missing_live),
                ", ".join(report.missing_live[:5]),
            )
        return GcOut(
            blobs_removed=report.blobs_removed,
            bytes_freed=report.bytes_freed,
            manifests_removed=report.manifests_removed,
            uploads_removed=report.uploads_removed,
            tmp_removed=report.tmp_removed,
            missing_live=list(report.missing_live),
        )

    # -- mounts and the node caches ----------------------------------------------------------

    @staticmethod
    def holder(allocation_id: int) -> str:
        """The node-cache holder name of an allocation."""
        return f"allocation:{allocation_id}"

    def prepare_mounts(self, c: Caller, placement_id: int) -> tuple[MountsOut, builtins.list[int]]:
        """Record holds for a placed request's datasets; answer their state.

        Returns:
            The answer so far, and the ids of local holds still to fill.
        """
        with self.db.session() as s:
            row = s.get(PlacementRequestRow, placement_id)
            if row is None:
                raise APIError(404, f"No placement {placement_id}.", "not_found")
            if row.user_name != c.name and not c.is_admin:
                raise APIError(
                    403, f"Placement {placement_id} belongs to another user.", "forbidden"
                )
            alloc = s.get(Allocation, row.allocation_id) if row.allocation_id else None
            if row.state != "placed" or alloc is None or alloc.state != "active":
                raise APIError(
                    409,
                    f"Placement {placement_id} is {row.state}: datasets are mounted for placed "
                    "requests only.",
                    "conflict",
                )
            node = s.get(Node, alloc.node_id)
            assert node is not None
            holds = {
                h.key: h
                for h in s.scalars(select(DatasetHold).where(DatasetHold.allocation_id == alloc.id))
            }
            now = self.now()
            todo: list[int] = []
            touched: set[str] = set()
            for d in (row.spec or {}).get("datasets") or ():
                key = str(d["ref"])
                name, version = parse(key)
                if version is None:  # a request placed before versions were resolved
                    raise APIError(
                        409,
                        f"Placement {placement_id} names {key!r} without a version; ask again.",
                        "conflict",
                    )
                h = holds.get(key)
                if h is None:
                    ds = s.scalar(select(Dataset).where(Dataset.name == name))
                    v = version_of(s, ds, version) if ds is not None else None
                    if v is None:
                        raise APIError(
                            409, f"{key} was removed after placement {placement_id}.", "conflict"
                        )
                    h = DatasetHold(
                        allocation_id=alloc.id,
                        node_id=node.id,
                        dataset=name,
                        version=version,
                        key=key,
                        digest=str(d.get("digest") or v.digest),
                        bytes=v.bytes,
                        state="preparing",
                        created=now,
                        updated=now,
                    )
                    s.add(h)
                    holds[key] = h
                    touched.add(name)
                elif h.state == "failed":
                    h.state, h.message, h.updated = "preparing", None, now
                if h.state == "released":
                    h.state, h.updated = "preparing", now
                if h.state == "preparing" and node.name == self.node_name:
                    s.flush()
                    todo.append(h.id)
            if touched:
                s.execute(update(Dataset).where(Dataset.name.in_(touched)).values(last_access=now))
            s.flush()
            return self._mounts_out(placement_id, node.name, list(holds.values())), todo

    def mounts_state(self, placement_id: int) -> MountsOut:
        with self.db.session() as s:
            row = s.get(PlacementRequestRow, placement_id)
            assert row is not None and row.allocation_id is not None
            alloc = s.get(Allocation, row.allocation_id)
            assert alloc is not None
            node = s.get(Node, alloc.node_id)
            holds = list(
                s.scalars(select(DatasetHold).where(DatasetHold.allocation_id == alloc.id))
            )
            keys = [str(d["ref"]) for d in (row.spec or {}).get("datasets") or ()]
            holds = [h for h in holds if h.key in keys]
            return self._mounts_out(placement_id, node.name if node else "?", holds)

    @staticmethod
    def _mounts_out(placement_id: int, node: str, holds: builtins.list[DatasetHold]) -> MountsOut:
        mounts = [
            MountOut(
                ref=h.key,
                dataset=h.dataset,
                version=h.version,
                state=h.state,  # type: ignore[arg-type]
                host_path=h.host_path if h.state == "ready" else None,
                container_path=f"{CONTAINER_ROOT}/{h.dataset}",
                read_only=True,
                bytes=h.bytes,
                message=h.message,
            )
            for h in sorted(holds, key=lambda h: h.key)
        ]
        failed = [m for m in mounts if m.state == "failed"]
        if failed:
            state, message = "failed", "; ".join(f"{m.ref}: {m.message}" for m in failed)
        elif all(m.state == "ready" for m in mounts):
            state, message = "ready", None
        else:
            waiting = [m.ref for m in mounts if m.state != "ready"]
            state, message = "preparing", f"caching {', '.join(waiting)} on {node}"
        return MountsOut(
            placement=placement_id,
            node=node,
            state=state,  # type: ignore[arg-type]
            mounts=mounts,
            message=message,
        )

    def fill_local(self, hold_id: int) -> None:
        """Make a local hold's version present in this node's cache, held by its allocation."""
        assert self.cache is not None
        with self.db.session() as s:
            h = s.get(DatasetHold, hold_id)
            if h is None or h.state != "preparing":
                return
            key, digest, holder = h.key, h.digest, self.holder(h.allocation_id)
        try:
            manifest = self.store.load_manifest(digest)
            try:
                path = self.cache.ensure(key, manifest, holder=holder)
            except DatasetError as e:
                if e.reason != "conflict":
                    raise
                # The key was cached for a version since removed (names can be reused).
                log.warning("%s: dropping a stale cached copy: %s", key, e)
                self.cache.remove(key)
                path = self.cache.ensure(key, manifest, holder=holder)
            state, host_path, message = "ready", str(path), None
        except DatasetError as e:
            state, host_path, message = "failed", None, e.message
            log.warning("%s for %s on %s: %s", key, holder, self.node_name, e.message)
        with self.db.session() as s:
            s.execute(
                update(DatasetHold)
                .where(DatasetHold.id == hold_id, DatasetHold.state == "preparing")
                .values(state=state, host_path=host_path, message=message, updated=self.now())
            )
            s.execute(
                update(Node)
                .where(Node.name == self.node_name)
                .values(datasets=self.cache.present())
            )

    async def ensure_filling(self, hold_ids: Sequence[int]) -> builtins.list[asyncio.Future[None]]:
        """Start (once per hold) filling local holds in the background; their futures."""
        loop = asyncio.get_running_loop()
        futures = []
        for hid in hold_ids:
            fut = self._fills.get(hid)
            if fut is None or fut.done():
                fut = loop.run_in_executor(self.pool, self.fill_local, hid)
                self._fills[hid] = fut
                fut.add_done_callback(functools.partial(self._forget_fill, hid))
            futures.append(fut)
        return futures

    def _forget_fill(self, hid: int, fut: asyncio.Future[None]) -> None:
        if self._fills.get(hid) is fut:
            del self._fills[hid]
        if not fut.cancelled() and fut.exception() is not None:
            log.error("filling hold %d failed: %r", hid, fut.exception())

    def reconcile(self) -> int:
        """Release holds of allocations that ended; drop local cache holders nothing backs.

        Survives crashes: it compares the caches' holders with the active allocations each
        time, so a release missed while the server was down happens at its next run.

        Returns:
            The number of holds released.
        """
        with self.db.session() as s:
            rows = s.execute(
                select(
                    DatasetHold.id,
                    DatasetHold.key,
                    DatasetHold.allocation_id,
                    Node.name,
                    Allocation.state,
                )
                .join(Allocation, Allocation.id == DatasetHold.allocation_id)
                .join(Node, Node.id == DatasetHold.node_id)
                .where(DatasetHold.state != "released")
            ).all()
            ended = [r for r in rows if r[4] != "active"]
            if ended:
                s.execute(
                    update(DatasetHold)
                    .where(DatasetHold.id.in_([r[0] for r in ended]))
                    .values(state="released", updated=self.now())
                )
        if self.cache is not None:
            for _, key, aid, node, _ in ended:
                if node == self.node_name:
                    self.cache.release(key, self.holder(aid))
            # Holders the database no longer backs (a release missed while the server was
            # down). Asked after reading the cache, so a hold filled meanwhile is never taken.
            held = [(e.key, h) for e in self.cache.entries() for h in e.holders]
            ids = {int(h.split(":", 1)[1]) for _, h in held if _ALLOCATION.match(h)}
            with self.db.session() as s:
                active = (
                    set(
                        s.scalars(
                            select(Allocation.id).where(
                                Allocation.id.in_(ids), Allocation.state == "active"
                            )
                        )
                    )
                    if ids
                    else set()
                )
            for key, h in held:
                if _ALLOCATION.match(h) and int(h.split(":", 1)[1]) not in active:
                    self.cache.release(key, h)
            present = self.cache.present()
            with self.db.session() as s:
                s.execute(update(Node).where(Node.name == self.node_name).values(datasets=present))
        for _, key, aid, node, _ in ended:
            log.info("%s released by allocation %d on %s", key, aid, node)
        return len(ended)

    # -- remote node agents ------------------------------------------------------------------

    def holds_of_node(self, node_name: str) -> builtins.list[HoldOut]:
        """Holds a remote node's agent must keep: active allocations' holds on that node."""
        with self.db.session() as s:
            rows = s.execute(
                select(DatasetHold)
                .join(Allocation, Allocation.id == DatasetHold.allocation_id)
                .join(Node, Node.id == DatasetHold.node_id)
                .where(
                    Node.name == node_name,
                    Allocation.state == "active",
                    DatasetHold.state != "released",
                )
                .order_by(DatasetHold.id)
            ).scalars()
            return [hold_out(h) for h in rows]

    def report_hold(
        self, node_name: str, hold_id: int, state: str, host_path: str | None, message: str | None
    ) -> HoldOut:
        with self.db.session() as s:
            h = s.get(DatasetHold, hold_id)
            node = s.get(Node, h.node_id) if h is not None else None
            if h is None or node is None or node.name != node_name:
                raise APIError(404, f"No dataset hold {hold_id} on node {node_name}.", "not_found")
            if state == "ready" and not (host_path and host_path.startswith("/")):
                raise APIError(400, "A ready hold needs its absolute host_path.", "bad_request")
            if h.state != "released":
                h.state, h.updated = state, self.now()
                h.host_path = host_path if state == "ready" else None
                h.message = message if state == "failed" else None
            s.flush()
            return hold_out(h)

    def cache_paths(self) -> dict[str, Any]:
        """Where the local node's cache lives and what it holds (for operators)."""
        if self.cache is None:
            return {}
        return {
            "root": os.fspath(self.cache.root),
            "budget_bytes": self.cache.budget_bytes,
            "used_bytes": self.cache.used_bytes,
            "entries": [
                {
                    "key": e.key,
                    "bytes": e.bytes,
                    "files": e.files,
                    "last_used": e.last_used,
                    "holders": sorted(e.holders),
                }
                for e in self.cache.entries()
            ],
        }


class _Retry(Exception):
    """A concurrent commit took the version number; try the next one."""


def frame_header(sha: str, size: int) -> bytes:
    """The header of one blob in a pack: ``<blake3> <size>\\n``."""
    return f"{sha} {size}\n".encode("ascii")


__all__ = [
    "CONTAINER_ROOT",
    "Caller",
    "DatasetService",
    "Resolved",
    "api_error",
    "can_read",
    "frame_header",
    "parse",
    "readable",
    "resolve_refs",
    "scope_of",
    "version_of",
]

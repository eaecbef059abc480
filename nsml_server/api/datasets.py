"""``api/datasets``: push, list, pull, share and remove datasets; mount them for placements.

Thin handlers over :class:`nsml_server.datasets.DatasetService`; the access rules and what
each answer means are documented there and in ``docs/architecture.md``. Bytes travel raw:

- ``PUT .../uploads/ID/blobs/SHA?offset=N``: one blob (or its rest from byte *N*), streamed;
- ``POST .../uploads/ID/pack`` and ``POST .../versions/K/pack``: many small blobs in one
  body, each as a line ``<blake3> <size>\\n`` followed by its bytes;
- ``GET .../versions/K/blobs/SHA?offset=N``: one blob (from byte *N*).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from nsml_datasets import DatasetError, NotFound
from nsml_datasets.manifest import validate_digest
from nsml_datasets.store import PartWriter, Upload

from ..datasets import Caller, DatasetService, Resolved, api_error, frame_header, parse
from ..datasets import resolve_refs as _resolve
from ..schemas import (
    BlobOut,
    DatasetList,
    DatasetPatch,
    GcIn,
    HoldList,
    HoldPatch,
    LocalGrantIn,
    LocalGrantOut,
    PackOut,
    PackRequest,
    StoreOut,
    UploadIn,
)
from .base import APIError, APIHandler, log

CHUNK = 1 << 20
"""Bytes read from the store at once for a download."""

PUT_GATHER = 4 << 20
"""Bytes of a blob's body gathered (no copy) before a writer thread hashes and writes them."""

PACK_GATHER = 8 << 20
"""Bytes of a pack gathered before a worker thread parses, verifies and stores them."""

PACK_BLOB_MAX = 16 << 20
"""Largest blob accepted in a pack; larger ones go one by one."""

PACK_MAX_BYTES = 1 << 30
"""Largest pack body."""

PACK_MAX_BLOBS = 20_000
"""Most blobs asked for in one download pack."""

SCOPES = ("mine", "team", "public", "all")


class DatasetsBase(APIHandler):
    """What the dataset handlers share: the service, the caller, the version in the path."""

    @property
    def svc(self) -> DatasetService:
        svc = getattr(self.ctx, "datasets", None)
        if svc is None:
            raise APIError(503, "Datasets are not enabled on this server.", "unavailable")
        return svc  # type: ignore[no-any-return]

    @property
    def caller(self) -> Caller:
        assert self.hub_user is not None
        return Caller(
            name=self.user_name,
            groups=frozenset(str(g) for g in self.hub_user.get("groups") or ()),
            is_admin=self.is_admin,
        )

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run service work in its threads; map library errors to API errors."""
        try:
            return await self.svc.run(lambda: fn(*args, **kwargs))
        except DatasetError as e:
            raise api_error(e) from None

    @staticmethod
    def version_arg(k: str) -> int | None:
        if k == "latest":
            return None
        if not k.isdigit() or k.startswith("0") or len(k) > 9:
            raise APIError(
                400, f"Invalid version {k!r}: a positive integer, or 'latest'.", "bad_request"
            )
        return int(k)

    @staticmethod
    def sha_arg(sha: str) -> str:
        try:
            return validate_digest(sha)
        except DatasetError as e:
            raise APIError(400, e.message, "bad_request") from None

    def int_query(self, name: str, default: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        if not raw.isdigit():
            raise APIError(400, f"{name}={raw!r} must be a byte count >= 0.", "bad_request")
        return int(raw)


# ---- listing, info, sharing, removal -------------------------------------------------------


class DatasetsHandler(DatasetsBase):
    """``GET api/datasets[?scope=mine|team|public|all]``."""

    async def get(self) -> None:
        scope = self.get_query_argument("scope", "all")
        if scope not in SCOPES:
            raise APIError(
                400, f"Invalid scope {scope!r}; valid: {', '.join(SCOPES)}.", "bad_request"
            )
        out = await self.call(self.svc.list, self.caller, scope)
        self.write_json(DatasetList(datasets=out))


class DatasetHandler(DatasetsBase):
    """``GET api/datasets/NAME`` (info); ``PATCH`` (share, leaderboard); ``DELETE`` (rm)."""

    async def get(self, name: str) -> None:
        self.write_json(await self.call(self.svc.info, self.caller, name))

    async def patch(self, name: str) -> None:
        body = self.body_as(DatasetPatch)
        out = await self.call(
            self.svc.patch,
            self.caller,
            name,
            fields=set(body.model_fields_set),
            visibility=body.visibility,
            team=body.team,
            metric=body.metric,
            higher_is_better=body.higher_is_better,
            rules={
                k: getattr(body, k)
                for k in ("daily_limit", "eval_timeout_s", "eval_gpus", "closed")
                if k in body.model_fields_set
            },
        )
        self.write_json(out)

    async def delete(self, name: str) -> None:
        self.write_json(await self.call(self.svc.remove, self.caller, name, None))


class VersionHandler(DatasetsBase):
    """``GET api/datasets/NAME/versions/K`` (K or ``latest``); ``DELETE`` removes version K."""

    async def get(self, name: str, k: str) -> None:
        self.write_json(await self.call(self.svc.version, self.caller, name, self.version_arg(k)))

    async def delete(self, name: str, k: str) -> None:
        version = self.version_arg(k)
        if version is None:
            raise APIError(400, "Name the version to remove, e.g. versions/3.", "bad_request")
        self.write_json(await self.call(self.svc.remove, self.caller, name, version))


class ManifestHandler(DatasetsBase):
    """``GET api/datasets/NAME/versions/K/manifest[?split=test]``: the canonical manifest."""

    async def get(self, name: str, k: str) -> None:
        split = self.get_query_argument("split", "")
        digest, _ = await self.call(
            self.svc.digest_for, self.caller, name, self.version_arg(k), split=split, touch=True
        )
        data = await self.call(self.svc.manifest_bytes, digest)
        self.set_header("X-Manifest-Digest", digest)
        self.finish(data)


class BlobHandler(DatasetsBase):
    """``GET api/datasets/NAME/versions/K/blobs/SHA[?offset=N&split=test]``: raw bytes."""

    async def get(self, name: str, k: str, sha: str) -> None:
        sha = self.sha_arg(sha)
        split = self.get_query_argument("split", "")
        offset = self.int_query("offset", 0)
        digest, _ = await self.call(
            self.svc.digest_for, self.caller, name, self.version_arg(k), split=split
        )
        manifest = await self.call(self.svc.manifest, digest)
        size = manifest.blobs().get(sha)
        if size is None:
            raise APIError(
                404,
                f"Blob {sha} is not part of {name}@{k}{' (test)' if split else ''}.",
                "not_found",
            )
        if offset > size:
            raise APIError(400, f"offset={offset} is past the blob's {size} bytes.", "bad_request")
        try:
            f = await self.call(self.svc.store.open, sha)
        except APIError:
            log.error("blob %s of %s@%s is missing from the store", sha, name, k)
            raise APIError(
                500, f"Blob {sha} is missing from the store; tell an admin.", "store_damaged"
            ) from None
        try:
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Length", str(size - offset))
            if offset:
                f.seek(offset)
            while True:
                chunk = await self.svc.run(f.read, CHUNK)
                if not chunk:
                    break
                self.write(chunk)
                await self.flush()
        finally:
            f.close()
        self.finish()


class PackOutHandler(DatasetsBase):
    """``POST api/datasets/NAME/versions/K/pack`` ``{"blobs": [SHA...], "split": ""}``."""

    async def post(self, name: str, k: str) -> None:
        body = self.body_as(PackRequest)  # at most PACK_MAX_BLOBS hashes, "split": "" or "test"
        shas, split = list(body.blobs), body.split
        digest, _ = await self.call(
            self.svc.digest_for, self.caller, name, self.version_arg(k), split=split
        )
        blobs = (await self.call(self.svc.manifest, digest)).blobs()
        total = 0
        for sha in shas:
            if sha not in blobs:
                raise APIError(404, f"Blob {sha} is not part of {name}@{k}.", "not_found")
            if blobs[sha] > PACK_BLOB_MAX:
                raise APIError(
                    400,
                    f"Blob {sha} is larger than {PACK_BLOB_MAX} bytes: GET it alone.",
                    "bad_request",
                )
            total += blobs[sha]
        if total > PACK_MAX_BYTES:
            raise APIError(400, f"A pack holds at most {PACK_MAX_BYTES} bytes.", "bad_request")
        store = self.svc.store

        def read(batch: Sequence[str]) -> bytes:
            parts = []
            for sha in batch:
                with store.open(sha) as f:
                    parts.append(frame_header(sha, blobs[sha]))
                    parts.append(f.read())
            return b"".join(parts)

        self.set_header("Content-Type", "application/octet-stream")
        self.set_header(
            "Content-Length",
            str(sum(len(frame_header(s, blobs[s])) + blobs[s] for s in shas)),
        )
        i = 0
        while i < len(shas):
            j, size = i, 0
            while j < len(shas) and (j == i or size < CHUNK * 4):
                size += blobs[shas[j]]
                j += 1
            try:
                data = await self.svc.run(read, shas[i:j])
            except NotFound:
                log.error("a blob of %s@%s is missing from the store", name, k)
                raise APIError(
                    500, "A blob is missing from the store; tell an admin.", "store_damaged"
                ) from None
            self.write(data)
            await self.flush()
            i = j
        self.finish()


# ---- pushing -------------------------------------------------------------------------------


class UploadsHandler(DatasetsBase):
    """``POST api/datasets/NAME/uploads`` ``{"manifest": ..., "test_manifest": ...,
    "local_key": ...}``."""

    async def post(self, name: str) -> None:
        body = self.body_as(UploadIn)
        out = await self.call(
            self.svc.begin,
            self.caller,
            name,
            body.manifest,
            body.test_manifest,
            local_key=body.local_key,
        )
        self.write_json(out, status=200 if out.resumed else 201)


class UploadHandler(DatasetsBase):
    """``GET api/datasets/NAME/uploads/ID`` (what is missing); ``DELETE`` aborts it."""

    async def get(self, name: str, upload_id: str) -> None:
        self.write_json(await self.call(self.svc.status, self.caller, name, upload_id))

    async def delete(self, name: str, upload_id: str) -> None:
        await self.call(self.svc.abort, self.caller, name, upload_id)
        self.set_status(204)
        self.finish()


class CommitHandler(DatasetsBase):
    """``POST api/datasets/NAME/uploads/ID/commit``: the upload becomes ``NAME@k``."""

    async def post(self, name: str, upload_id: str) -> None:
        out = await self.call(self.svc.commit, self.caller, name, upload_id)
        self.write_json(out, status=201)


class GatheredBody(DatasetsBase):
    """A streamed request body gathered (no copy) up to :attr:`gather` bytes, then handed to
    :meth:`_work` in a worker thread while the next bytes are read.

    An error is kept and answered once the body has arrived: answering while the client still
    sends would reset the connection under it (the proxy then answers 503).
    """

    method = ""
    """The request method whose body is gathered (:meth:`_open` runs before it arrives)."""
    gather = 0
    """Bytes gathered before a worker thread takes them."""
    error: BaseException | None = None
    pending: asyncio.Future[None] | None = None

    async def prepare(self) -> None:
        self.chunks: list[bytes] = []
        self.gathered = 0
        try:
            await super().prepare()
            if self.request.method == self.method:
                await self._open()
        except Exception as e:
            self.error = e

    async def _open(self) -> None:
        """Check the request before its body arrives; ready what :meth:`_work` writes to."""

    def _accepts(self) -> bool:
        """Whether the body's bytes go anywhere (after :meth:`_open`)."""
        return True

    def _work(self, chunks: list[bytes], last: bool) -> None:
        """Take gathered chunks (in a worker thread); *last*: the body has ended."""
        raise NotImplementedError

    async def data_received(self, chunk: bytes) -> None:
        if self.error is not None or not self._accepts():
            return
        self.chunks.append(chunk)
        self.gathered += len(chunk)
        if self.gathered >= self.gather:
            await self._flush(last=False)

    async def _flush(self, *, last: bool) -> None:
        """Hand what was gathered to a worker thread (after the previous hand-over ends)."""
        await self._drain()
        chunks, self.chunks, self.gathered = self.chunks, [], 0
        if self.error is None and (chunks or last):
            self.pending = asyncio.ensure_future(self.svc.run(self._work, chunks, last))

    async def _drain(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            try:
                await pending
            except BaseException as e:
                self.error = self.error or e

    def _raise_error(self) -> None:
        """Answer the kept error, if any."""
        if self.error is not None:
            raise _api(self.error)


def _api(e: BaseException) -> BaseException:
    return api_error(e) if isinstance(e, DatasetError) else e


@web.stream_request_body
class BlobPutHandler(GatheredBody):
    """``PUT api/datasets/NAME/uploads/ID/blobs/SHA?offset=N``: a blob's bytes, streamed."""

    method = "PUT"
    gather = PUT_GATHER
    upload: Upload | None = None
    writer: PartWriter | None = None
    size: int = 0

    async def _open(self) -> None:
        name, upload_id, sha = self.path_args
        sha = self.sha_arg(sha)
        offset = self.int_query("offset", 0)
        svc = self.svc
        self.upload = await self.call(svc.upload_for_blob, self.caller, name, upload_id, sha)
        self.size = self.upload.manifest.blobs()[sha]
        if offset > self.size:
            raise APIError(
                400, f"offset={offset} is past the blob's {self.size} bytes.", "bad_request"
            )
        # A little over the blob's rest: a longer body is answered "more than its bytes".
        self.request.connection.set_max_body_size(self.size - offset + CHUNK)  # type: ignore[union-attr]
        self.writer = await self.call(svc.open_part, self.upload, sha, offset)

    def _accepts(self) -> bool:
        return self.writer is not None

    def _work(self, chunks: list[bytes], last: bool) -> None:
        writer = self.writer
        assert writer is not None
        for chunk in chunks:
            writer.write(chunk)

    async def put(self, name: str, upload_id: str, sha: str) -> None:
        writer = self.writer
        self._raise_error()
        if writer is None:  # already credited to this upload: received, or readable anyway
            self.write_json(BlobOut(blake3=sha, size=self.size, received=self.size, complete=True))
            return
        if self.chunks:
            await self._flush(last=True)
        await self._drain()
        self._raise_error()
        try:
            received = await self.svc.run(writer.finish)
        except BaseException as e:
            raise _api(e) from None
        if received < writer.size:
            assert self.upload is not None
            self.svc.keep_hasher(self.upload, writer)
        self.write_json(
            BlobOut(
                blake3=sha, size=writer.size, received=received, complete=received == writer.size
            )
        )

    def on_finish(self) -> None:
        self._close()

    def on_connection_close(self) -> None:
        # The client went away mid-blob: keep what arrived, with its hash state, for a resume
        # (unless a write is still running: the resume then re-reads the part to hash it).
        idle = self.pending is None or self.pending.done()
        if self.writer is not None and self.upload is not None and idle:
            self.svc.keep_hasher(self.upload, self.writer)
        self._close()

    def _close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is None:
            return
        if self.pending is not None and not self.pending.done():
            self.pending.add_done_callback(lambda _: writer.close())
        else:
            writer.close()


@web.stream_request_body
class PackInHandler(GatheredBody):
    """``POST api/datasets/NAME/uploads/ID/pack``: small blobs, each ``<sha> <size>\\n<bytes>``.

    What arrives is gathered (no copy) up to :data:`PACK_GATHER` bytes, then parsed, hashed
    and stored in one worker thread while the next bytes are read; only the unfinished tail
    of a batch is carried over to the next one.
    """

    method = "POST"
    gather = PACK_GATHER
    uploads: tuple[Upload, ...] = ()

    async def prepare(self) -> None:
        self.rest = b""
        self.count = self.stored = self.bytes = 0
        await super().prepare()

    async def _open(self) -> None:
        name, upload_id = self.path_args
        up, tup = await self.call(self.svc.uploads_of, self.caller, name, upload_id)
        self.uploads = (up,) if tup is None else (up, tup)
        self.request.connection.set_max_body_size(PACK_MAX_BYTES)  # type: ignore[union-attr]

    def _upload_of(self, sha: str) -> Upload:
        for u in self.uploads:
            if sha in u.manifest.blobs():
                return u
        raise APIError(404, f"Blob {sha} is not part of this upload.", "not_found")

    def _accepts(self) -> bool:
        return bool(self.uploads)

    def _work(self, chunks: list[bytes], last: bool) -> None:
        """Parse the complete blobs of ``rest + chunks``, verify and store them (a thread)."""
        data = b"".join([self.rest, *chunks]) if chunks else self.rest
        view = memoryview(data)
        pos = 0
        malformed = "Malformed pack: expected '<blake3> <size>\\n' before each blob."
        batch: list[tuple[Upload, str, memoryview]] = []
        while True:
            nl = data.find(b"\n", pos, pos + 100)
            if nl < 0:
                if len(data) - pos >= 100:
                    raise APIError(400, malformed, "bad_request")
                break
            try:
                sha_s, size_s = data[pos:nl].decode("ascii").split(" ")
                sha, size = self.sha_arg(sha_s), int(size_s)
            except (ValueError, UnicodeDecodeError, APIError):
                raise APIError(400, malformed, "bad_request") from None
            if not 0 <= size <= PACK_BLOB_MAX:
                raise APIError(
                    400,
                    f"Blob {sha} is larger than {PACK_BLOB_MAX} bytes: PUT it alone.",
                    "bad_request",
                )
            end = nl + 1 + size
            if len(data) < end:
                break
            batch.append((self._upload_of(sha), sha, view[nl + 1 : end]))
            self.count += 1
            pos = end
        self.rest = data[pos:]
        if last and self.rest:
            raise APIError(400, "Malformed pack: it ends inside a blob.", "bad_request")
        for u in self.uploads:
            items = [(sha, blob) for up, sha, blob in batch if up is u]
            if items:
                self.stored += u.put_blobs(items)
                self.bytes += sum(len(b) for _, b in items)

    async def post(self, name: str, upload_id: str) -> None:
        if self.error is None:
            await self._flush(last=True)
        await self._drain()
        self._raise_error()
        self.write_json(PackOut(blobs=self.count, stored=self.stored, bytes=self.bytes))


# ---- the store -----------------------------------------------------------------------------


class StoreHandler(DatasetsBase):
    """``GET api/dataset-store``: the limits; usage and the local cache for admins."""

    async def get(self) -> None:
        svc = self.svc
        out: dict[str, Any] = {
            "max_file_bytes": svc.max_file_bytes,
            "max_files": svc.max_files,
            "store_blobs": None,
            "store_bytes": None,
            "uploads_in_progress": None,
            "local_socket": svc.local.name if svc.local is not None else None,
        }
        if self.is_admin:
            usage = await svc.run(svc.store.usage)
            out.update(
                store_blobs=usage.blobs,
                store_bytes=usage.bytes,
                uploads_in_progress=len(await svc.run(svc.store.upload_ids)),
            )
            body = StoreOut(**out).model_dump()
            body["cache"] = await svc.run(svc.cache_paths)
            self.write_json(body)
            return
        self.write_json(StoreOut(**out))


class LocalGrantHandler(DatasetsBase):
    """``POST api/dataset-store/local`` ``{"dataset", "version", "split"}``: a key of the local
    transport (:mod:`nsml_datasets.local`) for the caller; with a dataset, it also opens that
    version's blobs, checked like a pull."""

    async def post(self) -> None:
        svc = self.svc
        if svc.local is None:
            raise APIError(
                404, "This server offers no local transport: use HTTP.", "local_unavailable"
            )
        body = self.body_as(LocalGrantIn)
        readable: dict[str, int] = {}
        version = None
        if body.dataset is not None:
            digest, version = await self.call(
                svc.digest_for, self.caller, body.dataset, body.version, split=body.split
            )
            readable = dict((await self.call(svc.manifest, digest)).blobs())
        key = svc.local.grants.issue(
            self.user_name, max_file_bytes=svc.max_file_bytes, readable=readable
        )
        self.write_json(
            LocalGrantOut(
                socket=svc.local.name,
                key=key,
                uid=svc.local.uid,
                expires_s=svc.local.grants.ttl_s,
                version=version,
            )
        )


class GcHandler(DatasetsBase):
    """``POST api/dataset-store/gc`` ``{"older_than_s": N}`` (admin): collect garbage now."""

    async def post(self) -> None:
        self.require_admin()
        body = self.body_as(GcIn)
        self.write_json(await self.call(self.svc.gc, body.older_than_s))


# ---- mounts --------------------------------------------------------------------------------


class MountsHandler(DatasetsBase):
    """``POST api/placements/ID/mounts[?wait_s=N]``: make the placement's datasets present on
    its node and hold them for it; 200 ready (with the mounts), 202 preparing, 409 failed."""

    async def post(self, pid: str) -> None:
        raw = self.get_query_argument("wait_s", "0")
        try:
            wait_s = min(300.0, max(0.0, float(raw)))
        except ValueError:
            raise APIError(400, f"wait_s={raw!r} must be seconds.", "bad_request") from None
        svc = self.svc
        out, todo = await self.call(svc.prepare_mounts, self.caller, int(pid))
        futures = await svc.ensure_filling(todo) if todo else []
        deadline = time.monotonic() + wait_s
        while out.state == "preparing":
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if futures:
                await asyncio.wait(futures, timeout=left)
                futures = []
            else:
                await asyncio.sleep(min(left, 0.2))
            out = await self.call(svc.mounts_state, int(pid))
        if out.state == "failed":
            raise APIError(
                409,
                f"The datasets of placement {pid} cannot be cached on {out.node}: {out.message}",
                "dataset_cache",
            )
        self.write_json(out, status=200 if out.state == "ready" else 202)


class NodeHoldsHandler(DatasetsBase):
    """``GET api/nodes/NAME/dataset-holds`` (admin, the node's agent): what to keep cached."""

    async def get(self, node: str) -> None:
        self.require_admin()
        self.write_json(HoldList(holds=await self.call(self.svc.holds_of_node, node)))


class NodeHoldHandler(DatasetsBase):
    """``PUT api/nodes/NAME/dataset-holds/ID`` ``{"state": "ready", "host_path": ...}``."""

    async def put(self, node: str, hold_id: str) -> None:
        self.require_admin()
        body = self.body_as(HoldPatch)
        out = await self.call(
            self.svc.report_hold, node, int(hold_id), body.state, body.host_path, body.message
        )
        self.write_json(out)


# ---- placements: whose datasets ------------------------------------------------------------

_GROUPS: dict[str, tuple[float, Caller]] = {}


async def caller_named(handler: APIHandler, user: str) -> Caller:
    """The caller *user* as the hub knows them (groups, admin), for acting on their behalf."""
    assert handler.hub_user is not None
    if user == handler.user_name and not handler.is_service:
        return Caller(
            user, frozenset(str(g) for g in handler.hub_user.get("groups") or ()), handler.is_admin
        )
    hit = _GROUPS.get(user)
    if hit is not None and time.monotonic() - hit[0] < 10:
        return hit[1]
    auth = handler.ctx.hub_auth
    url = f"{auth.api_url.rstrip('/')}/users/{quote(user, safe='')}"
    resp = await AsyncHTTPClient().fetch(
        HTTPRequest(url, headers={"Authorization": f"token {auth.api_token}"}, request_timeout=10),
        raise_error=False,
    )
    if resp.code == 404:
        c = Caller(user)
    elif resp.code != 200:
        log.error("cannot read hub user %s: HTTP %s", user, resp.code)
        raise APIError(
            503, "The hub could not say which teams the user is in; try again.", "hub_unavailable"
        )
    else:
        model = json.loads(resp.body)
        c = Caller(user, frozenset(model.get("groups") or ()), bool(model.get("admin")))
    _GROUPS[user] = (time.monotonic(), c)
    return c


async def dataset_resolver(
    handler: APIHandler, user: str, refs: Sequence[str]
) -> Callable[[list[str]], list[Resolved]]:
    """A function that resolves dataset references as *user* may read them (see
    :func:`nsml_server.datasets.resolve_refs`), for the placements API."""
    c = await caller_named(handler, user) if refs else Caller(user)

    def resolve(refs: list[str]) -> list[Resolved]:
        for ref in refs:
            parse(ref)
        with handler.ctx.db.session() as s:
            return _resolve(s, c.name, c.groups, c.is_admin, refs)

    return resolve

"""The OpenAPI 3.1 document: every route the server answers, with the rules it enforces.

Request and response bodies are the pydantic schemas the handlers use (their patterns and
bounds come with them). Path and query parameters are written here once, and the server
checks every request against these very rules (:mod:`nsml_server.api.routes`): the two
cannot disagree. ``tests/unit/test_openapi.py`` compares the document with the app's route
table, so a route cannot be added without its description.

Error answers are listed per operation from what the operation can refuse: 400 (a parameter
or body breaks its rule), 401/403 (token, permission), 404 (a named object that does not
exist), 503 (the hub cannot check the token), plus what the operation itself adds (409,
413, 422).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from nsml.downsample import MAX_POINTS, MIN_BUDGET
from nsml_datasets.names import NAME_MAX, VERSION_MAX

from ..images import NAME_MAX as IMAGE_NAME_MAX
from ..images import document_pattern
from ..models import NODE_STATES, PERMISSION_LEVELS, SESSION_STATES
from ..schemas import (
    CHECKPOINT_PATTERN,
    DATASET_NAME_PATTERN,
    NODE_NAME_PATTERN,
    AllocationOut,
    BillingTeamIn,
    BlobOut,
    BoardOut,
    CheckpointList,
    CheckpointOut,
    CodeOut,
    CreditEntryOut,
    CreditGrantIn,
    CreditPolicyIn,
    CreditPolicyOut,
    CreditsOut,
    DatasetInfo,
    DatasetList,
    DatasetPatch,
    DeletedOut,
    DiffOut,
    Error,
    EventList,
    ExecIn,
    ExecOut,
    ForkIn,
    GcIn,
    GcOut,
    GpuUseOut,
    Health,
    Heartbeat,
    HoldList,
    HoldOut,
    HoldPatch,
    LeaderboardRow,
    LevelLimitsIn,
    LevelsOut,
    LimitsOut,
    LocalGrantIn,
    LocalGrantOut,
    LogChunk,
    MeOut,
    MetricsAccepted,
    MetricsBatchOut,
    MetricsIn,
    MetricsOut,
    MountsOut,
    NodeList,
    NodeOut,
    NodePatch,
    PackOut,
    PackRequest,
    PlacementIn,
    PlacementList,
    PlacementOut,
    SessionIn,
    SessionList,
    SessionOut,
    SessionPatch,
    StoreOut,
    SubmissionIn,
    SubmissionList,
    SubmissionOut,
    TeamAdminIn,
    TeamIn,
    TeamList,
    TeamOut,
    UploadIn,
    UploadOut,
    UsageOut,
    UserLevelIn,
    UserLevelOut,
    VersionOut,
)
from .base import APIHandler, ServerContext
from .routes import INT32_MAX, INT64_MAX, INT64_MIN

MODELS: list[type[BaseModel]] = [
    Error,
    Health,
    Heartbeat,
    MeOut,
    UsageOut,
    NodeList,
    NodeOut,
    NodePatch,
    PlacementIn,
    PlacementOut,
    PlacementList,
    AllocationOut,
    BlobOut,
    DatasetInfo,
    DatasetList,
    DatasetPatch,
    DeletedOut,
    GcIn,
    GcOut,
    LocalGrantIn,
    LocalGrantOut,
    HoldList,
    HoldOut,
    HoldPatch,
    MountsOut,
    PackOut,
    PackRequest,
    StoreOut,
    UploadIn,
    UploadOut,
    VersionOut,
    CheckpointList,
    CheckpointOut,
    CodeOut,
    DiffOut,
    EventList,
    ExecIn,
    ExecOut,
    ForkIn,
    LogChunk,
    MetricsAccepted,
    MetricsIn,
    MetricsOut,
    MetricsBatchOut,
    GpuUseOut,
    SessionIn,
    SessionList,
    SessionOut,
    SessionPatch,
    BoardOut,
    LeaderboardRow,
    SubmissionIn,
    SubmissionList,
    SubmissionOut,
    CreditGrantIn,
    CreditEntryOut,
    CreditsOut,
    CreditPolicyIn,
    CreditPolicyOut,
    LevelLimitsIn,
    LimitsOut,
    LevelsOut,
    UserLevelIn,
    UserLevelOut,
    BillingTeamIn,
    TeamIn,
    TeamAdminIn,
    TeamOut,
    TeamList,
]

REQUEST_MODELS = {
    m for m in MODELS if m.__name__.endswith(("In", "Patch", "Request")) or m in (Heartbeat,)
}
"""Request bodies: described as the server validates them."""

ERROR_TEXT = {
    "400": "A parameter or the body breaks its rule; the message names it",
    "401": "Missing or invalid token",
    "402": "Not enough credits to start it: the message gives the balance, the cost per hour "
    "and how long it would run",
    "403": "The token lacks the scope, or the caller the permission",
    "404": "No such object (or one the caller may not see)",
    "409": "Not possible in the object's present state",
    "413": "The body is over the size limit",
    "422": "Valid, but can never be satisfied",
    "429": "Over a rate limit; the message says when to try again",
    "503": "The hub could not be reached to check the token; try again",
}


# ---- building blocks ---------------------------------------------------------------------------


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


def _path(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", **schema},
    }


def _query(name: str, description: str, required: bool = False, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "string", **schema},
    }


def _op(
    summary: str,
    responses: dict[str, Any],
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    errors: tuple[str, ...] = (),
    public: bool = False,
    description: str | None = None,
) -> dict[str, Any]:
    """One operation, with the errors every operation of its shape can answer added."""
    params = params or []
    codes = set(errors)
    if params or body:
        codes.add("400")
    if any(p["in"] == "path" for p in params):
        codes.add("404")
    if not public:
        codes |= {"401", "403", "503"}
    op: dict[str, Any] = {"summary": summary}
    if description:
        op["description"] = description
    if public:
        op["security"] = []
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    op["responses"] = {
        **responses,
        **{c: _json(Error, ERROR_TEXT[c]) for c in sorted(codes) if c not in responses},
    }
    return op


RAW = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
TAR = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
FLAG: dict[str, Any] = {"type": "string", "enum": ["0", "1", "true", "false"]}

# ---- parameters (the server checks each request against these) ---------------------------------

NODE = _path("name", "a node name", type="string", pattern=NODE_NAME_PATTERN)
PLACEMENT_ID = _path("id", "a placement request id", type="integer", minimum=1, maximum=INT32_MAX)
HOLD_ID = _path("id", "a dataset hold id", type="integer", minimum=1, maximum=INT32_MAX)
DATASET = _path(
    "name",
    f"a dataset name: 1 to {NAME_MAX} letters, digits, '.', '_' or '-'",
    type="string",
    pattern=DATASET_NAME_PATTERN,
)
VERSION = _path(
    "version",
    f"a version k (1 to {VERSION_MAX}), or 'latest'",
    type="string",
    pattern=r"^(latest|[1-9][0-9]{0,8})$",
)
VERSION_K = _path(
    "version", f"a version k (1 to {VERSION_MAX})", type="string", pattern=r"^[1-9][0-9]{0,8}$"
)
UPLOAD = _path("upload_id", "an upload id", type="string", pattern="^[0-9a-f]{32}$")
BLAKE3 = _path("blake3", "a file's BLAKE3 hash", type="string", pattern="^[0-9a-f]{64}$")
OFFSET = _query("offset", "byte offset to start from", type="integer", minimum=0, maximum=INT64_MAX)
SPLIT = _query("split", "'test': the hidden test split (admins)", type="string", enum=["", "test"])
SESSION_NAME = [
    _path("user", "the session's owner", type="string", minLength=1, maxLength=255),
    _path(
        "dataset",
        "the session's first dataset, or '_' for none",
        type="string",
        pattern=rf"^(_|{DATASET_NAME_PATTERN.strip('^$')})$",
    ),
    _path("n", "the session's number", type="integer", minimum=1, maximum=INT32_MAX),
]
SESSION_REF = {
    "type": "string",
    "maxLength": 400,
    "pattern": rf"^[^/]+/(_|{DATASET_NAME_PATTERN.strip('^$')})/[1-9][0-9]{{0,9}}$",
}
CHECKPOINT = _path("checkpoint", "a checkpoint name", type="string", pattern=CHECKPOINT_PATTERN)


# ---- the document ------------------------------------------------------------------------------


def core_paths() -> dict[str, Any]:
    """Health, the document itself, the caller, usage, nodes and placements."""
    return {
        "/health": {
            "get": _op(
                "Liveness and database state (no authentication)",
                {"200": _json(Health, "Healthy"), "503": _json(Health, "Degraded")},
                public=True,
            )
        },
        "/openapi.json": {
            "get": _op(
                "This document (no authentication)",
                {
                    "200": {
                        "description": "The OpenAPI document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
                public=True,
            )
        },
        "/me": {
            "get": _op("The caller: name, permission level, credits", {"200": _json(MeOut, "Me")})
        },
        "/usage": {
            "get": _op(
                "GPU time held by a user's notebook servers and sessions",
                {"200": _json(UsageOut, "GPU time per kind and allocation")},
                params=[
                    _query("user", "another user (admin); default: the caller", maxLength=255),
                    _query(
                        "since",
                        "count only time after this instant (ISO 8601)",
                        type="string",
                        format="date-time",
                    ),
                ],
            )
        },
        "/nodes": {
            "get": _op(
                "Nodes and their GPUs (docker_url: admins only)",
                {"200": _json(NodeList, "Nodes")},
                params=[_query("state", "only nodes in this state", enum=list(NODE_STATES))],
            )
        },
        "/nodes/{name}": {
            "get": _op("One node", {"200": _json(NodeOut, "The node")}, params=[NODE]),
            "patch": _op(
                "Drain, undrain or mark a node down (admin)",
                {"200": _json(NodeOut, "The node")},
                params=[NODE],
                body=_body(NodePatch),
            ),
        },
        "/nodes/{name}/heartbeat": {
            "put": _op(
                "A node agent's report (admin token); registers the node when new",
                {"200": _json(NodeOut, "The node as registered")},
                params=[NODE],
                body=_body(Heartbeat),
            )
        },
        "/placements": {
            "get": _op(
                "The caller's placement requests (admin: all=1)",
                {"200": _json(PlacementList, "Oldest first")},
                params=[
                    _query(
                        "state",
                        "only requests in this state",
                        enum=["waiting", "placed", "released", "failed", "cancelled"],
                    ),
                    _query("all", "1: every user's (admin)", **FLAG),
                ],
            ),
            "post": _op(
                "Ask the scheduler for resources on one node (the same holder again returns "
                "the same request)",
                {
                    "201": _json(PlacementOut, "Placed"),
                    "202": _json(PlacementOut, "Waiting in the queue"),
                    "200": _json(PlacementOut, "The holder's existing request"),
                },
                body=_body(PlacementIn),
                errors=("402", "404", "422"),
            ),
        },
        "/placements/{id}": {
            "get": _op(
                "One placement request", {"200": _json(PlacementOut, "The request")}, [PLACEMENT_ID]
            ),
            "delete": _op(
                "Cancel a waiting request or release its resources (idempotent)",
                {"200": _json(PlacementOut, "The request, cancelled or released")},
                [PLACEMENT_ID],
            ),
        },
    }


def dataset_paths() -> dict[str, Any]:
    """The ``datasets``, ``dataset-store``, mounts and dataset-hold endpoints."""
    c = ("409",)
    return {
        "/datasets": {
            "get": _op(
                "Datasets the caller can read: theirs, their teams', public ones",
                {"200": _json(DatasetList, "Datasets")},
                params=[_query("scope", "which ones", enum=["mine", "team", "public", "all"])],
            )
        },
        "/datasets/{name}": {
            "get": _op("A dataset and its versions", {"200": _json(DatasetInfo, "It")}, [DATASET]),
            "patch": _op(
                "Share it (private, team, public) or set its leaderboard (owner)",
                {"200": _json(DatasetInfo, "The dataset")},
                [DATASET],
                _body(DatasetPatch),
                errors=c,
            ),
            "delete": _op(
                "Remove the dataset and every version (owner; 409 while in use)",
                {"200": _json(DeletedOut, "What was removed")},
                [DATASET],
                errors=c,
            ),
        },
        "/datasets/{name}/versions/{version}": {
            "get": _op(
                "One version", {"200": _json(VersionOut, "The version")}, [DATASET, VERSION]
            ),
            "delete": _op(
                "Remove one version (owner; 409 while in use); k is never reused",
                {"200": _json(DeletedOut, "What was removed")},
                [DATASET, VERSION_K],
                errors=c,
            ),
        },
        "/datasets/{name}/versions/{version}/manifest": {
            "get": _op(
                "The version's canonical manifest (X-Manifest-Digest is its BLAKE3); "
                "split=test: the hidden test split (admins)",
                {
                    "200": {
                        "description": "The manifest",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
                [DATASET, VERSION, SPLIT],
            )
        },
        "/datasets/{name}/versions/{version}/blobs/{blake3}": {
            "get": _op(
                "One file's bytes by content hash, from byte offset (only a file of this "
                "version: 404 for any other hash)",
                {"200": {"description": "The bytes", "content": RAW}},
                [DATASET, VERSION, BLAKE3, OFFSET, SPLIT],
            )
        },
        "/datasets/{name}/versions/{version}/pack": {
            "post": _op(
                "Many small files at once: each as '<blake3> <size>\\n' and its bytes",
                {"200": {"description": "The pack", "content": RAW}},
                [DATASET, VERSION],
                _body(PackRequest),
            )
        },
        "/datasets/{name}/uploads": {
            "post": _op(
                "Begin pushing a new version (the same manifest resumes its upload); "
                "answers the blobs to send: all but those of versions the caller may read",
                {
                    "201": _json(UploadOut, "A new upload"),
                    "200": _json(UploadOut, "The upload of the same manifest, resumed"),
                },
                [DATASET],
                _body(UploadIn),
                errors=c,
            )
        },
        "/datasets/{name}/uploads/{upload_id}": {
            "get": _op(
                "What the upload still lacks", {"200": _json(UploadOut, "It")}, [DATASET, UPLOAD]
            ),
            "delete": _op(
                "Abort the upload", {"204": {"description": "Aborted"}}, [DATASET, UPLOAD], errors=c
            ),
        },
        "/datasets/{name}/uploads/{upload_id}/blobs/{blake3}": {
            "put": _op(
                "A file's bytes (streamed; from offset to resume), checked by hash",
                {"200": _json(BlobOut, "Bytes received so far")},
                [DATASET, UPLOAD, BLAKE3, OFFSET],
                {"required": True, "content": RAW},
                errors=c,
            )
        },
        "/datasets/{name}/uploads/{upload_id}/pack": {
            "post": _op(
                "Many small files at once: each as '<blake3> <size>\\n' and its bytes",
                {"200": _json(PackOut, "Stored")},
                [DATASET, UPLOAD],
                {"required": True, "content": RAW},
                errors=c,
            )
        },
        "/datasets/{name}/uploads/{upload_id}/commit": {
            "post": _op(
                "Make the upload the next version NAME@k (immutable)",
                {"201": _json(VersionOut, "The new version")},
                [DATASET, UPLOAD],
                errors=c,
            )
        },
        "/dataset-store": {
            "get": _op(
                "Limits of a version; store usage and the local cache (admins)",
                {"200": _json(StoreOut, "The store")},
            )
        },
        "/dataset-store/local": {
            "post": _op(
                "A key of the local transport (clients on the server's machine hand files "
                "over as descriptors); with a dataset, it opens that version's blobs",
                {"200": _json(LocalGrantOut, "The key")},
                body=_body(LocalGrantIn),
                errors=("404",),
            )
        },
        "/dataset-store/gc": {
            "post": _op(
                "Remove stale uploads and blobs no version needs (admin)",
                {"200": _json(GcOut, "What was removed")},
                body=_body(GcIn),
                errors=c,
            )
        },
        "/placements/{id}/mounts": {
            "post": _op(
                "Make the placement's datasets present on its node, held for it; the "
                "read-only mounts (/data/NAME)",
                {
                    "200": _json(MountsOut, "Ready: mount these"),
                    "202": _json(MountsOut, "Still being cached on the node; ask again"),
                },
                [
                    PLACEMENT_ID,
                    _query(
                        "wait_s",
                        "seconds to wait until ready",
                        type="number",
                        minimum=0,
                        maximum=300,
                    ),
                ],
                errors=c,
            )
        },
        "/nodes/{name}/dataset-holds": {
            "get": _op(
                "Dataset versions a node's agent must keep cached (admin, agents); a long poll "
                "with If-None-Match (the last ETag) and Prefer: wait=N (at most 30 s)",
                {"200": _json(HoldList, "The node's holds")},
                [NODE],
            )
        },
        "/nodes/{name}/dataset-holds/{id}": {
            "put": _op(
                "A node agent reports a hold ready (with its path) or failed",
                {"200": _json(HoldOut, "The hold")},
                [NODE, HOLD_ID],
                _body(HoldPatch),
                errors=c,
            )
        },
    }


def _metric_queries() -> list[dict[str, Any]]:
    """The query parameters that choose and shape metric series."""
    return [
        _query("names", "comma-separated metric names", maxLength=500),
        _query(
            "since_step",
            "only points from this step on",
            type="integer",
            minimum=INT64_MIN,
            maximum=INT64_MAX,
        ),
        _query(
            "to_step",
            "only points up to this step (with since_step: the range a zoomed plot shows)",
            type="integer",
            minimum=INT64_MIN,
            maximum=INT64_MAX,
        ),
        _query(
            "max_points",
            "at most this many points per series: downsampled (LTTB) keeping the curve's "
            "shape, its minimum and maximum and every NaN or infinity; each series' total "
            "says how many there were",
            type="integer",
            minimum=MIN_BUDGET,
            maximum=MAX_POINTS,
        ),
    ]


def session_paths() -> dict[str, Any]:
    """The session endpoints (``{user}/{dataset}/{n}`` is the session's name)."""
    s = "/sessions/{user}/{dataset}/{n}"
    name = SESSION_NAME
    c = ("409",)
    return {
        "/code": {
            "post": _op(
                "Upload a code snapshot (tar, gzip allowed) -> its digest",
                {"201": _json(CodeOut, "Stored")},
                body={"required": True, "content": TAR},
                errors=("413",),
            )
        },
        "/metrics": {
            "get": _op(
                "Several sessions' metrics at once (a comparison panel's one request)",
                {"200": _json(MetricsBatchOut, "The readable sessions' metrics; errors")},
                [
                    _query(
                        "sessions",
                        "comma-separated session names USER/DATASET/N (at most 1,000 "
                        "characters, so that the URL stays under 16 KB however they encode: "
                        "ask for more sessions in several requests)",
                        required=True,
                        minLength=1,
                        maxLength=1_000,  # configurable-http-proxy (Node.js): 16 KB of headers
                    ),
                    *_metric_queries(),
                ],
            )
        },
        "/sessions": {
            "get": _op(
                "The caller's sessions (admin: all=1 or user=NAME; teams=1: also their teams')",
                {"200": _json(SessionList, "Oldest first")},
                params=[
                    _query("state", "a state, or 'active'", enum=["active", *SESSION_STATES]),
                    _query("all", "1: every user's (admin)", **FLAG),
                    _query(
                        "teams",
                        "1: also the team sessions (visibility 'team') of the caller's teams "
                        "(their JupyterHub groups), whoever owns them",
                        **FLAG,
                    ),
                    _query("user", "another user's (admin)", minLength=1, maxLength=255),
                    _query(
                        "dataset",
                        "only sessions named USER/DATASET/N",
                        pattern=rf"^(_|{DATASET_NAME_PATTERN.strip('^$')})$",
                    ),
                    _query(
                        "limit",
                        "the newest N (default 200)",
                        type="integer",
                        minimum=1,
                        maximum=10_000,
                    ),
                ],
            ),
            "post": _op(
                "Start a session",
                {"201": _json(SessionOut, "Queued")},
                body=_body(SessionIn),
                errors=("402", "404"),
            ),
        },
        "/sessions/diff": {
            "get": _op(
                "Differences between two sessions: arguments, settings, code",
                {"200": _json(DiffOut, "The differences")},
                params=[
                    _query("a", "a session name USER/DATASET/N", True, **SESSION_REF),
                    _query("b", "a session name USER/DATASET/N", True, **SESSION_REF),
                ],
                errors=("404",),
            )
        },
        s: {
            "get": _op("One session", {"200": _json(SessionOut, "The session")}, name),
            "patch": _op(
                "Change its memo or visibility",
                {"200": _json(SessionOut, "The session")},
                name,
                _body(SessionPatch),
            ),
            "delete": _op(
                "Remove an ended session with its logs, metrics and checkpoints",
                {"204": {"description": "Removed"}},
                name,
                errors=c,
            ),
        },
        s + "/stop": {
            "post": _op(
                "Stop: SIGTERM, the grace period, then SIGKILL (the owner, an admin, or a "
                "team admin of the session's team)",
                {
                    "202": _json(SessionOut, "Stopping"),
                    "200": _json(SessionOut, "Had already ended"),
                },
                name,
            )
        },
        s + "/resume": {
            "post": _op(
                "Run an ended session again from its last checkpoint",
                {"202": _json(SessionOut, "Queued")},
                name,
                errors=(*c, "402"),
            )
        },
        s + "/fork": {
            "post": _op(
                "A new session from this one (and a checkpoint), with edits",
                {"201": _json(SessionOut, "The child, queued")},
                name,
                _body(ForkIn),
                errors=("402",),
            )
        },
        s + "/logs": {
            "get": _op(
                "The stored output (stdout and stderr)",
                {"200": _json(LogChunk, "A piece of the log")},
                [
                    *name,
                    _query(
                        "offset",
                        "byte offset to read from",
                        type="integer",
                        minimum=0,
                        maximum=INT64_MAX,
                    ),
                    _query(
                        "limit",
                        "most bytes (default and maximum 4 MiB)",
                        type="integer",
                        minimum=0,
                        maximum=4 * 1024 * 1024,
                    ),
                    _query(
                        "tail",
                        "the last N lines instead",
                        type="integer",
                        minimum=0,
                        maximum=INT32_MAX,
                    ),
                ],
            )
        },
        s + "/gpu": {
            "get": _op(
                "The session's GPU use over time: utilisation and memory of each of its GPUs, "
                "one sample per node heartbeat, older samples merged (bounded)",
                {"200": _json(GpuUseOut, "The samples, oldest first")},
                name,
            )
        },
        s + "/events": {
            "get": _op(
                "The session's state changes and failures",
                {"200": _json(EventList, "Oldest first")},
                name,
            )
        },
        s + "/metrics": {
            "get": _op(
                "Last values and per-step series of the reported metrics",
                {"200": _json(MetricsOut, "The metrics")},
                [*name, *_metric_queries()],
            ),
            "post": _op(
                "Report points (session token or owner)",
                {"200": _json(MetricsAccepted, "Stored")},
                name,
                _body(MetricsIn),
                errors=c,
            ),
        },
        s + "/checkpoints": {
            "get": _op(
                "The saved checkpoints", {"200": _json(CheckpointList, "Oldest first")}, name
            )
        },
        s + "/checkpoints/{checkpoint}": {
            "put": _op(
                "Save a checkpoint (a tar archive; session token or owner)",
                {"201": _json(CheckpointOut, "Saved")},
                [
                    *name,
                    CHECKPOINT,
                    _query(
                        "step",
                        "the step it was saved at",
                        type="integer",
                        minimum=INT64_MIN,
                        maximum=INT64_MAX,
                    ),
                ],
                {"required": True, "content": TAR},
                errors=("409", "413"),
            ),
            "get": _op(
                "Download a checkpoint (the tar archive)",
                {"200": {"description": "The archive", "content": TAR}},
                [*name, CHECKPOINT],
            ),
        },
        s + "/exec": {
            "post": _op(
                "Run a command inside the running session's container",
                {"200": _json(ExecOut, "Its exit code and output")},
                name,
                _body(ExecIn),
                errors=c,
            )
        },
        "/events": {
            "get": _op(
                "The caller's event feed: state changes and failures of sessions",
                {"200": _json(EventList, "Oldest first")},
                params=[
                    _query(
                        "since",
                        "only events after this id",
                        type="integer",
                        minimum=0,
                        maximum=INT32_MAX,
                    ),
                    _query(
                        "limit",
                        "at most this many (default 100)",
                        type="integer",
                        minimum=1,
                        maximum=1000,
                    ),
                    _query("all", "1: every user's (admin)", **FLAG),
                ],
            )
        },
        "/events/stream": {
            "get": _op(
                "The caller's events, live, as server-sent events",
                {
                    "200": {
                        "description": (
                            "text/event-stream that does not end while the client listens: "
                            "'session' events (id = the event feed's id; data: the event and "
                            "the session's state, reason, exit code, GPUs and queue position "
                            "now), 'submission' events (a submission changed state), 'credit' "
                            "events (the balance changed), ': heartbeat' comments, and 'reset' "
                            "when the client fell too far behind (reconnect)"
                        ),
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    }
                },
                params=[
                    _query(
                        "since",
                        "replay the session events after this id first (the Last-Event-ID "
                        "header, which a reconnecting EventSource sends, takes precedence)",
                        type="integer",
                        minimum=0,
                        maximum=INT32_MAX,
                    ),
                    _query("all", "1: every user's (admin)", **FLAG),
                ],
            )
        },
    }


def leaderboard_paths() -> dict[str, Any]:
    """Submissions and each dataset's leaderboard."""
    return {
        "/submissions": {
            "get": _op(
                "The caller's submissions (admin: all=1), oldest first",
                {"200": _json(SubmissionList, "Oldest first")},
                params=[
                    _query("all", "1: every user's (admin)", **FLAG),
                    _query("dataset", "only those to this dataset", pattern=DATASET_NAME_PATTERN),
                ],
            ),
            "post": _op(
                "Submit a session's checkpoint to its dataset's leaderboard",
                {"201": _json(SubmissionOut, "Queued for evaluation")},
                body=_body(SubmissionIn),
                errors=("402", "404", "409", "429"),
                description="The evaluation runs the session's code and image without network "
                "on the hidden test inputs; the server scores its predictions against labels "
                "no user code can read.",
            ),
        },
        "/submissions/{id}": {
            "get": _op(
                "One submission (its submitter or an admin)",
                {"200": _json(SubmissionOut, "The submission")},
                params=[
                    _path("id", "a submission id", type="integer", minimum=1, maximum=INT32_MAX)
                ],
            )
        },
        "/datasets/{name}/leaderboard": {
            "get": _op(
                "A dataset's leaderboard (whoever may read the dataset)",
                {"200": _json(BoardOut, "Best first; a tie goes to the earlier submission")},
                params=[
                    DATASET,
                    _query("all", "1: every submission, not each user's best", **FLAG),
                ],
            )
        },
    }


USER = _path("name", "a hub user name", type="string", minLength=1, maxLength=255)
TEAM = _path("name", "a team (a hub group's name)", type="string", minLength=1, maxLength=255)
HISTORY = [
    _query("limit", "most ledger rows, newest first", type="integer", minimum=0, maximum=1000),
    _query("days", "days of usage per day", type="integer", minimum=1, maximum=366),
]


def _opp(path: list[dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`_op` with the path parameters *path* before its own."""
    kwargs["params"] = path + list(kwargs.get("params") or [])
    return _op(*args, **kwargs)


def credit_paths() -> dict[str, Any]:
    """Credits, the credit policy, permission levels and teams."""

    def grant(path: dict[str, Any]) -> dict[str, Any]:
        return _op(
            "Give credits (admin); a negative amount deducts, never below zero",
            {"201": _json(CreditEntryOut, "The ledger row")},
            params=[path],
            body=_body(CreditGrantIn),
            errors=("404", "409"),
        )

    return {
        "/users/{name}/credits": {
            "get": _opp(
                [USER],
                "A user's balance, burn rate, time left, ledger and usage per day (the user "
                "or an admin)",
                {"200": _json(CreditsOut, "The account")},
                params=HISTORY,
            ),
            "post": grant(USER),
        },
        "/users/{name}/level": {
            "get": _opp(
                [USER],
                "A user's permission level and limits (the user or an admin)",
                {"200": _json(UserLevelOut, "Level and limits")},
            ),
            "put": _opp(
                [USER],
                "Set a user's level and limit overrides (admin)",
                {"200": _json(UserLevelOut, "Level and limits")},
                body=_body(UserLevelIn),
            ),
        },
        "/users/{name}/team": {
            "put": _opp(
                [USER],
                "Set which team's pool pays for a user's work (admin or team admin)",
                {"200": _json(UserLevelOut, "Level, limits and billing team")},
                body=_body(BillingTeamIn),
                errors=("404", "409"),
            ),
        },
        "/credits/policy": {
            "get": _op("The credit policy", {"200": _json(CreditPolicyOut, "The policy")}),
            "put": _op(
                "Change the credit policy (admin); fields not given keep their value",
                {"200": _json(CreditPolicyOut, "The policy now in force")},
                body=_body(CreditPolicyIn),
            ),
        },
        "/levels": {
            "get": _op(
                "The limits of each permission level (admin)",
                {"200": _json(LevelsOut, "Per level")},
            )
        },
        "/levels/{level}": {
            "put": _op(
                "Set a permission level's limits (admin)",
                {"200": _json(LimitsOut, "The level's limits")},
                params=[
                    _path(
                        "level", "a permission level", type="string", enum=list(PERMISSION_LEVELS)
                    )
                ],
                body=_body(LevelLimitsIn),
            )
        },
        "/teams": {"get": _op("Every team (admin)", {"200": _json(TeamList, "Teams")})},
        "/teams/{name}": {
            "get": _opp(
                [TEAM], "One team (admin or its team admins)", {"200": _json(TeamOut, "The team")}
            ),
            "put": _opp(
                [TEAM],
                "Create a team or set whether its pool pays (admin)",
                {"200": _json(TeamOut, "The team")},
                body=_body(TeamIn),
            ),
        },
        "/teams/{name}/credits": {
            "get": _opp(
                [TEAM],
                "A team pool's balance, burn rate, ledger (admins, its admins and members)",
                {"200": _json(CreditsOut, "The pool")},
                params=HISTORY,
            ),
            "post": grant(TEAM),
        },
        "/teams/{name}/members/{user}": {
            "put": _opp(
                [TEAM, _path("user", "a hub user name", minLength=1, maxLength=255)],
                "Add a user to a team (an admin or a team admin of the team); the service "
                "adds them to the hub group, which stays the source of membership",
                {"200": _json(TeamOut, "The team, its members as the hub answered")},
                errors=("404",),
            ),
            "delete": _opp(
                [TEAM, _path("user", "a hub user name", minLength=1, maxLength=255)],
                "Remove a user from a team (an admin or a team admin of the team), through the hub",
                {"200": _json(TeamOut, "The team, its members as the hub answered")},
                errors=("404",),
            ),
        },
        "/teams/{name}/admins/{user}": {
            "put": _opp(
                [TEAM, _path("user", "a hub user name", minLength=1, maxLength=255)],
                "Make a user an admin of a team, or not (admin)",
                {"200": _json(TeamOut, "The team")},
                body=_body(TeamAdminIn),
                errors=("404",),
            ),
        },
    }


def openapi_document(
    version: str, base_url: str, allowed_images: Sequence[str] | None = None
) -> dict[str, Any]:
    """The API description served at ``api/openapi.json``.

    With *allowed_images* (the server's ``allowed_images``), every request field ``image``
    carries the pattern of the images this server runs, so that a request the document
    accepts is not refused for its image.
    """
    _, defs = models_json_schema(
        [(m, "validation" if m in REQUEST_MODELS else "serialization") for m in MODELS],
        ref_template="#/components/schemas/{model}",
    )
    if allowed_images is not None:
        pattern = document_pattern(allowed_images)
        for model in REQUEST_MODELS:
            _constrain_image(defs["$defs"].get(model.__name__, {}), pattern, allowed_images)
    paths: dict[str, Any] = {}
    paths.update(core_paths())
    paths.update(session_paths())
    paths.update(dataset_paths())
    paths.update(leaderboard_paths())
    paths.update(credit_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "NSML API", "version": version},
        "servers": [{"url": base_url.rstrip("/") + "/api"}],
        "security": [{"token": []}],
        "paths": paths,
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {
                "token": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "'token <JupyterHub API token>'",
                }
            },
        },
    }


def _constrain_image(schema: dict[str, Any], pattern: str, allowed: Sequence[str]) -> None:
    """Give the string form of *schema*'s ``image`` property the allowed images' *pattern*."""
    field = schema.get("properties", {}).get("image")
    if field is None:
        return
    for branch in field.get("anyOf", [field]):
        if branch.get("type") == "string":
            branch["pattern"] = pattern
            branch["maxLength"] = min(branch.get("maxLength", IMAGE_NAME_MAX), IMAGE_NAME_MAX)
    field["description"] = (
        (field.get("description", "") + "; " if field.get("description") else "")
        + "one of the images this server allows: "
        + ", ".join(allowed)
    )


class OpenAPIHandler(APIHandler):
    """``GET api/openapi.json`` (no authentication)."""

    auth_required = False

    def initialize(self, ctx: ServerContext, document: dict[str, Any]) -> None:  # type: ignore[override]
        super().initialize(ctx)
        self.document = document

    def get(self) -> None:
        self.write_json(self.document)

"""The OpenAPI 3.1 document, built from the pydantic schemas the handlers use."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ..schemas import (
    BlobOut,
    DatasetInfo,
    DatasetList,
    DatasetPatch,
    DeletedOut,
    Error,
    GcIn,
    GcOut,
    Health,
    Heartbeat,
    HoldList,
    HoldOut,
    HoldPatch,
    LocalGrantIn,
    LocalGrantOut,
    MeOut,
    MountsOut,
    NodeList,
    NodeOut,
    NodePatch,
    PackOut,
    StoreOut,
    UploadIn,
    UploadOut,
    UsageOut,
    VersionOut,
)

MODELS: list[type[BaseModel]] = [
    Error,
    Health,
    Heartbeat,
    MeOut,
    UsageOut,
    NodeList,
    NodeOut,
    NodePatch,
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
    StoreOut,
    UploadIn,
    UploadOut,
    VersionOut,
]


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


ERRORS = {
    "400": _json(Error, "Malformed request; the message names each bad field"),
    "401": _json(Error, "Missing or invalid token"),
    "403": _json(Error, "Token lacks the scope or the caller lacks the permission"),
    "404": _json(Error, "No such object"),
}

DATASET_ERRORS = {
    **ERRORS,
    "403": _json(Error, "The caller may read the dataset but not change it (not its owner)"),
    "404": _json(Error, "No such dataset, version, upload or blob, or one the caller may not read"),
    "409": _json(Error, "In use, incomplete, name taken, or not where the upload stands"),
}

RAW = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def _param(name: str, where: str = "path", **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema or {"type": "string"},
    }


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


def dataset_paths() -> dict[str, Any]:
    """The ``datasets``, ``dataset-store`` and mounts endpoints."""
    name = _param("name", pattern="^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version = _param("version", description="k, or 'latest'")
    upload = _param("upload_id", pattern="^[0-9a-f]{32}$")
    sha = _param("blake3", pattern="^[0-9a-f]{64}$")
    offset = _param("offset", "query", type="integer", minimum=0)
    split = _param("split", "query", type="string", enum=["test"])
    e = DATASET_ERRORS
    return {
        "/datasets": {
            "get": {
                "summary": "Datasets the caller can read: theirs, their teams', public ones",
                "parameters": [
                    _param("scope", "query", type="string", enum=["mine", "team", "public", "all"])
                ],
                "responses": {"200": _json(DatasetList, "Datasets"), **e},
            }
        },
        "/datasets/{name}": {
            "get": {
                "summary": "A dataset and its versions",
                "parameters": [name],
                "responses": {"200": _json(DatasetInfo, "The dataset"), **e},
            },
            "patch": {
                "summary": "Share it (private, team, public) or set its leaderboard (owner)",
                "parameters": [name],
                "requestBody": _body(DatasetPatch),
                "responses": {"200": _json(DatasetInfo, "The dataset"), **e},
            },
            "delete": {
                "summary": "Remove the dataset and every version (owner; 409 while in use)",
                "parameters": [name],
                "responses": {"200": _json(DeletedOut, "What was removed"), **e},
            },
        },
        "/datasets/{name}/versions/{version}": {
            "get": {
                "summary": "One version",
                "parameters": [name, version],
                "responses": {"200": _json(VersionOut, "The version"), **e},
            },
            "delete": {
                "summary": "Remove one version (owner; 409 while in use); k is never reused",
                "parameters": [name, version],
                "responses": {"200": _json(DeletedOut, "What was removed"), **e},
            },
        },
        "/datasets/{name}/versions/{version}/manifest": {
            "get": {
                "summary": "The version's canonical manifest (X-Manifest-Digest is its BLAKE3); "
                "split=test: the hidden test split (admins)",
                "parameters": [name, version, split],
                "responses": {"200": {"description": "The manifest (JSON)"}, **e},
            }
        },
        "/datasets/{name}/versions/{version}/blobs/{blake3}": {
            "get": {
                "summary": "One file's bytes by content hash, from byte offset (only a file "
                "of this version: 404 for any other hash)",
                "parameters": [name, version, sha, offset, split],
                "responses": {"200": {"description": "The bytes", "content": RAW}, **e},
            }
        },
        "/datasets/{name}/versions/{version}/pack": {
            "post": {
                "summary": "Many small files at once: each as '<blake3> <size>\\n' and its bytes",
                "parameters": [name, version],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "blobs": {"type": "array", "items": {"type": "string"}},
                                    "split": {"type": "string", "enum": ["", "test"]},
                                },
                                "required": ["blobs"],
                            }
                        }
                    },
                },
                "responses": {"200": {"description": "The pack", "content": RAW}, **e},
            }
        },
        "/datasets/{name}/uploads": {
            "post": {
                "summary": "Begin pushing a new version (the same manifest resumes its upload); "
                "answers the blobs to send: all but those of versions the caller may read",
                "parameters": [name],
                "requestBody": _body(UploadIn),
                "responses": {
                    "201": _json(UploadOut, "A new upload"),
                    "200": _json(UploadOut, "The upload of the same manifest, resumed"),
                    **e,
                },
            }
        },
        "/datasets/{name}/uploads/{upload_id}": {
            "get": {
                "summary": "What the upload still lacks",
                "parameters": [name, upload],
                "responses": {"200": _json(UploadOut, "The upload"), **e},
            },
            "delete": {
                "summary": "Abort the upload",
                "parameters": [name, upload],
                "responses": {"204": {"description": "Aborted"}, **e},
            },
        },
        "/datasets/{name}/uploads/{upload_id}/blobs/{blake3}": {
            "put": {
                "summary": "A file's bytes (streamed; from offset to resume), checked by hash",
                "parameters": [name, upload, sha, offset],
                "requestBody": {"required": True, "content": RAW},
                "responses": {"200": _json(BlobOut, "Bytes received so far"), **e},
            }
        },
        "/datasets/{name}/uploads/{upload_id}/pack": {
            "post": {
                "summary": "Many small files at once: each as '<blake3> <size>\\n' and its bytes",
                "parameters": [name, upload],
                "requestBody": {"required": True, "content": RAW},
                "responses": {"200": _json(PackOut, "Stored"), **e},
            }
        },
        "/datasets/{name}/uploads/{upload_id}/commit": {
            "post": {
                "summary": "Make the upload the next version NAME@k (immutable)",
                "parameters": [name, upload],
                "responses": {"201": _json(VersionOut, "The new version"), **e},
            }
        },
        "/dataset-store": {
            "get": {
                "summary": "Limits of a version; store usage and the local cache (admins)",
                "responses": {"200": _json(StoreOut, "The store"), **ERRORS},
            }
        },
        "/dataset-store/local": {
            "post": {
                "summary": "A key of the local transport (clients on the server's machine hand "
                "files over as descriptors); with a dataset, it opens that version's blobs",
                "requestBody": _body(LocalGrantIn),
                "responses": {"200": _json(LocalGrantOut, "The key"), **e},
            }
        },
        "/dataset-store/gc": {
            "post": {
                "summary": "Remove stale uploads and blobs no version needs (admin)",
                "requestBody": _body(GcIn),
                "responses": {"200": _json(GcOut, "What was removed"), **ERRORS},
            }
        },
        "/placements/{id}/mounts": {
            "post": {
                "summary": "Make the placement's datasets present on its node, held for it; "
                "the read-only mounts (/data/NAME)",
                "parameters": [
                    _param("id", type="integer"),
                    _param("wait_s", "query", type="number", minimum=0, maximum=300),
                ],
                "responses": {
                    "200": _json(MountsOut, "Ready: mount these"),
                    "202": _json(MountsOut, "Still being cached on the node; ask again"),
                    "409": _json(Error, "Not placed, or the node's cache cannot hold it"),
                    **ERRORS,
                },
            }
        },
        "/nodes/{name}/dataset-holds": {
            "get": {
                "summary": "Dataset versions a node's agent must keep cached (admin, agents)",
                "parameters": [_param("name")],
                "responses": {"200": _json(HoldList, "The node's holds"), **ERRORS},
            }
        },
        "/nodes/{name}/dataset-holds/{id}": {
            "put": {
                "summary": "A node agent reports a hold ready (with its path) or failed",
                "parameters": [_param("name"), _param("id", type="integer")],
                "requestBody": _body(HoldPatch),
                "responses": {"200": _json(HoldOut, "The hold"), **ERRORS},
            }
        },
    }


def openapi_document(version: str, base_url: str) -> dict[str, Any]:
    """The API description served at ``api/openapi.json``."""
    _, defs = models_json_schema(
        [(m, "serialization") for m in MODELS], ref_template="#/components/schemas/{model}"
    )
    node_name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "summary": "Liveness and database state (no authentication)",
                "security": [],
                "responses": {"200": _json(Health, "Healthy"), "503": _json(Health, "Degraded")},
            }
        },
        "/me": {
            "get": {
                "summary": "The caller: name, permission level, credits",
                "responses": {"200": _json(MeOut, "The caller"), **ERRORS},
            }
        },
        "/usage": {
            "get": {
                "summary": "GPU time held by a user's notebook servers and sessions",
                "parameters": [
                    {
                        "name": "user",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "another user (admin); default: the caller",
                    },
                    {
                        "name": "since",
                        "in": "query",
                        "schema": {"type": "string", "format": "date-time"},
                        "description": "count only time after this instant",
                    },
                ],
                "responses": {"200": _json(UsageOut, "GPU time per kind and allocation"), **ERRORS},
            }
        },
        "/nodes": {
            "get": {
                "summary": "Nodes and their GPUs",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["up", "draining", "down"]},
                    }
                ],
                "responses": {"200": _json(NodeList, "Nodes"), **ERRORS},
            }
        },
        "/nodes/{name}": {
            "get": {
                "summary": "One node",
                "parameters": [node_name],
                "responses": {"200": _json(NodeOut, "The node"), **ERRORS},
            },
            "patch": {
                "summary": "Drain, undrain or mark a node down (admin)",
                "parameters": [node_name],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(NodePatch)}},
                },
                "responses": {"200": _json(NodeOut, "The node"), **ERRORS},
            },
        },
        "/nodes/{name}/heartbeat": {
            "put": {
                "summary": "A node agent's report (admin token)",
                "parameters": [node_name],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(Heartbeat)}},
                },
                "responses": {"200": _json(NodeOut, "The node as registered"), **ERRORS},
            }
        },
    }
    paths.update(session_paths())
    paths.update(dataset_paths())
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


# ---- training sessions ------------------------------------------------------------------------

from ..schemas import (  # noqa: E402
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
    SessionIn,
    SessionList,
    SessionOut,
    SessionPatch,
)

MODELS += [
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
    SessionIn,
    SessionList,
    SessionOut,
    SessionPatch,
]


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


def _query(name: str, description: str, type_: str = "string") -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": type_},
    }


def session_paths() -> dict[str, Any]:
    """The session endpoints (``{user}/{dataset}/{n}`` is the session's name)."""
    name = [
        {"name": p, "in": "path", "required": True, "schema": {"type": t}}
        for p, t in (("user", "string"), ("dataset", "string"), ("n", "integer"))
    ]
    s = "/sessions/{user}/{dataset}/{n}"
    ckpt = {"name": "checkpoint", "in": "path", "required": True, "schema": {"type": "string"}}
    conflict = {"409": _json(Error, "Not possible in the session's state")}
    tar = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
    return {
        "/code": {
            "post": {
                "summary": "Upload a code snapshot (tar, gzip allowed) -> its digest",
                "requestBody": {"required": True, "content": tar},
                "responses": {
                    "201": _json(CodeOut, "Stored"),
                    "413": _json(Error, "Over the size limit"),
                    **ERRORS,
                },
            }
        },
        "/sessions": {
            "get": {
                "summary": "The caller's sessions (admin: all=1 or user=NAME)",
                "parameters": [
                    _query("state", "a state, or 'active'"),
                    _query("all", "1: every user's (admin)"),
                    _query("user", "another user's (admin)"),
                    _query("dataset", "only sessions named USER/DATASET/N"),
                    _query("limit", "the newest N (default 200)", "integer"),
                ],
                "responses": {"200": _json(SessionList, "Oldest first"), **ERRORS},
            },
            "post": {
                "summary": "Start a session",
                "requestBody": _body(SessionIn),
                "responses": {"201": _json(SessionOut, "Queued"), **ERRORS},
            },
        },
        "/sessions/diff": {
            "get": {
                "summary": "Differences between two sessions: arguments, settings, code",
                "parameters": [_query("a", "a session name"), _query("b", "a session name")],
                "responses": {"200": _json(DiffOut, "The differences"), **ERRORS},
            }
        },
        s: {
            "get": {
                "summary": "One session",
                "parameters": name,
                "responses": {"200": _json(SessionOut, "The session"), **ERRORS},
            },
            "patch": {
                "summary": "Change its memo or visibility",
                "parameters": name,
                "requestBody": _body(SessionPatch),
                "responses": {"200": _json(SessionOut, "The session"), **ERRORS},
            },
            "delete": {
                "summary": "Remove an ended session with its logs, metrics and checkpoints",
                "parameters": name,
                "responses": {"204": {"description": "Removed"}, **conflict, **ERRORS},
            },
        },
        s + "/stop": {
            "post": {
                "summary": "Stop: SIGTERM, the grace period, then SIGKILL",
                "parameters": name,
                "responses": {"202": _json(SessionOut, "Stopping"), **ERRORS},
            }
        },
        s + "/resume": {
            "post": {
                "summary": "Run an ended session again from its last checkpoint",
                "parameters": name,
                "responses": {"202": _json(SessionOut, "Queued"), **conflict, **ERRORS},
            }
        },
        s + "/fork": {
            "post": {
                "summary": "A new session from this one (and a checkpoint), with edits",
                "parameters": name,
                "requestBody": _body(ForkIn),
                "responses": {"201": _json(SessionOut, "The child, queued"), **ERRORS},
            }
        },
        s + "/logs": {
            "get": {
                "summary": "The stored output (stdout and stderr)",
                "parameters": [
                    *name,
                    _query("offset", "byte offset to read from", "integer"),
                    _query("limit", "most bytes (default and maximum 4 MiB)", "integer"),
                    _query("tail", "the last N lines instead", "integer"),
                ],
                "responses": {"200": _json(LogChunk, "A piece of the log"), **ERRORS},
            }
        },
        s + "/events": {
            "get": {
                "summary": "The session's state changes and failures",
                "parameters": name,
                "responses": {"200": _json(EventList, "Oldest first"), **ERRORS},
            }
        },
        s + "/metrics": {
            "get": {
                "summary": "Last values and per-step series of the reported metrics",
                "parameters": [
                    *name,
                    _query("names", "comma-separated metric names"),
                    _query("since_step", "only points from this step on", "integer"),
                ],
                "responses": {"200": _json(MetricsOut, "The metrics"), **ERRORS},
            },
            "post": {
                "summary": "Report points (session token or owner)",
                "parameters": name,
                "requestBody": _body(MetricsIn),
                "responses": {"200": _json(MetricsAccepted, "Stored"), **ERRORS},
            },
        },
        s + "/checkpoints": {
            "get": {
                "summary": "The saved checkpoints",
                "parameters": name,
                "responses": {"200": _json(CheckpointList, "Oldest first"), **ERRORS},
            }
        },
        s + "/checkpoints/{checkpoint}": {
            "put": {
                "summary": "Save a checkpoint (a tar archive; session token or owner)",
                "parameters": [*name, ckpt, _query("step", "the step it was saved at", "integer")],
                "requestBody": {"required": True, "content": tar},
                "responses": {"201": _json(CheckpointOut, "Saved"), **ERRORS},
            },
            "get": {
                "summary": "Download a checkpoint (the tar archive)",
                "parameters": [*name, ckpt],
                "responses": {"200": {"description": "The archive", "content": tar}, **ERRORS},
            },
        },
        s + "/exec": {
            "post": {
                "summary": "Run a command inside the running session's container",
                "parameters": name,
                "requestBody": _body(ExecIn),
                "responses": {
                    "200": _json(ExecOut, "Its exit code and output"),
                    **conflict,
                    **ERRORS,
                },
            }
        },
        "/events": {
            "get": {
                "summary": "The caller's event feed: state changes and failures of sessions",
                "parameters": [
                    _query("since", "only events after this id", "integer"),
                    _query("limit", "at most this many (default 100)", "integer"),
                    _query("all", "1: every user's (admin)"),
                ],
                "responses": {"200": _json(EventList, "Oldest first"), **ERRORS},
            }
        },
    }

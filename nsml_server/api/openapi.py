"""The OpenAPI 3.1 document, built from the pydantic schemas the handlers use."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ..schemas import Error, Health, Heartbeat, MeOut, NodeList, NodeOut, NodePatch

MODELS: list[type[BaseModel]] = [Error, Health, Heartbeat, MeOut, NodeList, NodeOut, NodePatch]


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

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

"""The API description is valid OpenAPI and lists every session endpoint the server routes."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

from nsml_server.api.openapi import openapi_document
from nsml_server.api.sessions import NAME, session_handlers


def test_the_document_is_valid_openapi() -> None:
    validate(openapi_document("0.1.0", "/services/nsml/"))  # type: ignore[arg-type]


def test_every_session_route_is_described_with_its_methods() -> None:
    doc = openapi_document("0.1.0", "/services/nsml/")
    for pattern, handler, _ in session_handlers("/api/", None, None):  # type: ignore[arg-type]
        path = pattern.removeprefix("/api").replace(NAME, "{user}/{dataset}/{n}")
        path = path.replace("([^/]+)", "{checkpoint}")
        assert path in doc["paths"], path
        methods = {
            m.lower()
            for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
            if m.lower() in vars(handler)
        }
        assert methods == set(doc["paths"][path]), (path, methods)
        assert not re.search(r"[()\\]", path)

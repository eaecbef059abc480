"""The API description is valid OpenAPI, names every route the server answers with the
methods it implements, and states the rules the server enforces on every parameter."""

from __future__ import annotations

import re
from typing import Any

import pytest
from openapi_spec_validator import validate

from nsml_server.api.events_stream import event_routes
from nsml_server.api.leaderboards import leaderboard_routes
from nsml_server.api.openapi import openapi_document
from nsml_server.api.routes import INT32_MAX, INT64_MAX, ParamError, Route, RouteRules
from nsml_server.api.sessions import session_routes
from nsml_server.app import api_routes

DOC = openapi_document("0.1.0", "/services/nsml/")
ROUTES: list[Route] = (
    api_routes(None, DOC)
    + session_routes(None, None)
    + leaderboard_routes(None, None)
    + event_routes(None, None)
)


def operations() -> list[tuple[Route, str, dict[str, Any]]]:
    return [(r, m, DOC["paths"][r.template][m]) for r in ROUTES for m in r.methods()]


def test_the_document_is_valid_openapi() -> None:
    validate(DOC)  # type: ignore[arg-type]


def test_every_route_of_the_app_is_in_the_document_with_exactly_its_methods() -> None:
    for route in ROUTES:
        assert route.template in DOC["paths"], f"{route.template} is routed but not described"
        described = set(DOC["paths"][route.template])
        assert set(route.methods()) == described, (route.template, route.methods(), described)


def test_every_path_of_the_document_is_a_route_of_the_app() -> None:
    assert set(DOC["paths"]) == {r.template for r in ROUTES}
    assert len(ROUTES) == len({r.template for r in ROUTES}), "a template is routed twice"


def test_every_path_parameter_is_described_by_every_operation_of_its_route() -> None:
    for route, method, op in operations():
        declared = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
        assert declared == route.params, (route.template, method, declared)


def test_route_patterns_match_one_segment_per_parameter() -> None:
    for route in ROUTES:
        pattern = route.pattern("/services/nsml/api/")
        path = "/services/nsml/api" + re.sub(r"\{[^}]+\}", "x", route.template)
        m = re.fullmatch(pattern, path)
        assert m is not None and len(m.groups()) == len(route.params), (pattern, path)


@pytest.mark.parametrize(
    ("route", "method", "op"),
    operations(),
    ids=[f"{m.upper()} {r.template}" for r, m, _ in operations()],
)
def test_every_integer_parameter_is_bounded_and_refused_out_of_range(
    route: Route, method: str, op: dict[str, Any]
) -> None:
    """Generated from the route table: each integer (and number) parameter has both bounds
    within the database's range, and values past either bound, or no number at all, are a
    404 (a path id) or a 400 naming the parameter and the range."""
    rules = RouteRules.from_document(route, DOC)
    for p in op.get("parameters", []):
        schema = p["schema"]
        if schema.get("type") not in ("integer", "number"):
            continue
        lo, hi = schema.get("minimum"), schema.get("maximum")
        assert lo is not None and hi is not None, (route.template, p["name"])
        assert -(2**63) <= lo <= hi <= INT64_MAX
        status = 404 if p["in"] == "path" and schema["type"] == "integer" else 400
        for bad in (str(int(hi) + 1), str(int(lo) - 1), "9" * 30, "-" + "9" * 30, "x", "1e400"):
            path_args, query = _request(route, p, bad)
            with pytest.raises(ParamError) as e:
                rules.check(method, path_args, query)
            assert e.value.status == status
            assert p["name"] in e.value.message and str(_fmt(hi)) in e.value.message
        path_args, query = _request(route, p, str(int(hi)))
        rules.check(method, path_args, query)


def _request(
    route: Route, param: dict[str, Any], value: str
) -> tuple[list[str], dict[str, list[str]]]:
    """Valid values for every path parameter but *param*, which gets *value*."""
    valid = {
        "name": "n1",
        "version": "1",
        "upload_id": "0" * 32,
        "blake3": "0" * 64,
        "user": "u",
        "dataset": "_",
        "n": "1",
        "checkpoint": "c1",
        "id": "1",
    }
    path_args = [value if n == param["name"] else valid[n] for n in route.params]
    query = {param["name"]: [value]} if param["in"] == "query" else {}
    return path_args, query


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def test_ids_are_bounded_by_the_database_integer_columns() -> None:
    rules = RouteRules.from_document(Route("/placements/{id}", object), DOC)
    rules.check("GET", [str(INT32_MAX)], {})
    with pytest.raises(ParamError) as e:
        rules.check("GET", ["99999999999999999999999999"], {})
    assert e.value.status == 404
    assert "id" in e.value.message and f"from 1 to {INT32_MAX}" in e.value.message


@pytest.mark.parametrize(
    ("template", "method", "path_args", "query", "status"),
    [
        ("/events", "get", [], {"since": ["-32589158477190044730"]}, 400),
        ("/events", "get", [], {"limit": ["-5"]}, 400),
        ("/events", "get", [], {"limit": ["0"]}, 400),
        ("/sessions", "get", [], {"limit": ["-5"]}, 400),
        ("/sessions", "get", [], {"all": ["maybe"]}, 400),
        ("/sessions", "get", [], {"state": ["sleeping"]}, 400),
        ("/nodes", "get", [], {"state": ["gone"]}, 400),
        ("/placements/{id}/mounts", "post", ["1"], {"wait_s": ["nan"]}, 400),
        ("/placements/{id}/mounts", "post", ["1"], {"wait_s": ["301"]}, 400),
        ("/nodes/{name}/dataset-holds/{id}", "put", ["x", "9" * 30], {}, 404),
        ("/nodes/{name}", "get", ["-bad-"], {}, 400),
        ("/datasets/{name}/versions/{version}", "get", ["mnist", "0"], {}, 400),
        ("/sessions/diff", "get", [], {"a": ["u/_/1"]}, 400),
        ("/sessions/{user}/{dataset}/{n}/logs", "get", ["u", "_", "1"], {"tail": ["-1"]}, 400),
    ],
    ids=lambda v: str(v) if not isinstance(v, list | dict) else None,
)
def test_the_quoted_bad_parameters_are_refused(
    template: str, method: str, path_args: list[str], query: dict[str, list[str]], status: int
) -> None:
    route = next(r for r in ROUTES if r.template == template)
    with pytest.raises(ParamError) as e:
        RouteRules.from_document(route, DOC).check(method, path_args, query)
    assert e.value.status == status, e.value.message


@pytest.mark.parametrize(
    ("template", "method", "path_args", "query"),
    [
        ("/events", "get", [], {"since": ["0"], "limit": ["1000"], "all": ["1"]}),
        ("/sessions", "get", [], {"limit": ["10000"], "state": ["active"], "dataset": ["_"]}),
        ("/nodes/{name}/dataset-holds/{id}", "put", ["local-test", str(INT32_MAX)], {}),
        ("/datasets/{name}/versions/{version}", "get", ["mnist", "latest"], {}),
        ("/datasets/{name}/versions/{version}/blobs/{blake3}", "get", ["a", "3", "f" * 64], {}),
        ("/sessions/diff", "get", [], {"a": ["u/_/1"], "b": ["u@x.org/mnist/12"]}),
        ("/placements/{id}/mounts", "post", ["7"], {"wait_s": ["2.5"]}),
        ("/usage", "get", [], {"unknown": ["ignored"]}),
    ],
)
def test_valid_parameters_pass(
    template: str, method: str, path_args: list[str], query: dict[str, list[str]]
) -> None:
    route = next(r for r in ROUTES if r.template == template)
    RouteRules.from_document(route, DOC).check(method, path_args, query)


def test_node_internals_are_documented_as_admin_only() -> None:
    node = DOC["components"]["schemas"]["NodeOut"]["properties"]["docker_url"]
    assert node.get("x-admin-only") is True
    assert "admins" in node["description"]


def test_every_operation_lists_json_errors_for_what_it_can_refuse() -> None:
    for route, method, op in operations():
        codes = set(op["responses"])
        if op.get("security") != []:
            assert {"401", "403"} <= codes, (route.template, method)
        if op.get("parameters") or op.get("requestBody"):
            assert "400" in codes, (route.template, method)
        if route.params:
            assert "404" in codes, (route.template, method)
        for code, response in op["responses"].items():
            if code.startswith(("4", "5")) and route.template != "/health":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}

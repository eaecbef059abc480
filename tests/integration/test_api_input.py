"""Bad input on every route gets a JSON 4xx that names what is wrong, never a 5xx.

The cases are generated from the app's route table and the document the running service
serves, so a new route is covered the day it is added: every integer parameter out of its
range, every JSON body nested too deep, every method a route does not implement.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests

from nsml_server.api.events_stream import event_routes
from nsml_server.api.leaderboards import leaderboard_routes
from nsml_server.api.routes import HTTP_METHODS, Route
from nsml_server.api.sessions import session_routes
from nsml_server.app import api_routes
from tests.integration.hubproc import HubProcess

pytestmark = [pytest.mark.hub, pytest.mark.docker]

ROUTES: list[Route] = (
    api_routes(None, {})
    + session_routes(None, None)
    + leaderboard_routes(None, None)
    + event_routes(None, None)
)

VALID = {
    "name": "no-such-thing",
    "version": "1",
    "upload_id": "0" * 32,
    "blake3": "0" * 64,
    "user": "api-input",
    "dataset": "_",
    "n": "1",
    "checkpoint": "c1",
    "id": "1",
}
"""Valid-looking values for the path parameters that a case does not test."""

DEEP = b'{"a":' * 5000 + b"1" + b"}" * 5000


@pytest.fixture(scope="module")
def document(hub: HubProcess) -> dict[str, Any]:
    return dict(requests.get(f"{hub.nsml_api}/openapi.json", timeout=10).json())


@pytest.fixture(scope="module")
def admin(hub: HubProcess) -> str:
    return hub.user_token("admin")


def url(hub: HubProcess, route: Route, **values: str) -> str:
    path = route.template
    for name in route.params:
        path = path.replace("{" + name + "}", values.get(name, VALID[name]))
    return hub.nsml_api + path


def assert_json_error(r: requests.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.request.method, r.url, r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"message", "reason"} and body["message"], body
    return dict(body)


def integer_cases(document: dict[str, Any]) -> list[tuple[Route, str, dict[str, Any], str]]:
    cases = []
    for route in ROUTES:
        for method in route.methods():
            for p in document["paths"][route.template][method].get("parameters", []):
                schema = p["schema"]
                if schema.get("type") not in ("integer", "number"):
                    continue
                lo, hi = int(schema["minimum"]), int(schema["maximum"])
                for bad in (str(hi + 1), str(lo - 1), "9" * 26, "-" + "9" * 20):
                    cases.append((route, method, p, bad))
    return cases


def test_out_of_range_integers_on_every_route_are_a_json_400_or_404(
    hub: HubProcess, document: dict[str, Any], admin: str
) -> None:
    cases = integer_cases(document)
    assert len(cases) > 60, "the route table has integer parameters on many routes"
    s = requests.Session()
    s.headers["Authorization"] = f"token {admin}"
    for route, method, p, bad in cases:
        if p["in"] == "path":
            r = s.request(method, url(hub, route, **{p["name"]: bad}), timeout=30)
            body = assert_json_error(r, 404 if p["schema"]["type"] == "integer" else 400)
        else:
            params = {p["name"]: bad}
            if route.template == "/metrics":  # its required parameter, valid
                params["sessions"] = "admin/_/1"
            r = s.request(method, url(hub, route), params=params, timeout=30)
            body = assert_json_error(r, 400)
        assert p["name"] in body["message"] and str(p["schema"]["maximum"]) in body["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "placements/99999999999999999999999999", 404),
        ("DELETE", "placements/99999999999999999999999999", 404),
        ("GET", "events?since=-32589158477190044730", 400),
        ("GET", "events?limit=-5", 400),
        ("GET", "sessions?limit=-5", 400),
        ("PUT", "nodes/x/dataset-holds/99999999999999999999999999", 404),
        ("GET", "sessions/a/_/99999999999999999999/logs", 404),
        ("GET", "sessions/a/_/1/logs?offset=99999999999999999999", 400),
    ],
)
def test_the_reported_out_of_range_requests_are_refused(
    hub: HubProcess, admin: str, method: str, path: str, status: int
) -> None:
    assert_json_error(hub.nsml(method, path, admin, json={}), status)


def test_deep_json_on_every_json_route_is_a_json_400(
    hub: HubProcess, document: dict[str, Any], admin: str
) -> None:
    s = requests.Session()
    s.headers.update({"Authorization": f"token {admin}", "Content-Type": "application/json"})
    seen = 0
    for route in ROUTES:
        for method in route.methods():
            body = document["paths"][route.template][method].get("requestBody")
            if not body or "application/json" not in body["content"]:
                continue
            seen += 1
            r = s.request(method, url(hub, route), data=DEEP, timeout=30)
            assert "nests" in assert_json_error(r, 400)["message"], (method, route.template)
    assert seen >= 12


def test_every_method_a_route_lacks_is_a_405_with_allow(hub: HubProcess, admin: str) -> None:
    s = requests.Session()
    s.headers["Authorization"] = f"token {admin}"
    for route in ROUTES:
        allowed = [m.upper() for m in route.methods()]
        for method in HTTP_METHODS:
            if method in route.methods():
                continue
            r = s.request(method.upper(), url(hub, route), data=b"{}", timeout=30)
            body = assert_json_error(r, 405)
            assert r.headers["Allow"] == ", ".join(allowed), (route.template, r.headers)
            assert body["reason"] == "method_not_allowed"


def test_node_internals_are_shown_to_admins_only(hub: HubProcess, admin: str) -> None:
    user = hub.user_token("api-input-user")
    for path in ("nodes", "nodes/local-test"):
        as_admin, as_user = hub.nsml("GET", path, admin), hub.nsml("GET", path, user)
        assert as_admin.status_code == as_user.status_code == 200
        admin_nodes = as_admin.json().get("nodes", [as_admin.json()])
        user_nodes = as_user.json().get("nodes", [as_user.json()])
        assert any(n["docker_url"] for n in admin_nodes), admin_nodes
        assert all(n["docker_url"] is None for n in user_nodes), user_nodes
        assert [n["name"] for n in admin_nodes] == [n["name"] for n in user_nodes]

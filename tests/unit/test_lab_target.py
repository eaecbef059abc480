"""The sidebar's forwarder: which browser paths reach which service URL, and which never do."""

from __future__ import annotations

import pytest

from jupyter_nsml_lab.target import (
    TargetError,
    api_target,
    service_from_env,
    service_from_hub_model,
)

API = "http://127.0.0.1:8090/services/nsml/api/"


@pytest.mark.parametrize(
    ("raw", "query", "url"),
    [
        ("sessions", "", API + "sessions"),
        ("sessions", "state=running&all=1", API + "sessions?state=running&all=1"),
        ("sessions/alice/mnist/3/logs", "offset=0", API + "sessions/alice/mnist/3/logs?offset=0"),
        ("sessions/a.b%40lab/_/1", "", API + "sessions/a.b@lab/_/1"),
        ("datasets/my%20data", "", API + "datasets/my%20data"),
    ],
)
def test_api_paths_map_to_the_service_api(raw: str, query: str, url: str) -> None:
    assert api_target(API, raw, query) == url


@pytest.mark.parametrize(
    "raw",
    [
        "../hub/api/users",
        "sessions/../../hub/api",
        "%2e%2e/hub/api/users",
        "%2E%2E/%2e%2e/hub",
        "sessions/%2e%2e%2f%2e%2e/hub",
        "./sessions",
        "sessions/%2f/x",
        "/evil.example.org/api",
        "//evil.example.org/api",
        "http://evil.example.org/api",
        "sessions%5c..%5chub",
        "sessions/%00",
        "sessions/%ff%fe",
        "sessions/",
    ],
)
def test_paths_that_leave_the_api_are_refused_with_400(raw: str) -> None:
    with pytest.raises(TargetError) as e:
        api_target(API, raw)
    assert e.value.status == 400 and e.value.reason == "bad_path", e.value.message


@pytest.mark.parametrize("raw", ["", "/", "//"])
def test_no_path_is_404(raw: str) -> None:
    with pytest.raises(TargetError) as e:
        api_target(API, raw)
    assert e.value.status in (400, 404)


def test_the_url_comes_from_the_environment_in_the_nsml_clients_order() -> None:
    env = {"JUPYTERHUB_API_TOKEN": "tok", "NSML_TOKEN": "other"}
    assert service_from_env(env) is None
    pub = {**env, "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example.org/hub/"}
    svc = service_from_env(pub)
    assert svc is not None
    assert svc.api_url == "https://hub.example.org/services/nsml/api/" and svc.token == "tok"
    direct = {**pub, "NSML_API_URL": "http://127.0.0.1:8090/services/nsml/api"}
    svc = service_from_env(direct)
    assert svc is not None and svc.api_url == API and svc.source == "NSML_API_URL"
    svc = service_from_env(direct, "http://svc:1/api")
    assert svc is not None and svc.api_url == "http://svc:1/api/"


def test_without_the_servers_token_nothing_is_forwarded() -> None:
    assert service_from_env({"NSML_API_URL": API}) is None
    svc = service_from_env({"NSML_API_URL": API, "NSML_TOKEN": "t"})
    assert svc is not None and svc.token == "t"


def test_the_hub_model_of_the_service_gives_its_api() -> None:
    svc = service_from_hub_model({"url": "http://127.0.0.1:8090", "prefix": "/services/nsml/"}, "t")
    assert svc is not None and svc.api_url == API
    assert service_from_hub_model({"url": "", "prefix": "/services/nsml/"}, "t") is None

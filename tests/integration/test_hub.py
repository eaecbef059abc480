"""The platform end to end: a real jupyterhub, the `nsml` managed service, real containers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess

pytestmark = [pytest.mark.hub, pytest.mark.docker]

NSML = str(Path(sys.executable).parent / "nsml")
NSML_AGENT = str(Path(sys.executable).parent / "nsml-agent")


def assert_json_error(
    r: requests.Response, status: int, reason: str | None = None
) -> dict[str, Any]:
    """The response is a JSON error with a message (no traceback) and the given status."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"message", "reason"}, body
    assert body["message"] and "Traceback" not in r.text
    if reason is not None:
        assert body["reason"] == reason, body
    return dict(body)


# ---- the service ------------------------------------------------------------------------


def test_health_answers_through_the_proxy_without_a_token(hub: HubProcess) -> None:
    r = requests.get(f"{hub.url}/services/nsml/api/health", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert re.match(r"^\d+\.\d+", body["version"])
    assert body["backend"] == "docker"


def test_hub_config_loads_without_unrecognized_options(hub: HubProcess) -> None:
    log = hub.log_text()
    assert "not recognized" not in log, log
    assert "Unrecognized" not in log
    assert "DeprecationWarning" not in log


def test_openapi_document_is_valid_and_lists_the_endpoints(hub: HubProcess) -> None:
    from openapi_spec_validator import validate

    doc = requests.get(f"{hub.nsml_api}/openapi.json", timeout=10).json()
    validate(doc)
    assert {"/health", "/me", "/nodes", "/nodes/{name}"} <= set(doc["paths"])


def test_me_with_a_user_token(hub: HubProcess) -> None:
    token = hub.user_token("alice")
    r = hub.nsml("GET", "me", token)
    assert r.status_code == 200, r.text
    me = r.json()
    assert me["name"] == "alice"
    assert me["permission"] == "user"
    assert me["admin"] is False
    assert me["credits"] == pytest.approx(100.0)


def test_me_for_an_admin(hub: HubProcess) -> None:
    r = hub.nsml("GET", "me", hub.user_token("admin"))
    assert r.status_code == 200, r.text
    assert r.json()["permission"] == "admin"


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        pytest.param({}, 401, "unauthenticated", id="no token"),
        pytest.param(
            {"Authorization": "token not-a-real-token"}, 401, "unauthenticated", id="invalid token"
        ),
        pytest.param({"Authorization": "Bearer "}, 401, "unauthenticated", id="empty bearer"),
    ],
)
def test_requests_without_a_valid_token_get_401_json(
    hub: HubProcess, headers: dict[str, str], status: int, reason: str
) -> None:
    r = requests.get(f"{hub.nsml_api}/me", headers=headers, timeout=10)
    assert_json_error(r, status, reason)


def test_a_token_without_the_service_scope_gets_403_json(hub: HubProcess) -> None:
    token = hub.user_token("carol", scopes=["read:users!user=carol"])
    body = assert_json_error(hub.nsml("GET", "me", token), 403, "forbidden")
    assert "access:services" in body["message"]


def test_nodes_lists_the_local_node_with_its_virtual_gpus(hub: HubProcess) -> None:
    r = hub.nsml("GET", "nodes", hub.user_token("alice"))
    assert r.status_code == 200, r.text
    nodes = {n["name"]: n for n in r.json()["nodes"]}
    node = nodes["local-test"]
    assert node["state"] == "up"
    assert node["backend"] == "docker"
    assert [g["index"] for g in node["gpus"]] == [0, 1, 2, 3]
    assert len({g["uuid"] for g in node["gpus"]}) == 4
    assert node["gpu_probe"]["kind"] == "virtual"
    assert node["cpu_milli"] > 0 and node["memory_mib"] > 0
    assert node["heartbeat_age_s"] is not None and node["heartbeat_age_s"] < 60


MALFORMED = [
    pytest.param("PATCH", "nodes/local-test", b"{not json", id="body is not JSON"),
    pytest.param("PATCH", "nodes/local-test", b"[1, 2]", id="body is a list"),
    pytest.param("PATCH", "nodes/local-test", b"", id="empty body"),
    pytest.param("PATCH", "nodes/local-test", b'{"state": "sideways"}', id="state not a choice"),
    pytest.param("PATCH", "nodes/local-test", b'{"state": "up", "x": 1}', id="unknown field"),
    pytest.param("PATCH", "nodes/local-test", b'{"state": 7}', id="state not a string"),
    pytest.param("GET", "nodes?state=bogus", None, id="bad query value"),
    pytest.param("GET", "nodes/bad%20name!", None, id="bad node name"),
    pytest.param("PUT", "nodes/node-x/heartbeat", b'{"cpu_milli": -1}', id="bad heartbeat"),
    pytest.param("PUT", "nodes/node-x/heartbeat", b"\xff\xfe", id="body is not UTF-8"),
]


@pytest.mark.parametrize(("method", "path", "body"), MALFORMED)
def test_malformed_requests_get_400_json_never_500(
    hub: HubProcess, method: str, path: str, body: bytes | None
) -> None:
    token = hub.user_token("admin")
    r = hub.nsml(method, path, token, data=body, headers={"Content-Type": "application/json"})
    assert_json_error(r, 400, "bad_request")


def test_the_400_message_lists_the_valid_choices(hub: HubProcess) -> None:
    r = hub.nsml("PATCH", "nodes/local-test", hub.user_token("admin"), json={"state": "sideways"})
    msg = assert_json_error(r, 400)["message"]
    assert "state" in msg and "'up'" in msg and "'draining'" in msg


def test_unknown_endpoints_and_nodes_are_404_json(hub: HubProcess) -> None:
    token = hub.user_token("alice")
    assert_json_error(hub.nsml("GET", "no/such/thing", token), 404, "not_found")
    assert_json_error(hub.nsml("GET", "nodes/no-such-node", token), 404, "not_found")


def test_only_admins_change_nodes(hub: HubProcess) -> None:
    r = hub.nsml("PATCH", "nodes/local-test", hub.user_token("alice"), json={"state": "draining"})
    assert_json_error(r, 403, "forbidden")


def test_an_admin_drains_and_undrains_a_node(hub: HubProcess) -> None:
    token = hub.user_token("admin")
    r = hub.nsml("PATCH", "nodes/local-test", token, json={"state": "draining"})
    assert r.status_code == 200 and r.json()["state"] == "draining"
    # A heartbeat does not undrain it.
    hb = hub.nsml("GET", "nodes/local-test", token).json()
    assert hb["state"] == "draining"
    r = hub.nsml("PATCH", "nodes/local-test", token, json={"state": "up"})
    assert r.status_code == 200 and r.json()["state"] == "up"


def client_env(hub: HubProcess, token: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
    env.update(NSML_API_URL=hub.nsml_api, NSML_TOKEN=token, **extra)
    return env


def test_a_remote_node_agent_registers_its_gpus(hub: HubProcess) -> None:
    env = client_env(
        hub, hub.user_token("admin"), NSML_VIRTUAL_GPUS="2", NSML_VIRTUAL_GPU_MODEL="A100-SXM4-80GB"
    )
    r = subprocess.run(
        [NSML_AGENT, "--once", "--name", "node-b"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    node = hub.nsml("GET", "nodes/node-b", hub.user_token("alice")).json()
    assert [g["model"] for g in node["gpus"]] == ["A100-SXM4-80GB"] * 2
    assert node["state"] == "up"


def test_a_node_agent_with_a_user_token_is_refused(hub: HubProcess) -> None:
    env = client_env(hub, hub.user_token("alice"), NSML_VIRTUAL_GPUS="1")
    r = subprocess.run(
        [NSML_AGENT, "--once", "--name", "node-evil"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "403" in r.stderr


def test_cli_whoami_and_nodes(hub: HubProcess) -> None:
    env = client_env(hub, hub.user_token("alice"))
    r = subprocess.run([NSML, "whoami"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("alice (user)")
    r = subprocess.run(
        [NSML, "nodes", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "local-test" in {n["name"] for n in json.loads(r.stdout)}


def test_cli_with_a_bad_token_says_what_to_do(hub: HubProcess) -> None:
    env = client_env(hub, "wrong")
    r = subprocess.run([NSML, "whoami"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "token" in r.stderr and "Traceback" not in r.stderr


# ---- notebook servers ---------------------------------------------------------------------


def server_ready(hub: HubProcess, name: str) -> bool:
    model = hub.admin("GET", f"/users/{name}").json()
    server = model.get("servers", {}).get("", {})
    return bool(server.get("ready"))


def container_of(docker_client: Any, hub: HubProcess, name: str) -> Any:
    prefix = hub.env_overrides["NSML_CONTAINER_PREFIX"]
    return docker_client.containers.get(f"{prefix}-{name}")


def test_logging_in_starts_a_notebook_server_in_a_container(
    hub: HubProcess, docker_client: Any
) -> None:
    session = hub.login("dora")
    r = session.get(f"{hub.url}/hub/spawn?opt-gpus=0", timeout=120)
    assert r.status_code == 200, r.status_code
    wait_for(lambda: server_ready(hub, "dora"), timeout=120, what="dora's server ready")
    container = container_of(docker_client, hub, "dora")
    assert container.status == "running"
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    # The server answers through the proxy, with the user's cookie (OAuth) and with a token.
    # Like a browser: the page visit sets the server's _xsrf cookie, API calls echo it.
    page = session.get(f"{hub.url}/user/dora/lab", timeout=60)
    assert page.status_code == 200, page.status_code
    xsrf = session.cookies.get("_xsrf", path="/user/dora/")
    r = session.get(f"{hub.url}/user/dora/api/status", headers={"X-XSRFToken": xsrf}, timeout=60)
    assert r.status_code == 200 and "started" in r.json(), r.text[:300]
    token = hub.user_token("dora")
    r = requests.get(
        f"{hub.url}/user/dora/api/status", headers={"Authorization": f"token {token}"}, timeout=30
    )
    assert r.status_code == 200
    # Inside the container the nsml client finds the API with the server's own token.
    out = container.exec_run(["nsml", "whoami", "--json"], user="1000")
    assert out.exit_code == 0, out.output.decode()
    assert json.loads(out.output)["name"] == "dora"
    # Stopping the server removes the container.
    hub.admin("DELETE", "/users/dora/server")
    wait_for(
        lambda: (
            not server_ready(hub, "dora")
            and not docker_client.containers.list(all=True, filters={"name": container.name})
        ),
        timeout=60,
        what="dora's server gone",
    )


def test_a_hub_restart_leaves_servers_running_and_known(
    hub: HubProcess, docker_client: Any
) -> None:
    hub.admin("POST", "/users/erin")
    r = hub.admin("POST", "/users/erin/server")
    assert r.status_code in (201, 202), r.text
    wait_for(lambda: server_ready(hub, "erin"), timeout=120, what="erin's server ready")
    container = container_of(docker_client, hub, "erin")
    token = hub.user_token("erin")

    hub.stop()
    container.reload()
    assert container.status == "running", "the container must outlive the hub"

    hub.start()
    assert server_ready(hub, "erin")
    r = requests.get(
        f"{hub.url}/user/erin/api/status", headers={"Authorization": f"token {token}"}, timeout=30
    )
    assert r.status_code == 200, r.text[:300]
    container.reload()
    assert container.status == "running"
    hub.admin("DELETE", "/users/erin/server")
    wait_for(lambda: not server_ready(hub, "erin"), timeout=60, what="erin's server stopped")


def test_cli_health_needs_no_token(hub: HubProcess) -> None:
    env = client_env(hub, "")
    del env["NSML_TOKEN"]
    r = subprocess.run([NSML, "health"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok ")


def test_the_service_root_says_where_the_api_is(hub: HubProcess) -> None:
    r = requests.get(f"{hub.url}/services/nsml/", timeout=10)
    assert r.status_code == 200
    assert r.json()["api"] == "/services/nsml/api/"

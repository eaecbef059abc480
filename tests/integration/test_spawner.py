"""NSMLSpawner end to end: a real hub, the NSML scheduler, real containers, virtual GPUs.

The hub's local node has 4 virtual GPUs. GPU requests name the local node's model, so that
nodes other tests register (without a Docker engine the hub can reach) are never chosen.
Every test stops the servers it started, even when it fails.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_placements import local_model

pytestmark = [pytest.mark.hub, pytest.mark.docker]

SMALL = {"cpu": 0.5, "memory": "512M"}

# cgroup v1 kills the largest process of a container that goes over its limit. The server
# process is made the preferred victim (raising one's own process's oom_score_adj needs no
# privilege), so the container ends as it does when the server itself grows; the kill is the
# kernel's, at the limit the engine set.
OOM_SCRIPT = """
import glob, os
me = str(os.getpid())
for path in glob.glob('/proc/[0-9]*/cmdline'):
    pid = path.split('/')[2]
    try:
        cmd = open(path, 'rb').read()
    except OSError:
        continue
    if pid != me and cmd.startswith(b'/opt/venv/bin/python') and b'jupyterhub-singleuser' in cmd:
        open(f'/proc/{pid}/oom_score_adj', 'w').write('1000')
blob = bytearray(400 * 1024 * 1024)
"""


# ---- helpers ----------------------------------------------------------------------------------


def user_model(hub: HubProcess, name: str) -> dict[str, Any]:
    return dict(hub.admin("GET", f"/users/{name}").json())


def ready(hub: HubProcess, name: str) -> bool:
    return bool(user_model(hub, name).get("servers", {}).get("", {}).get("ready"))


def stopped(hub: HubProcess, name: str) -> bool:
    model = user_model(hub, name)
    return model.get("server") is None and not model.get("servers") and not model.get("pending")


def spawn(hub: HubProcess, name: str, **user_options: Any) -> requests.Response:
    """Ask the hub for *name*'s server with these options (the REST API, as a script would)."""
    if hub.admin("GET", f"/users/{name}").status_code == 404:
        hub.admin("POST", f"/users/{name}").raise_for_status()
    return hub.admin("POST", f"/users/{name}/server", json={"user_options": user_options})


def container_env(container: Any) -> dict[str, str]:
    """The environment as the server's own processes see it (``env`` inside the container)."""
    out = container.exec_run(["env"], user="1000")
    assert out.exit_code == 0, out.output
    return dict(line.split("=", 1) for line in out.output.decode().splitlines() if "=" in line)


def placements(hub: HubProcess, name: str) -> list[dict[str, Any]]:
    r = hub.nsml("GET", "placements", hub.user_token(name))
    assert r.status_code == 200, r.text
    return list(r.json()["placements"])


def active_placement(hub: HubProcess, name: str) -> dict[str, Any]:
    live = [p for p in placements(hub, name) if p["state"] in ("waiting", "placed")]
    assert len(live) == 1, live
    return live[0]


def progress_events(
    hub: HubProcess, name: str, until: Callable[[dict[str, Any]], bool], timeout: float = 30
) -> list[dict[str, Any]]:
    """Read the hub's progress event stream of *name*'s spawn until *until* matches."""
    url = f"{hub.api}/users/{name}/server/progress"
    headers = {"Authorization": f"token {hub.admin_token}"}
    r = wait_for(
        lambda: (
            resp
            if (resp := requests.get(url, headers=headers, stream=True, timeout=timeout)).ok
            else resp.close()
        ),
        timeout=15,
        what=f"{name}'s progress stream",
    )
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with r:
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if until(events[-1]):
                    return events
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"no matching progress event for {name}: {events}")


@pytest.fixture
def servers(hub: HubProcess) -> Iterator[list[str]]:
    """Names whose servers (and NSML placements) are removed after the test, pass or fail."""
    names: list[str] = []
    yield names
    for name in names:
        hub.admin("DELETE", f"/users/{name}/server")
    for name in names:
        try:
            wait_for(lambda n=name: stopped(hub, n), timeout=60, what=f"{name} stopped")
        finally:
            token = hub.user_token(name)
            for p in placements(hub, name):
                if p["state"] in ("waiting", "placed"):
                    hub.nsml("DELETE", f"placements/{p['id']}", token)


@pytest.fixture
def containers(hub: HubProcess, docker_client: Any) -> Callable[[str], Any]:
    """The notebook container of a user, found by the spawner's labels."""
    prefix = hub.env_overrides["NSML_CONTAINER_PREFIX"]

    def find(name: str) -> Any:
        found = [
            c
            for c in docker_client.containers.list(all=True, filters={"label": f"nsml.user={name}"})
            if c.name.startswith(prefix)
        ]
        assert len(found) == 1, f"{name}: containers {[c.name for c in found]}"
        return found[0]

    return find


# ---- GPUs from the scheduler ------------------------------------------------------------------


def test_two_users_get_disjoint_gpus_and_a_third_waits_in_the_queue_until_one_stops(
    hub: HubProcess, servers: list[str], containers: Callable[[str], Any]
) -> None:
    model = local_model(hub)
    alice, bob, carol = "sp-alice", "sp-bob", "sp-carol"
    servers.extend([alice, bob, carol])
    with ThreadPoolExecutor(3) as pool:
        asks = [pool.submit(spawn, hub, u, gpus=2, gpu_model=model, **SMALL) for u in (alice, bob)]
        for f in asks:
            assert f.result().status_code in (201, 202), f.result().text
        for u in (alice, bob):
            wait_for(lambda u=u: ready(hub, u), timeout=60, what=f"{u} ready")

        envs = {u: container_env(containers(u)) for u in (alice, bob)}
        seen = {u: envs[u]["NVIDIA_VISIBLE_DEVICES"].split(",") for u in (alice, bob)}
        assert len(seen[alice]) == len(seen[bob]) == 2, seen
        assert not set(seen[alice]) & set(seen[bob]), f"GPUs shared: {seen}"
        for u in (alice, bob):
            env = envs[u]
            assert env["CUDA_VISIBLE_DEVICES"] == "0,1", env
            assert env["NSML_NODE"] == "local-test"
            assert env["NSML_API_URL"].endswith("/services/nsml/api/")
            placed = active_placement(hub, u)
            assert placed["state"] == "placed"
            assert [str(i) for i in placed["allocation"]["gpu_indices"]] == seen[u]
            host = containers(u).attrs["HostConfig"]
            assert host["NetworkMode"] == "host"
            assert host["Memory"] == 512 * 1024 * 1024 and host["NanoCpus"] == 500_000_000

        # The third asks for 1 GPU: all 4 are taken, so it waits in the NSML queue.
        asked: Future[requests.Response] = pool.submit(
            spawn, hub, carol, gpus=1, gpu_model=model, **SMALL
        )
        events = progress_events(hub, carol, lambda e: "queue at position" in e.get("message", ""))
        assert "position 1" in events[-1]["message"], events
        assert "Insufficient gpu" in events[-1]["message"], events
        waiting = active_placement(hub, carol)
        assert waiting["state"] == "waiting" and waiting["position"] == 1

        # Alice stops: her GPUs are released and carol starts on one of them.
        alice_pid = active_placement(hub, alice)["id"]
        hub.admin("DELETE", f"/users/{alice}/server")
        wait_for(lambda: stopped(hub, alice), timeout=60, what="alice stopped")
        released = hub.nsml("GET", f"placements/{alice_pid}", hub.user_token(alice)).json()
        assert released["state"] == "released", released
        assert released["allocation"]["state"] == "released"
        assert asked.result().status_code in (201, 202)
        wait_for(lambda: ready(hub, carol), timeout=60, what="carol ready after alice stopped")
        carol_gpus = container_env(containers(carol))["NVIDIA_VISIBLE_DEVICES"].split(",")
        assert len(carol_gpus) == 1 and carol_gpus[0] in seen[alice], (carol_gpus, seen)


def test_the_spawn_form_offers_gpus_and_starts_the_server_it_describes(
    hub: HubProcess, servers: list[str], containers: Callable[[str], Any]
) -> None:
    name = "sp-form"
    servers.append(name)
    model = local_model(hub)
    session = hub.login(name)
    page = session.get(f"{hub.url}/hub/spawn", timeout=30)
    assert page.status_code == 200
    assert 'name="gpus"' in page.text and f'<option value="{model}">' in page.text
    r = session.post(
        f"{hub.url}/hub/spawn",
        params={"_xsrf": session.cookies.get("_xsrf")},
        data={"gpus": "1", "gpu_model": model, "cpu": "0.5", "memory": "384M", "datasets": ""},
        timeout=60,
    )
    assert r.status_code == 200, r.text[:500]
    wait_for(lambda: ready(hub, name), timeout=60, what="the form's server ready")
    env = container_env(containers(name))
    assert len(env["NVIDIA_VISIBLE_DEVICES"].split(",")) == 1
    assert containers(name).attrs["HostConfig"]["Memory"] == 384 * 1024 * 1024


# ---- out of memory ----------------------------------------------------------------------------


def test_a_server_that_allocates_past_its_memory_limit_is_stopped_as_out_of_memory(
    hub: HubProcess, servers: list[str], containers: Callable[[str], Any]
) -> None:
    name = "sp-oom"
    servers.append(name)
    r = spawn(hub, name, gpus=1, gpu_model=local_model(hub), cpu=0.5, memory="256M")
    assert r.status_code in (201, 202), r.text
    wait_for(lambda: ready(hub, name), timeout=60, what="the 256M server ready")
    container = containers(name)
    pid = active_placement(hub, name)["id"]
    # Watch the engine's own record before the spawner removes the container.
    oom: dict[str, Any] = {}

    def watch() -> None:
        for _ in range(200):
            try:
                container.reload()
            except Exception:
                return
            if container.status != "running":
                oom.update(container.attrs["State"])
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    container.exec_run(["python", "-c", OOM_SCRIPT], user="1000")
    watcher.join(30)
    assert oom.get("OOMKilled") is True and oom.get("ExitCode") == 137, oom

    wait_for(lambda: stopped(hub, name), timeout=30, what="the hub shows the server stopped")
    server = hub.admin("GET", f"/users/{name}/server").json()
    assert server["stopped"] is True and server["ready"] is False
    last = server["state"]["last_exit"]
    assert last["reason"] == "oom_killed" and last["exit_code"] == 137, last
    assert "Out of memory" in last["message"] and "256M" in last["message"]
    assert hub.nsml("GET", f"placements/{pid}", hub.user_token(name)).json()["state"] == "released"
    assert "killed by the engine at its 256M memory limit" in hub.log_text()
    # The next spawn form tells the user why.
    form = hub.login(name).get(f"{hub.url}/hub/spawn", timeout=30)
    assert "Your last server stopped. Out of memory" in form.text


# ---- hub restart ------------------------------------------------------------------------------


def test_a_hub_restart_keeps_servers_running_with_their_gpus_allocated(
    hub: HubProcess, servers: list[str], containers: Callable[[str], Any]
) -> None:
    name = "sp-restart"
    servers.append(name)
    r = spawn(hub, name, gpus=1, gpu_model=local_model(hub), **SMALL)
    assert r.status_code in (201, 202), r.text
    wait_for(lambda: ready(hub, name), timeout=60, what="server ready")
    container = containers(name)
    placement = active_placement(hub, name)
    token = hub.user_token(name)

    hub.stop()
    container.reload()
    assert container.status == "running", "the container outlives the hub"
    hub.start()

    assert ready(hub, name)
    r = requests.get(
        f"{hub.url}/user/{name}/api/status", headers={"Authorization": f"token {token}"}, timeout=30
    )
    assert r.status_code == 200, r.text[:300]
    again = hub.nsml("GET", f"placements/{placement['id']}", token).json()
    assert again["state"] == "placed", again
    assert again["allocation"] == placement["allocation"]

    hub.admin("DELETE", f"/users/{name}/server")
    wait_for(lambda: stopped(hub, name), timeout=60, what="server stopped after the restart")
    after = hub.nsml("GET", f"placements/{placement['id']}", token).json()
    assert after["state"] == "released" and after["allocation"]["state"] == "released"


# ---- bad options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "words"),
    [
        pytest.param(
            {"image": "evil/miner:latest"},
            ["image='evil/miner:latest' is not allowed", "valid: jupyter-nsml/singleuser"],
            id="unknown image",
        ),
        pytest.param(
            {"gpus": 99},
            ["gpus=99: the most GPUs on one node is", "valid: 0, 0.25, 0.5, 1, "],
            id="99 GPUs",
        ),
        pytest.param(
            {"gpus": 0.3},
            ["gpus=0.3 is not a share of a GPU offered here", "valid: 0, 0.25, 0.5, 1, "],
            id="a share that is not offered",
        ),
        pytest.param(
            {"datasets": ["../../etc"]},
            ["datasets: invalid dataset name '../../etc'", "letters, digits"],
            id="invalid dataset name",
        ),
        pytest.param(
            {"memory": "-5G"}, ["memory='-5G' must be a positive size"], id="negative memory"
        ),
    ],
)
def test_bad_user_options_are_a_400_that_lists_the_choices_and_allocate_nothing(
    hub: HubProcess, servers: list[str], options: dict[str, Any], words: list[str]
) -> None:
    name = "sp-bad"
    servers.append(name)
    r = spawn(hub, name, **options)
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    for w in words:
        assert w in body["message"], (w, body)
    assert "Traceback" not in r.text
    wait_for(lambda: stopped(hub, name), timeout=30, what="no server")
    assert placements(hub, name) == []

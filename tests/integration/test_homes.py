"""Every user's files outlive their notebook server: a real hub, real containers, real volumes.

The hub's home is a Docker volume per user on the node (``PREFIX-home-USER``). Whoever stops
the server (the user, an admin, the idle culler) and however it ends (the container dies),
the container goes and the volume stays, and the next server of the user finds the files.
Another user's server never mounts it. A second hub shows a folder on a shared filesystem (a
bind mount, as NFS is mounted on every node) working as the home.

Servers ask for a quarter of one of the local node's virtual GPUs, so that nodes other tests
register (whose engines the hub cannot reach) are never chosen.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.hub_fixtures import remove_deployment, stop_all_servers, unique_prefix
from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_placements import local_model
from tests.integration.test_spawner import (  # noqa: F401  (fixtures)
    containers,
    ready,
    servers,
    spawn,
    stopped,
)

pytestmark = [pytest.mark.hub, pytest.mark.docker]

HOME = "/home/jovyan"


def start(hub: HubProcess, name: str) -> None:
    r = spawn(hub, name, gpus=0.25, gpu_model=local_model(hub), cpu=0.5, memory="512M")
    assert r.status_code in (201, 202), r.text
    wait_for(lambda: ready(hub, name), timeout=90, what=f"{name}'s server ready")


def run(container: Any, *cmd: str) -> str:
    """Run *cmd* in the server's container as the notebook user; its output."""
    out = container.exec_run(list(cmd), user="1000")
    assert out.exit_code == 0, out.output
    return str(out.output.decode())


def write(container: Any, path: str, text: str) -> None:
    run(container, "python3", "-c", f"open({path!r}, 'w').write({text!r})")


def read(container: Any, path: str) -> str:
    return run(container, "python3", "-c", f"print(open({path!r}).read(), end='')")


def home_mounts(container: Any) -> list[dict[str, Any]]:
    return [m for m in container.attrs["Mounts"] if m["Destination"] == HOME]


def home_volume(hub: HubProcess, docker_client: Any, name: str) -> Any:
    prefix = hub.env_overrides["NSML_CONTAINER_PREFIX"]
    found = docker_client.volumes.list(
        filters={"label": [f"nsml.user={name}", f"nsml.deployment={prefix}"]}
    )
    assert len(found) == 1, [v.name for v in found]
    return found[0]


# ---- ways a server stops ----------------------------------------------------------------------

CULLER_SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]


def stop_by_the_user(hub: HubProcess, name: str, container: Any) -> None:
    token = hub.user_token(name)
    r = requests.delete(
        f"{hub.api}/users/{name}/server", headers={"Authorization": f"token {token}"}, timeout=60
    )
    assert r.status_code in (202, 204), r.text


def stop_by_an_admin(hub: HubProcess, name: str, container: Any) -> None:
    assert hub.admin("DELETE", f"/users/{name}/server").status_code in (202, 204)


def cull(hub: HubProcess, name: str, container: Any) -> None:
    """What jupyterhub-idle-culler does to an idle server, with a token of exactly its scopes."""
    token = hub.user_token("admin", scopes=CULLER_SCOPES, note="idle-culler")
    headers = {"Authorization": f"token {token}"}
    users = requests.get(f"{hub.api}/users", headers=headers, timeout=30)
    assert users.status_code == 200, users.text
    assert any(u["name"] == name and u["servers"] for u in users.json())
    r = requests.delete(f"{hub.api}/users/{name}/server", headers=headers, timeout=60)
    assert r.status_code in (202, 204), r.text


def kill_the_container(hub: HubProcess, name: str, container: Any) -> None:
    """The server ends by itself (a crash): the spawner's poll notices and cleans up."""
    container.kill()


STOPS = [
    pytest.param(stop_by_the_user, id="stopped by the user"),
    pytest.param(stop_by_an_admin, id="stopped by an admin"),
    pytest.param(cull, id="culled as idle"),
    pytest.param(kill_the_container, id="its container died"),
]


@pytest.mark.parametrize("stop", STOPS)
def test_a_file_in_the_home_is_there_after_the_server_stops_and_starts_again(
    hub: HubProcess,
    docker_client: Any,
    servers: list[str],  # noqa: F811
    containers: Callable[[str], Any],  # noqa: F811
    stop: Callable[[HubProcess, str, Any], None],
) -> None:
    name = "home" + stop.__name__.rsplit("_", 1)[-1]  # e.g. homeuser, homecull
    servers.append(name)
    start(hub, name)
    first = containers(name)
    write(first, f"{HOME}/notes.txt", f"written before {stop.__name__}\n")
    (mount,) = home_mounts(first)
    volume = home_volume(hub, docker_client, name)
    assert (mount["Type"], mount["Name"], mount["RW"]) == ("volume", volume.name, True)
    prefix = hub.env_overrides["NSML_CONTAINER_PREFIX"]
    assert volume.name == f"{prefix}-home-{name}"
    assert volume.attrs["Labels"]["nsml.kind"] == "home"

    stop(hub, name, first)
    wait_for(lambda: stopped(hub, name), timeout=60, what=f"{name} stopped")
    wait_for(
        lambda: not docker_client.containers.list(all=True, filters={"id": first.id}),
        timeout=30,
        what="the stopped server's container removed",
    )
    volume.reload()  # still there

    start(hub, name)
    second = containers(name)
    assert second.id != first.id
    assert read(second, f"{HOME}/notes.txt") == f"written before {stop.__name__}\n"
    assert home_mounts(second)[0]["Name"] == volume.name


def test_a_new_home_belongs_to_the_notebook_user_and_says_where_it_is(
    hub: HubProcess,
    docker_client: Any,
    servers: list[str],  # noqa: F811
    containers: Callable[[str], Any],  # noqa: F811
) -> None:
    name = "homenew"
    servers.append(name)
    start(hub, name)
    c = containers(name)
    assert run(
        c, "python3", "-c", f"import os; s=os.stat({HOME!r}); print(s.st_uid, s.st_gid)"
    ) == ("1000 100\n")
    volume = home_volume(hub, docker_client, name)
    assert f"Mounted your home folder (volume {volume.name}, at {HOME}) on local-test (new" in (
        hub.log_text()
    )


def test_another_users_server_never_mounts_the_home(
    hub: HubProcess,
    docker_client: Any,
    servers: list[str],  # noqa: F811
    containers: Callable[[str], Any],  # noqa: F811
) -> None:
    # Two names that a careless escape would map onto one volume.
    alice, mallory = "hx.y", "hx-2ey"
    servers.extend([alice, mallory])
    start(hub, alice)
    write(containers(alice), f"{HOME}/secret.txt", "alice's\n")
    start(hub, mallory)
    theirs = containers(mallory)
    volumes = {n: home_mounts(containers(n))[0]["Name"] for n in (alice, mallory)}
    assert volumes[alice] != volumes[mallory], volumes
    every_mount = [m.get("Name") or m["Source"] for m in theirs.attrs["Mounts"]]
    assert volumes[alice] not in every_mount and not any(
        volumes[alice] in str(m) for m in every_mount
    )
    out = theirs.exec_run(["python3", "-c", f"import os; print(os.listdir({HOME!r}))"], user="1000")
    assert "secret.txt" not in out.output.decode()


def test_deleting_a_user_keeps_their_home_for_the_operator(
    hub: HubProcess,
    docker_client: Any,
    servers: list[str],  # noqa: F811
    containers: Callable[[str], Any],  # noqa: F811
) -> None:
    name = "homedeleted"
    start(hub, name)
    volume = home_volume(hub, docker_client, name)
    assert hub.admin("DELETE", f"/users/{name}/server").status_code in (202, 204)
    wait_for(lambda: stopped(hub, name), timeout=60, what=f"{name} stopped")
    assert hub.admin("DELETE", f"/users/{name}").status_code == 204
    volume.reload()  # kept: NSMLSpawner.remove_home_on_delete is off by default
    assert "their home volume" in hub.log_text() or f"home volume {volume.name}" in hub.log_text()


# ---- a shared folder as the home (NFS in production) ------------------------------------------


@pytest.fixture(scope="module")
def shared_homes_hub(
    docker_client: Any, singleuser_image: str
) -> Iterator[tuple[HubProcess, Path]]:
    """A second hub whose homes are folders under one host folder, bind-mounted as NFS is."""
    state = Path(tempfile.mkdtemp(prefix="nsml-hub-nfs-"))
    homes = Path(tempfile.mkdtemp(prefix="nsml-shared-homes-"))
    homes.chmod(0o755)
    prefix = unique_prefix("nsmlnfs")
    h = HubProcess(
        state,
        env_overrides={
            "NSML_CONTAINER_PREFIX": prefix,
            "NSML_NOTEBOOK_IMAGE": singleuser_image,
            "NSML_HOME_VOLUME": f"{homes}/{{username}}",
        },
    )
    try:
        h.start()
        yield h, homes
    finally:
        stop_all_servers(h)
        try:
            if h.proc is not None:
                for user in h.admin("GET", "/users").json():
                    wait_for(lambda u=user["name"]: stopped(h, u), timeout=60, what="stopped")
        except Exception:
            pass
        h.stop()
        remove_deployment(docker_client, prefix)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(homes, ignore_errors=True)


def test_a_folder_on_a_shared_filesystem_works_as_the_home(
    shared_homes_hub: tuple[HubProcess, Path], docker_client: Any
) -> None:
    hub, homes = shared_homes_hub
    name = "nfsuser"
    prefix = hub.env_overrides["NSML_CONTAINER_PREFIX"]

    def container() -> Any:
        (c,) = [
            c
            for c in docker_client.containers.list(filters={"label": f"nsml.user={name}"}, all=True)
            if c.name.startswith(prefix)
        ]
        return c

    start(hub, name)
    first = container()
    (mount,) = home_mounts(first)
    assert (mount["Type"], mount["Source"], mount["RW"]) == ("bind", str(homes / name), True)
    write(first, f"{HOME}/train.py", "print('hello')\n")
    folder = homes / name
    assert (folder.stat().st_uid, folder.stat().st_gid) == (1000, 100)
    assert (folder / "train.py").read_text() == "print('hello')\n"
    assert not docker_client.volumes.list(filters={"label": f"nsml.deployment={prefix}"})

    assert hub.admin("DELETE", f"/users/{name}/server").status_code in (202, 204)
    wait_for(lambda: stopped(hub, name), timeout=60, what="stopped")
    start(hub, name)
    assert read(container(), f"{HOME}/train.py") == "print('hello')\n"
    assert "it is on a shared filesystem and kept" in hub.log_text()


def test_an_operator_who_asks_for_it_removes_homes_with_the_user(docker_client: Any) -> None:
    """``remove_home_on_delete``: the spawner removes the user's volume from every node."""
    import asyncio
    from types import SimpleNamespace

    from traitlets.config import Config

    from nsml_spawner import NSMLSpawner

    class Nodes:
        async def nodes(self) -> list[dict[str, Any]]:
            return [{"name": "here", "docker_url": None}, {"name": "far", "docker_url": None}]

    cfg = Config()
    cfg.NSMLSpawner.prefix = unique_prefix("nsmldel")
    cfg.NSMLSpawner.remove_home_on_delete = True
    cfg.NSMLSpawner.local_node = "here"

    class Spawner(NSMLSpawner):  # type: ignore[misc]
        api = Nodes()  # the node list, as the NSML API answers it

    spawner = Spawner(config=cfg, user=SimpleNamespace(name="leaver", url="/user/leaver/"))
    volume = docker_client.volumes.create(f"{cfg.NSMLSpawner.prefix}-home-leaver")
    try:
        asyncio.run(spawner.delete_forever())
        assert not docker_client.volumes.list(filters={"name": volume.name})
    finally:
        for v in docker_client.volumes.list(filters={"name": volume.name}):
            v.remove(force=True)

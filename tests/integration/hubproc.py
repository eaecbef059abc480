"""A real ``jupyterhub`` process running the project's embedded config, for tests.

One hub per test session (starting one costs seconds): the ``hub`` fixture in
``tests/integration/conftest.py`` owns it. An extra config file adds a test-only service
``test-admin`` whose token creates users and tokens through the hub's REST API.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]
HUB_CONFIG = REPO / "hub_config" / "jupyterhub_config.py"

TEST_CONFIG = """
c = get_config()  # noqa
c.JupyterHub.services.append(
    {"name": "test-admin", "api_token": %(token)r}
)
# Extra NSML servers started by tests (standbys) check tokens with this service's token.
c.JupyterHub.services.append(
    {"name": "nsml-standby", "api_token": %(standby_token)r}
)
c.JupyterHub.load_roles.append(
    {"name": "nsml-standby", "scopes": ["read:users", "read:groups"],
     "services": ["nsml-standby"]}
)
c.JupyterHub.load_roles.append(
    {"name": "test-admin", "scopes": ["admin:users", "admin:servers", "tokens", "list:users",
     "read:users", "access:services", "admin-ui", "admin:groups"], "services": ["test-admin"]}
)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HubProcess:
    """Start, stop and talk to one jupyterhub process and its ``nsml`` service."""

    state_dir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    admin_token: str = field(default_factory=lambda: os.urandom(16).hex())
    standby_token: str = field(default_factory=lambda: os.urandom(16).hex())
    user_password: str = "lab-password-1234"
    admin_password: str = "admin-password-" + "x" * 24
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port = free_port()
        self.api_port = free_port()
        self.service_port = free_port()
        self.proxy_api_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/hub/api"
        self.nsml_api = f"{self.url}/services/nsml/api"
        self.log_path = self.state_dir / "hub.log"
        self.extra_config = self.state_dir / "test_config.py"
        self.extra_config.write_text(
            TEST_CONFIG % {"token": self.admin_token, "standby_token": self.standby_token}
        )

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        env.update(
            NSML_STATE_DIR=str(self.state_dir),
            NSML_HUB_BIND_URL=self.url,
            NSML_HUB_API_PORT=str(self.api_port),
            NSML_SERVICE_PORT=str(self.service_port),
            NSML_PROXY_API_PORT=str(self.proxy_api_port),
            NSML_USER_PASSWORD=self.user_password,
            NSML_ADMIN_PASSWORD=self.admin_password,
            NSML_ADMIN_USERS="admin",
            NSML_VIRTUAL_GPUS="4",
            NSML_EXTRA_CONFIG=str(self.extra_config),
            NSML_NODE_NAME="local-test",
        )
        env.update(self.env_overrides)
        return env

    def start(self, timeout: float = 60) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterhub",
                "-f",
                str(HUB_CONFIG),
            ],
            cwd=self.state_dir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"jupyterhub exited ({code}):\n{self.log_tail()}")
            try:
                r = requests.get(f"{self.nsml_api}/health", timeout=2)
                if r.status_code == 200 and self.admin("GET", "/").status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"jupyterhub did not come up in {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the hub (it stops its proxy and services); SIGKILL the group if stuck.

        The hub runs in its own process group: whatever it leaves behind (a proxy, when the
        hub itself died) is stopped with the group.
        """
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(10)
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def admin(self, method: str, path: str, **kw: Any) -> requests.Response:
        """A hub REST API call with the test-admin service's token."""
        headers = {"Authorization": f"token {self.admin_token}"}
        return requests.request(method, self.api + path, headers=headers, timeout=60, **kw)

    def user_token(self, name: str, **token_request: Any) -> str:
        """Create user *name* if needed and return a new API token of theirs."""
        r = self.admin("GET", f"/users/{name}")
        if r.status_code == 404:
            self.admin("POST", f"/users/{name}").raise_for_status()
        r = self.admin("POST", f"/users/{name}/tokens", json=token_request or {"note": "test"})
        r.raise_for_status()
        return str(r.json()["token"])

    def login(self, name: str, password: str | None = None) -> requests.Session:
        """Log in through the hub's login form, like a browser; returns the cookie session."""
        s = requests.Session()
        s.get(f"{self.url}/hub/login", timeout=30).raise_for_status()
        xsrf = s.cookies.get("_xsrf")
        r = s.post(
            f"{self.url}/hub/login",
            data={"username": name, "password": password or self.user_password, "_xsrf": xsrf},
            allow_redirects=False,
            timeout=30,
        )
        if r.status_code != 302:
            raise AssertionError(f"login as {name} failed: {r.status_code} {r.text[:300]}")
        return s

    def nsml(self, method: str, path: str, token: str | None, **kw: Any) -> requests.Response:
        """A call to the NSML API through the proxy."""
        headers = kw.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"token {token}"
        return requests.request(
            method, f"{self.nsml_api}/{path}", headers=headers, timeout=30, **kw
        )


@dataclass
class ServerProcess:
    """A standalone ``nsml-server`` (e.g. a standby) that checks tokens with *hub*."""

    hub: HubProcess
    db_url: str
    name: str
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    local_node: bool = False
    #: more environment (e.g. DOCKER_CERT_PATH for the nodes' engines)
    env_overrides: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/services/nsml/api"
        self.log_path = self.hub.state_dir / f"{self.name}.log"

    def start(self, timeout: float = 60) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
        env.update(
            JUPYTERHUB_API_URL=f"http://127.0.0.1:{self.hub.api_port}/hub/api",
            JUPYTERHUB_API_TOKEN=self.hub.standby_token,
            JUPYTERHUB_SERVICE_NAME="nsml",
            NSML_DB_URL=self.db_url,
            NSML_STATE_DIR=str(self.hub.state_dir / self.name),
        )
        env.update(self.env_overrides)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "nsml-server"),
                "--port",
                str(self.port),
                *([] if self.local_node else ["--no-local-node"]),
                f"--NSMLServer.server_id={self.name}",
                *self.args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not come up:\n{self.log_path.read_text()[-3000:]}")

    def health(self) -> dict[str, Any]:
        return dict(requests.get(f"{self.api}/health", timeout=5).json())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def virtual_node_heartbeat(
    name: str, *, gpus: int = 8, cpu_milli: int = 64000, memory_mib: int = 262144
) -> dict[str, Any]:
    """A heartbeat body for a virtual node with *gpus* V100s and a (fake) engine address.

    A Docker node is only given work when the server knows how to reach its engine.
    """
    return {
        "docker_url": f"tcp://{name}.invalid:2376",
        "cpu_milli": cpu_milli,
        "memory_mib": memory_mib,
        "gpu_probe": {"kind": "virtual", "enabled": True},
        "gpus": [
            {"index": i, "uuid": f"GPU-{name}-{i}", "model": "V100", "memory_total_mib": 16384}
            for i in range(gpus)
        ],
    }

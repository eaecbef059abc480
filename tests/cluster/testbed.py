"""A cluster of several nodes on one machine, for tests and benchmarks.

``cluster(engines=N)`` starts, and always tears down again:

- node ``node-a``: the hub's own node, on the default Docker engine (the one that already
  runs); the NSML server runs its agent in-process, as in the embedded default;
- nodes ``node-b``, ``node-c`` (``engines`` = 2 or 3): each a Docker engine of its own,
  started with ``scripts/docker-engine.sh ensure --name node-b --tls-listen 127.0.0.1:PORT
  --tls-dir TLS`` (own socket, data root and exec root; TCP with ``--tlsverify`` on a
  loopback port, certificates made by ``scripts/docker-engine.sh certs`` for this run), the
  notebook image loaded into it, and an ``nsml-agent`` process with its own dataset cache and
  virtual GPUs that advertises the engine's TLS URL;
- a real PostgreSQL (a private cluster, or a fresh database on a server the caller gives);
- a real hub (``HubProcess``) whose NSML server uses that database and reaches the remote
  engines with the client certificate in ``DOCKER_CERT_PATH``.

Named engines keep their data root between runs (``$NSML_TESTBED_DIR``, default
``/var/lib/jupyter-nsml/testbed``), so the image is loaded once, not per run: a run takes the
folder ``node-b`` under a lock and, when another run holds it, ``node-b-2`` and so on.
Everything else is made fresh per run; containers and volumes on the named engines are
removed at both ends of a run.

Usage::

    with cluster(engines=3, image="jupyter-nsml/singleuser:latest") as tb:
        tb.hub.nsml("GET", "nodes", tb.admin_token)
        tb.containers("node-b")
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import docker
import requests
from docker import DockerClient
from sqlalchemy import create_engine, text

from nsml_server.backends.docker import remote_tls
from tests.integration.hubproc import HubProcess, ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]
ENGINE_SCRIPT = REPO / "scripts" / "docker-engine.sh"
NSML_AGENT = str(Path(sys.executable).parent / "nsml-agent")
NODE_NAMES = ("node-a", "node-b", "node-c")
DEFAULT_SLOTS_DIR = "/var/lib/jupyter-nsml/testbed"


class TestbedUnavailable(RuntimeError):
    """This machine cannot run the test bed (no root, no dockerd, no openssl ...)."""

    __test__ = False  # a name that starts with "Test", not a test class


def why_unavailable() -> str | None:
    """Why the test bed cannot start here, or None when it can."""
    if os.geteuid() != 0:
        return "starting Docker engines needs root"
    for tool in ("dockerd", "docker", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup-env.sh --test installs it)"
    return None


def _run(cmd: Sequence[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        list(cmd), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, **kw
    )
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


@dataclass
class Engine:
    """One node's Docker engine."""

    node: str
    docker_host: str
    tls_url: str | None = None
    #: the engine's name for scripts/docker-engine.sh (None: the default engine)
    slot: str | None = None
    slots_dir: Path | None = None
    tls_dir: Path | None = None
    tls_port: int | None = None
    lock: IO[bytes] | None = None
    _client: DockerClient | None = None

    @property
    def client(self) -> DockerClient:
        """A docker-py client over the engine's local socket."""
        if self._client is None:
            self._client = docker.DockerClient(base_url=self.docker_host, timeout=60)
        return self._client

    def script(self, command: str, *extra: str, timeout: float = 90) -> str:
        """Run ``scripts/docker-engine.sh COMMAND`` for this (named) engine."""
        assert self.slot is not None and self.slots_dir is not None
        cmd = [
            "bash",
            str(ENGINE_SCRIPT),
            command,
            "--name",
            self.slot,
            "--state-dir",
            str(self.slots_dir),
            *extra,
        ]
        return _run(cmd, timeout=timeout).stdout

    def start(self) -> None:
        """Start the engine, with TCP+TLS on its loopback port (named engines only)."""
        assert self.tls_dir is not None and self.tls_port is not None
        self.script(
            "ensure",
            "--tls-listen",
            f"127.0.0.1:{self.tls_port}",
            "--tls-dir",
            str(self.tls_dir),
        )

    def stop(self) -> None:
        """Stop the engine (the script stops only an engine it started)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self.script("stop", timeout=120)

    def answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    def image_id(self, image: str) -> str | None:
        try:
            return str(self.client.images.get(image).id)
        except docker.errors.ImageNotFound:
            return None

    def remove_all(self, name_prefix: str | None = None) -> None:
        """Remove containers (those named *name_prefix*…, or all) and their volumes."""
        for c in self.client.containers.list(all=True):
            if name_prefix is None or c.name.startswith(name_prefix):
                with contextlib.suppress(docker.errors.NotFound):
                    c.remove(force=True, v=True)
        for v in self.client.volumes.list():
            if name_prefix is None or v.name.startswith(name_prefix):
                with contextlib.suppress(docker.errors.APIError):
                    v.remove(force=True)


@dataclass
class Agent:
    """An ``nsml-agent`` process for one remote node."""

    node: str
    engine: Engine
    api_url: str
    token: str
    cache_dir: Path
    log_path: Path
    gpus: int
    gpu_model: str
    interval: float
    cache_bytes: int
    proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        assert self.engine.tls_url is not None
        return [
            NSML_AGENT,
            "--name",
            self.node,
            "--docker-url",
            self.engine.tls_url,
            "--cache-dir",
            str(self.cache_dir),
            "--cache-bytes",
            str(self.cache_bytes),
            "--interval",
            str(self.interval),
            "--holds-interval",
            "0.2",
        ]

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "DOCKER_"))}
        env.update(
            DOCKER_HOST=self.engine.docker_host,
            NSML_API_URL=self.api_url,
            NSML_TOKEN=self.token,
            NSML_VIRTUAL_GPUS=str(self.gpus),
            NSML_VIRTUAL_GPU_MODEL=self.gpu_model,
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the agent (SIGKILL: as if it died)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Testbed:
    """A running cluster: its engines, agents, database and hub."""

    __test__ = False  # not a test class, whatever its name

    state_dir: Path
    image: str
    prefix: str
    db_url: str
    tls_dir: Path
    hub: HubProcess
    engines: dict[str, Engine] = field(default_factory=dict)
    agents: dict[str, Agent] = field(default_factory=dict)
    #: a second NSML server on the same database (``standby=True``), waiting for the lease
    standby: ServerProcess | None = None

    @property
    def nodes(self) -> list[str]:
        """Node names, ``node-a`` first."""
        return list(self.engines)

    @property
    def remote_nodes(self) -> list[str]:
        return [n for n in self.engines if n != "node-a"]

    @property
    def cert_path(self) -> Path:
        """The NSML server's client certificate folder (its ``DOCKER_CERT_PATH``)."""
        return self.tls_dir / "client"

    @property
    def admin_token(self) -> str:
        return self.hub.user_token("admin")

    def docker(self, node: str) -> DockerClient:
        """A docker-py client of *node*'s engine (over its local socket)."""
        return self.engines[node].client

    def tls_client(self, node: str) -> DockerClient:
        """A client of *node*'s engine over TCP+TLS, as the NSML server reaches it."""
        engine = self.engines[node]
        assert engine.tls_url is not None, f"{node} serves no TCP"
        tls = remote_tls(engine.tls_url, str(self.cert_path))
        return docker.DockerClient(base_url=engine.tls_url, tls=tls, timeout=30)

    def containers(self, node: str, *, all: bool = False) -> list[Any]:
        """This run's containers on *node* (named with the run's prefix)."""
        return [
            c for c in self.docker(node).containers.list(all=all) if c.name.startswith(self.prefix)
        ]

    def container_names(self, node: str, *, all: bool = False) -> list[str]:
        return sorted(c.name for c in self.containers(node, all=all))

    def node(self, name: str) -> dict[str, Any]:
        r = self.hub.nsml("GET", f"nodes/{name}", self.admin_token)
        r.raise_for_status()
        return dict(r.json())

    def wait_nodes_up(self, nodes: Sequence[str] | None = None, timeout: float = 60) -> None:
        """Wait until *nodes* (default all) are ``up`` with the image present."""
        want = list(nodes or self.nodes)
        token = self.admin_token
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            r = self.hub.nsml("GET", "nodes", token)
            if r.status_code == 200:
                by_name = {n["name"]: n for n in r.json()["nodes"]}
                last = {n: (by_name.get(n) or {}).get("state") for n in want}
                if all(
                    n in by_name
                    and by_name[n]["state"] == "up"
                    and self.image in by_name[n]["images"]
                    for n in want
                ):
                    return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not up within {timeout}s: {last}\n{self.logs()}")

    def set_state(self, node: str, state: str) -> dict[str, Any]:
        """``PATCH nodes/NODE {"state": ...}`` as an admin (``draining``, ``up``, ``down``)."""
        r = self.hub.nsml("PATCH", f"nodes/{node}", self.admin_token, json={"state": state})
        if r.status_code != 200:
            raise AssertionError(f"{node} -> {state}: {r.status_code} {r.text}")
        return dict(r.json())

    @contextlib.contextmanager
    def only(self, *nodes: str) -> Iterator[None]:
        """Drain every node but *nodes* for the block; undrain them afterwards."""
        others = [n for n in self.nodes if n not in nodes]
        try:
            for n in others:
                self.set_state(n, "draining")
            yield
        finally:
            for n in others:
                self.set_state(n, "up")

    def start_agent(self, node: str) -> None:
        self.agents[node].start()

    def stop_agent(self, node: str, sig: int = signal.SIGTERM) -> None:
        self.agents[node].stop(sig)

    def logs(self, lines: int = 40) -> str:
        """The tails of the hub's and the agents' logs (for failure messages)."""
        parts = [f"--- hub\n{self.hub.log_tail(lines)}"]
        for name, a in self.agents.items():
            if a.log_path.exists():
                tail = a.log_path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- agent {name}\n" + "\n".join(tail))
        return "\n".join(parts)


# ---- set-up steps ---------------------------------------------------------------------------


def _take_slot(slots_dir: Path, node: str) -> tuple[str, IO[bytes]]:
    """Lock a persistent engine folder for *node*: ``node-b``, else ``node-b-2`` …"""
    slots_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, 20):
        slot = node if i == 1 else f"{node}-{i}"
        f = open(slots_dir / f"{slot}.lock", "wb")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        return slot, f
    raise TestbedUnavailable(f"all engine folders for {node} under {slots_dir} are in use")


def load_image(image: str, source: DockerClient, targets: Sequence[Engine]) -> None:
    """Copy *image* from the *source* engine into each target that lacks that exact image.

    One ``docker save`` stream is fed to every ``docker load`` at once.
    """
    want = source.images.get(image).id
    missing = [e for e in targets if e.image_id(image) != want]
    if not missing:
        return
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    base = getattr(source.api, "base_url", "")
    if base.startswith("http+docker://"):
        saver_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    else:
        saver_host = base
    saver = subprocess.Popen(
        ["docker", "-H", saver_host, "save", image],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    errs = [tempfile.TemporaryFile() for _ in missing]
    loaders = [
        subprocess.Popen(
            ["docker", "-H", e.docker_host, "load", "-q"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
        for e, err in zip(missing, errs, strict=True)
    ]
    assert saver.stdout is not None
    try:
        while chunk := saver.stdout.read(1 << 20):
            for p in loaders:
                assert p.stdin is not None
                p.stdin.write(chunk)
    finally:
        for p in loaders:
            assert p.stdin is not None
            p.stdin.close()
        saver.wait(300)
        for p in loaders:
            p.wait(300)
    for e, p, err in zip(missing, loaders, errs, strict=True):
        err.seek(0)
        message = err.read().decode(errors="replace")[-2000:]
        err.close()
        if p.returncode != 0 or e.image_id(image) != want:
            raise RuntimeError(f"loading {image} into {e.node} failed: {message}")
    for e in missing:  # the previous build of the image, now untagged
        with contextlib.suppress(docker.errors.APIError):
            e.client.images.prune(filters={"dangling": True})


def fresh_database(server_url: str, name: str) -> str:
    """Create (or re-create) database *name* on the server of *server_url*; return its URL."""
    admin = create_engine(server_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def _in_parallel(fns: Sequence[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@contextlib.contextmanager
def cluster(
    engines: int = 3,
    *,
    image: str,
    db_url: str | None = None,
    gpus_per_node: int = 4,
    gpu_model: str = "V100",
    server_args: Sequence[str] = (),
    hub_env: dict[str, str] | None = None,
    agent_interval: float = 1.0,
    agent_cache_bytes: int = 1 << 30,
    slots_dir: Path | None = None,
    standby: bool = False,
) -> Iterator[Testbed]:
    """Start a cluster of *engines* nodes (1 to 3) and tear it down on exit, even on errors.

    Args:
        engines: 1: ``node-a`` only; 2: and ``node-b``; 3: and ``node-c``.
        image: the notebook/session image; it must exist on the default engine.
        db_url: a PostgreSQL URL whose server may get a fresh database for this run; None:
            start a private PostgreSQL cluster.
        gpus_per_node: virtual GPUs on every node.
        gpu_model: their model name.
        server_args: extra NSML server arguments, e.g. ``["--NSMLServer.node_timeout=5"]``.
        hub_env: extra environment for the hub (and its NSML server).
        agent_interval: seconds between the agents' heartbeats.
        agent_cache_bytes: each remote node's dataset cache budget.
        slots_dir: where named engines keep their data (default ``$NSML_TESTBED_DIR`` or
            ``/var/lib/jupyter-nsml/testbed``).
        standby: also start a standby NSML server (no local node) on the same database,
            reaching the nodes' engines with the same client certificate.

    ``$NSML_TESTBED_LOGS``, when set, is a folder that receives the run's logs at the end.
    """
    if not 1 <= engines <= len(NODE_NAMES):
        raise ValueError(f"engines must be 1, 2 or 3, not {engines}")
    why = why_unavailable()
    if why:
        raise TestbedUnavailable(why)
    slots = slots_dir or Path(os.environ.get("NSML_TESTBED_DIR", DEFAULT_SLOTS_DIR))
    # Short: engine sockets live under it and Unix socket paths are limited to 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="nsml-tb-"))
    prefix = f"nsmltb{os.getpid()}x{os.urandom(2).hex()}"
    stack = contextlib.ExitStack()
    try:
        default = docker.from_env(timeout=60)
        stack.callback(default.close)
        local = Engine("node-a", os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
        local._client = default
        tb_engines: dict[str, Engine] = {"node-a": local}
        tls_dir = state / "tls"
        _run(["bash", str(ENGINE_SCRIPT), "certs", "--tls-dir", str(tls_dir)])
        remote: list[Engine] = []
        for node in NODE_NAMES[1:engines]:
            slot, lock = _take_slot(slots, node)
            stack.callback(lock.close)
            port = free_port()
            e = Engine(
                node,
                f"unix://{slots / slot / 'docker.sock'}",
                tls_url=f"tcp://127.0.0.1:{port}",
                slot=slot,
                slots_dir=slots,
                tls_dir=tls_dir,
                tls_port=port,
                lock=lock,
            )
            # A leftover engine of a run that died: stop it (it serves an old port).
            e.stop()
            stack.callback(e.stop)
            remote.append(e)
            tb_engines[node] = e
        for e in remote:  # where the CA key lives: each engine's server certificate
            e.script("certs", "--tls-dir", str(tls_dir))
        _in_parallel([e.start for e in remote])
        for e in remote:
            e.remove_all()
            stack.callback(e.remove_all)
        load_image(image, default, remote)

        if db_url is None:
            from tests.integration.pgproc import private_postgres

            db_url = stack.enter_context(private_postgres())
        else:
            db_url = fresh_database(db_url, f"nsml_cluster_{prefix}")

        (state / "hub").mkdir()
        hub = HubProcess(state / "hub")
        args = ["--NSMLServer.heartbeat_interval=2", *server_args]
        hub.env_overrides.update(
            NSML_CONTAINER_PREFIX=prefix,
            NSML_NOTEBOOK_IMAGE=image,
            NSML_NODE_NAME="node-a",
            NSML_VIRTUAL_GPUS=str(gpus_per_node),
            NSML_VIRTUAL_GPU_MODEL=gpu_model,
            NSML_DB_URL=db_url,
            NSML_SERVER_ARGS=shlex.join(args),
            DOCKER_CERT_PATH=str(tls_dir / "client"),
            **(hub_env or {}),
        )
        tb = Testbed(state, image, prefix, db_url, tls_dir, hub, tb_engines)
        stack.callback(local.remove_all, prefix)
        stack.callback(hub.stop)
        stack.callback(_stop_servers, hub)
        hub.start(timeout=90)
        token = hub.user_token("admin")
        for e in remote:
            cache = state / f"cache-{e.node}"
            cache.mkdir()
            agent = Agent(
                e.node,
                e,
                hub.nsml_api,
                token,
                cache,
                state / f"agent-{e.node}.log",
                gpus_per_node,
                gpu_model,
                agent_interval,
                agent_cache_bytes,
            )
            tb.agents[e.node] = agent
            stack.callback(agent.stop)
            agent.start()
        if standby:
            tb.standby = ServerProcess(
                hub,
                db_url,
                "standby",
                args=list(args),
                env_overrides={"DOCKER_CERT_PATH": str(tls_dir / "client")},
            )
            stack.callback(tb.standby.stop)
            tb.standby.start()
        tb.wait_nodes_up()
        yield tb
    finally:
        try:
            stack.close()
        finally:
            keep = os.environ.get("NSML_TESTBED_LOGS")
            if keep:  # the hub's, the NSML server's and the agents' logs of this run
                dest = Path(keep) / state.name
                dest.mkdir(parents=True, exist_ok=True)
                for log in state.rglob("*.log"):
                    with contextlib.suppress(OSError):
                        shutil.copy(log, dest / log.name)
            shutil.rmtree(state, ignore_errors=True)


def _stop_servers(hub: HubProcess) -> None:
    """Stop every user's notebook server through the hub (its spawner releases the GPUs)."""
    if hub.proc is None:
        return
    with contextlib.suppress(requests.RequestException, ValueError):
        for user in hub.admin("GET", "/users").json():
            if user.get("server") or user.get("pending"):
                hub.admin("DELETE", f"/users/{user['name']}/server")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.cluster.testbed [ENGINES]``: start a cluster, print it, wait for ^C."""
    n = int((argv or sys.argv[1:] or ["3"])[0])
    image = os.environ.get("NSML_NOTEBOOK_IMAGE", "jupyter-nsml/singleuser:latest")
    t0 = time.monotonic()
    with cluster(n, image=image) as tb:
        print(
            json.dumps(
                {
                    "hub": tb.hub.url,
                    "nsml_api": tb.hub.nsml_api,
                    "admin_token": tb.admin_token,
                    "nodes": {
                        n: {"docker_host": e.docker_host, "tls_url": e.tls_url}
                        for n, e in tb.engines.items()
                    },
                    "DOCKER_CERT_PATH": str(tb.cert_path),
                    "started_in_s": round(time.monotonic() - t0, 1),
                },
                indent=2,
            ),
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())

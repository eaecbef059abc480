"""Spawn-to-ready latency of NSMLSpawner against plain DockerSpawner, and 50 concurrent spawns.

Two real jupyterhub processes run side by side from the project's embedded config, on the
same Docker engine and the same notebook image:

* ``nsml``: NSMLSpawner (validation, a placement from the NSML scheduler, GPUs, limits);
* ``dockerspawner``: plain DockerSpawner with host networking and the same CPU and memory
  limits, switched in through ``NSML_EXTRA_CONFIG``.

Latency: one server at a time, alternating between the two hubs (so drift hits both alike),
from ``POST /hub/api/users/NAME/server`` until the hub reports the server ready (the POST
returns once the server answers and is in the proxy, or the ready flag is polled), after one
unmeasured warm-up spawn each. Then ``--concurrent`` users ask the NSML hub for a server at
the same moment, each with a quarter of a (virtual) GPU; all must become ready with no error,
and no GPU may be given beyond its capacity.

    .venv/bin/python bench/spawn_latency.py --out bench/results/spawn_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.hubproc import HubProcess  # noqa: E402

IMAGE = os.environ.get("NSML_NOTEBOOK_IMAGE", "jupyter-nsml/singleuser:latest")

NSML_CONFIG = """
c = get_config()  # noqa
c.NSMLSpawner.allow_gpu_sharing = True
c.JupyterHub.concurrent_spawn_limit = 200
# 50 servers starting at once on a small machine, each with its share of the CPUs as a hard
# limit, take longer than the embedded default allows (start 120 s, answer 60 s).
c.Spawner.start_timeout = 600
c.Spawner.http_timeout = 600
"""

DOCKERSPAWNER_CONFIG = """
from dockerspawner import DockerSpawner
from jupyterhub.utils import random_port


class HostNetworkDockerSpawner(DockerSpawner):
    # Host networking: a free port per start, reached at 127.0.0.1.
    async def start(self):
        self.port = random_port()
        return await super().start()

    async def get_ip_and_port(self):
        return "127.0.0.1", self.port


c = get_config()  # noqa
c.JupyterHub.spawner_class = HostNetworkDockerSpawner
c.JupyterHub.concurrent_spawn_limit = 200
c.DockerSpawner.image = %(image)r
c.DockerSpawner.network_name = "host"
c.DockerSpawner.use_internal_ip = True
c.DockerSpawner.pull_policy = "never"
c.DockerSpawner.remove = True
c.DockerSpawner.cpu_limit = %(cpu)r
c.DockerSpawner.mem_limit = %(memory)r
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "median_s": round(statistics.median(values), 3),
        "p90_s": round(pct(values, 0.9), 3),
        "min_s": round(min(values), 3),
        "max_s": round(max(values), 3),
        "all_s": [round(v, 3) for v in values],
    }


def start_hub(
    stack: ExitStack, name: str, extra: str, env: dict[str, str], keep: bool = False
) -> HubProcess:
    state = Path(tempfile.mkdtemp(prefix=f"nsml-bench-{name}-"))
    if keep:
        print(f"{name} hub: state and log kept in {state}", flush=True)
    else:
        stack.callback(shutil.rmtree, state, True)
    (state / "bench_config.py").write_text(extra)
    hub = HubProcess(state)
    hub.env_overrides = {
        "NSML_CONTAINER_PREFIX": f"bench{name}{os.getpid()}",
        "NSML_NOTEBOOK_IMAGE": IMAGE,
        "NSML_EXTRA_CONFIG": f"{hub.extra_config}:{state / 'bench_config.py'}",
        **env,
    }
    hub.start(timeout=120)
    stack.callback(stop_everything, hub)
    return hub


def stop_everything(hub: HubProcess) -> None:
    """Stop every server of *hub*, then the hub, then remove any container it left (also when
    the bench failed)."""
    import docker
    import requests

    try:
        if hub.proc is not None:
            for user in hub.admin("GET", "/users").json():
                if user.get("server") or user.get("pending"):
                    hub.admin("DELETE", f"/users/{user['name']}/server")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                users = hub.admin("GET", "/users").json()
                if not any(u.get("server") or u.get("pending") for u in users):
                    break
                time.sleep(0.5)
    except requests.RequestException as e:
        print(f"could not stop the servers of {hub.url}: {e}", file=sys.stderr)
    finally:
        hub.stop()
        client = docker.from_env()
        prefix = hub.env_overrides["NSML_CONTAINER_PREFIX"]
        for c in client.containers.list(all=True, filters={"name": prefix}):
            c.remove(force=True)
        client.close()


def ensure_user(hub: HubProcess, name: str) -> None:
    if hub.admin("GET", f"/users/{name}").status_code == 404:
        hub.admin("POST", f"/users/{name}").raise_for_status()


def server_of(hub: HubProcess, name: str) -> dict[str, Any]:
    return dict(hub.admin("GET", f"/users/{name}").json().get("servers", {}).get("", {}))


def spawn_to_ready(
    hub: HubProcess, name: str, options: dict[str, Any], timeout: float, poll_s: float = 0.02
) -> float:
    """Seconds from the spawn request until the hub reports the server ready (polled every
    *poll_s* once the request returned 202)."""
    t0 = time.perf_counter()
    r = hub.admin("POST", f"/users/{name}/server", json={"user_options": options})
    if r.status_code not in (201, 202):
        raise RuntimeError(f"{name}: spawn refused: {r.status_code} {r.text[:300]}")
    if r.status_code == 201:
        return time.perf_counter() - t0
    while time.perf_counter() - t0 < timeout:
        server = server_of(hub, name)
        if server.get("ready"):
            return time.perf_counter() - t0
        if not server.get("pending") and not server.get("ready"):
            raise RuntimeError(f"{name}: spawn failed: {server}")
        time.sleep(poll_s)
    raise TimeoutError(f"{name}: not ready after {timeout}s")


def stop_and_wait(hub: HubProcess, name: str, timeout: float = 60) -> None:
    hub.admin("DELETE", f"/users/{name}/server")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = hub.admin("GET", f"/users/{name}").json()
        if model.get("server") is None and not model.get("pending"):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{name}: not stopped after {timeout}s")


class ServerWatch:
    """Beside one spawn, from the engine's side: when the container started, and when the
    notebook server first answered on its port (polled every 10 ms, not through the hub)."""

    def __init__(self, hub: HubProcess, name: str) -> None:
        import docker

        self.container = f"{hub.env_overrides['NSML_CONTAINER_PREFIX']}-{name}"
        self.client = docker.from_env()
        self.t0 = time.perf_counter()
        self.started_s: float | None = None
        self.answered_s: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import docker.errors
        import requests

        url = None
        while not self._stop.is_set() and self.answered_s is None:
            if url is None:
                try:
                    c = self.client.containers.get(self.container)
                except docker.errors.NotFound:
                    time.sleep(0.01)
                    continue
                if c.status != "running":
                    time.sleep(0.01)
                    continue
                self.started_s = time.perf_counter() - self.t0
                env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"] if "=" in e)
                service = env["JUPYTERHUB_SERVICE_URL"].rstrip("/")
                url = service.replace("0.0.0.0", "127.0.0.1") + "/api"
            try:
                if requests.get(url, timeout=1).status_code == 200:
                    self.answered_s = time.perf_counter() - self.t0
                    break
            except requests.RequestException:
                pass
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()


def measure_latency(
    hubs: dict[str, HubProcess], options: dict[str, dict[str, Any]], n: int
) -> dict[str, dict[str, list[float]]]:
    """Per hub: ``ready`` (through the hub), ``started`` and ``answered`` (the engine's side)."""
    times: dict[str, dict[str, list[float]]] = {
        k: {"ready": [], "started": [], "answered": []} for k in hubs
    }
    for kind, hub in hubs.items():
        ensure_user(hub, "latency")
        spawn_to_ready(hub, "latency", options[kind], 120)  # warm-up, not counted
        stop_and_wait(hub, "latency")
    for i in range(n):
        order = list(hubs) if i % 2 == 0 else list(reversed(hubs))
        for kind in order:
            hub = hubs[kind]
            watch = ServerWatch(hub, "latency")
            ready = spawn_to_ready(hub, "latency", options[kind], 120)
            watch.close()
            times[kind]["ready"].append(ready)
            if watch.started_s is not None and watch.answered_s is not None:
                times[kind]["started"].append(watch.started_s)
                times[kind]["answered"].append(watch.answered_s)
            stop_and_wait(hub, "latency")
        print(
            f"  round {i + 1}/{n}: "
            + ", ".join(
                f"{k} ready {times[k]['ready'][-1]:.2f}s"
                f" (container {times[k]['started'][-1] if times[k]['started'] else -1:.2f}s,"
                f" answered {times[k]['answered'][-1] if times[k]['answered'] else -1:.2f}s)"
                for k in hubs
            ),
            flush=True,
        )
    return times


def containers_started(hub: HubProcess, users: set[str]) -> list[datetime]:
    """When the engine started each user's notebook container (found by the spawner's labels)."""
    import docker

    from nsml_server.backends.docker import parse_docker_time

    client = docker.from_env()
    prefix = hub.env_overrides["NSML_CONTAINER_PREFIX"]
    out = []
    for c in client.containers.list(all=True, filters={"name": prefix}):
        if c.labels.get("nsml.user") in users:
            t = parse_docker_time(c.attrs["State"].get("StartedAt"))
            if t is not None:
                out.append(t)
    client.close()
    return out


def concurrent_spawns(hub: HubProcess, n: int, options: dict[str, Any]) -> dict[str, Any]:
    """*n* users ask at once; all must become ready. Returns the figures."""
    names = [f"conc{i:03d}" for i in range(n)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda u: ensure_user(hub, u), names))
    errors: list[str] = []
    ready_s: dict[str, float] = {}

    def one(name: str) -> None:
        try:
            ready_s[name] = spawn_to_ready(hub, name, options, 600, poll_s=1.0)
        except Exception as e:
            errors.append(f"{name}: {e}")

    t0, t0_wall = time.perf_counter(), datetime.now(UTC)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, names))
    wall = time.perf_counter() - t0
    started = containers_started(hub, set(names))
    last_start = (max(started) - t0_wall).total_seconds() if started else None

    admin = hub.user_token("admin")
    placed = [
        p
        for p in hub.nsml("GET", "placements?all=1&state=placed", admin).json()["placements"]
        if p["user"] in ready_s
    ]
    milli: dict[tuple[str, int], int] = defaultdict(int)
    for p in placed:
        a = p["allocation"]
        for index in a["gpu_indices"]:
            milli[(a["node"], index)] += a["gpu_milli_per_gpu"]

    t1 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda u: stop_and_wait(hub, u, 180), names))
    stop_wall = time.perf_counter() - t1
    left = [
        p
        for p in hub.nsml("GET", "placements?all=1&state=placed", admin).json()["placements"]
        if p["user"] in set(names)
    ]
    values = list(ready_s.values())
    return {
        "n": n,
        "request": options,
        "ready": len(ready_s),
        "errors": errors,
        "wall_s": round(wall, 2),
        "containers_started": len(started),
        "all_containers_started_s": round(last_start, 2) if last_start is not None else None,
        "ready_s": {
            "p50": round(pct(values, 0.5), 2) if values else None,
            "p95": round(pct(values, 0.95), 2) if values else None,
            "max": round(max(values), 2) if values else None,
        },
        "placements_placed": len(placed),
        "gpus_used": len(milli),
        "max_milli_per_gpu": max(milli.values(), default=0),
        "stop_all_wall_s": round(stop_wall, 2),
        "placements_left_after_stop": len(left),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=20, help="measured spawns per spawner (default 20)")
    p.add_argument("--concurrent", type=int, default=50, help="concurrent spawns (default 50)")
    p.add_argument("--cpu", type=float, default=1.0, help="CPU limit of latency servers")
    p.add_argument("--memory", default="1G", help="memory limit of latency servers")
    p.add_argument(
        "--virtual-gpus", type=int, default=16, help="virtual GPUs of the NSML hub's node"
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "spawn_latency.json"))
    p.add_argument("--keep", action="store_true", help="keep the hubs' state folders and logs")
    args = p.parse_args(argv)
    if args.n < 1 or args.concurrent < 0:
        p.error("-n must be at least 1 and --concurrent at least 0")

    cpus = len(os.sched_getaffinity(0))
    # Every concurrent server reserves an equal share of this machine's CPUs (a hard limit).
    conc_cpu = round(max(0.01, cpus / max(1, args.concurrent)), 3)
    conc_options = {"gpus": 0.25, "cpu": conc_cpu, "memory": "256M"}

    with ExitStack() as stack:
        print("starting the hubs ...", flush=True)
        nsml = start_hub(
            stack, "nsml", NSML_CONFIG, {"NSML_VIRTUAL_GPUS": str(args.virtual_gpus)}, args.keep
        )
        docker_hub = start_hub(
            stack,
            "docker",
            DOCKERSPAWNER_CONFIG % {"image": IMAGE, "cpu": args.cpu, "memory": args.memory},
            {},
            args.keep,
        )
        hubs = {"nsml": nsml, "dockerspawner": docker_hub}
        options = {
            "nsml": {"gpus": 1, "cpu": args.cpu, "memory": args.memory},
            "dockerspawner": {},
        }
        print(f"spawn-to-ready, {args.n} each, alternating:", flush=True)
        times = measure_latency(hubs, options, args.n)
        latency = {
            k: {part: summary(v) for part, v in parts.items() if v} for k, parts in times.items()
        }
        ratio = latency["nsml"]["ready"]["median_s"] / latency["dockerspawner"]["ready"]["median_s"]
        ratios = {
            part: round(
                latency["nsml"][part]["median_s"] / latency["dockerspawner"][part]["median_s"], 3
            )
            for part in ("ready", "started", "answered")
            if part in latency["nsml"] and part in latency["dockerspawner"]
        }
        docker_hub.stop()  # free the machine for the concurrent run

        concurrent: dict[str, Any] | None = None
        if args.concurrent:
            print(f"{args.concurrent} concurrent spawns on the NSML hub ...", flush=True)
            concurrent = concurrent_spawns(nsml, args.concurrent, conc_options)

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": cpus, "python": platform.python_version(), "image": IMAGE},
        "latency": {
            "request": {
                "nsml": options["nsml"],
                "dockerspawner": {"cpu_limit": args.cpu, "mem_limit": args.memory},
            },
            "ready": "request until the hub reports the server ready (the target's measure)",
            "started": "request until the engine runs the container",
            "answered": "request until the server first answers on its port (polled every 10 ms)",
            **latency,
            "ratio_median": round(ratio, 3),
            "ratio_median_by_part": ratios,
            "target_ratio": 1.15,
        },
        "concurrent": concurrent,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(
        f"spawn-to-ready median: NSMLSpawner {latency['nsml']['ready']['median_s']:.2f}s, "
        f"DockerSpawner {latency['dockerspawner']['ready']['median_s']:.2f}s, ratio {ratio:.3f} "
        "(target <= 1.15)"
    )
    for part in ("started", "answered"):
        if part in ratios:
            print(
                f"  request -> container {part}: NSMLSpawner "
                f"{latency['nsml'][part]['median_s']:.2f}s, DockerSpawner "
                f"{latency['dockerspawner'][part]['median_s']:.2f}s, ratio {ratios[part]:.3f}"
            )
    if concurrent is not None:
        print(
            f"{concurrent['n']} concurrent spawns: {concurrent['ready']} ready, "
            f"{len(concurrent['errors'])} errors; every container started "
            f"{concurrent['all_containers_started_s']}s after the requests, all ready in "
            f"{concurrent['wall_s']:.1f}s "
            f"(p50 {concurrent['ready_s']['p50']}s, p95 {concurrent['ready_s']['p95']}s); "
            f"{concurrent['gpus_used']} GPUs used, at most {concurrent['max_milli_per_gpu']} "
            "milli-GPU on one"
        )
        for e in concurrent["errors"][:10]:
            print("  error:", e)
    print(f"written to {out}")
    ok = concurrent is None or (concurrent["ready"] == concurrent["n"] and not concurrent["errors"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

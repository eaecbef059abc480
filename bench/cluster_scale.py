"""Cluster scale: placement decisions through the API while many nodes heartbeat.

A real ``nsml-server`` process on a private PostgreSQL (token checks by a real jupyterhub),
and N simulated node agents in this process: asyncio tasks that do what ``nsml-agent`` does
over HTTP, each on its own keep-alive connection — a heartbeat (``PUT
api/nodes/NAME/heartbeat``, 8 GPUs) every ``--interval`` seconds (±10 %, the agent's default
10 s) and a poll of the node's dataset holds (``GET api/nodes/NAME/dataset-holds``) every
``--holds-interval`` seconds (the agent's default 1 s), a long poll of up to ``--holds-wait``
seconds once it knows the answer's ``ETag``, as the agent does. For each cluster size (default
10, then 1,000 nodes, each on a fresh database and server), after registering the nodes and
filling the cluster to ``--fill`` of its GPUs:

1. *quiet*: no agent running (what the server uses by itself); *idle*: agents only, first
   heartbeats alone, then with the holds polls: the server's and PostgreSQL's CPU per
   heartbeat and per poll, and their latencies;
2. *load*: ``--concurrency`` clients each loop ``POST api/placements`` (1 GPU, ``wait_s``,
   answered once the allocation is committed) then ``DELETE`` it, for ``--seconds``:
   decisions per second and per-decision latency (p50/p95/p99), with the agents running;
3. *load, agents silent*: the same with the agents stopped (the nodes stay ``up``: the
   server's node timeout is raised), which separates the cost of the cluster's size from the
   cost of its heartbeats.

The smallest size is the baseline: every larger size is reported as a ratio to it.

    python bench/cluster_scale.py --out bench/results/cluster_scale.json
    python bench/cluster_scale.py --nodes 10,200 --seconds 5 --idle-seconds 4   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.hubproc import (  # noqa: E402
    HubProcess,
    ServerProcess,
    virtual_node_heartbeat,
)
from tests.integration.pgproc import private_postgres  # noqa: E402

GPUS_PER_NODE = 8
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    """The *q* quantile (nearest rank) of *values*, 0.0 when empty."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    """Count, rate and latency percentiles (ms) of one window."""
    return {
        "n": len(latencies),
        "per_s": round(len(latencies) / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": round(pct(latencies, 0.50) * 1000, 2),
        "p95_ms": round(pct(latencies, 0.95) * 1000, 2),
        "p99_ms": round(pct(latencies, 0.99) * 1000, 2),
    }


# ---- CPU accounting from /proc ---------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def process_cpu_s(pid: int, *, children: bool = False) -> float:
    """CPU seconds of *pid* (user + system); with *children*, plus its reaped children's."""
    f = _stat(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    if children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime
    return ticks / CLK_TCK


def child_pids(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            f = _stat(int(entry.name))
            if f is not None and int(f[1]) == pid:
                out.append(int(entry.name))
    return out


def postmaster_pid(port: int) -> int | None:
    """The PostgreSQL server listening on *port* (its command line names the port)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"postgres") and str(port).encode() in argv:
            return int(entry.name)
    return None


def postgres_cpu_s(pid: int) -> float:
    """CPU seconds of a PostgreSQL server: the postmaster, its live and its ended backends."""
    return process_cpu_s(pid, children=True) + sum(process_cpu_s(c) for c in child_pids(pid))


@dataclass
class CpuMeter:
    """CPU seconds used by the server and PostgreSQL between :meth:`start` and :meth:`stop`."""

    server_pid: int
    pg_pid: int | None
    marks: dict[str, float] = field(default_factory=dict)

    def read(self) -> dict[str, float]:
        return {
            "server": process_cpu_s(self.server_pid),
            "postgres": postgres_cpu_s(self.pg_pid) if self.pg_pid else 0.0,
            "bench": time.process_time(),
            "wall": time.perf_counter(),
        }

    def start(self) -> None:
        self.marks = self.read()

    def stop(self) -> dict[str, float]:
        end = self.read()
        wall = end["wall"] - self.marks["wall"]
        out = {"seconds": round(wall, 2)}
        for k in ("server", "postgres", "bench"):
            used = end[k] - self.marks[k]
            out[f"{k}_cpu_s"] = round(used, 3)
            out[f"{k}_cpu_pct"] = round(100 * used / wall, 1) if wall > 0 else 0.0
        return out


# ---- simulated agents -------------------------------------------------------------------------


@dataclass
class Agents:
    """N simulated node agents: heartbeats and dataset-holds polls on keep-alive connections."""

    api: str
    token: str
    names: list[str]
    interval: float
    holds_interval: float
    holds_wait: float
    rng: random.Random
    heartbeats: list[tuple[float, float]] = field(default_factory=list)  # (end, seconds)
    polls: list[tuple[float, float]] = field(default_factory=list)  # answered at once
    long_polls: list[tuple[float, float]] = field(default_factory=list)  # parked on the server
    errors: int = 0
    holds_on: bool = True
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def body(self, name: str) -> bytes:
        hb = virtual_node_heartbeat(name, gpus=GPUS_PER_NODE, cpu_milli=128000, memory_mib=1048576)
        hb["backend"] = "docker"
        return json.dumps(hb).encode()

    async def one(
        self,
        http: Any,
        method: str,
        url: str,
        data: bytes | None,
        headers: dict[str, str] | None = None,
    ) -> tuple[float, str | None]:
        """One request; its seconds and its answer's ``ETag``."""
        t0 = time.perf_counter()
        async with http.request(method, url, data=data, headers=headers) as r:
            await r.read()
            if r.status >= 400:
                self.errors += 1
                if self.errors <= 3:
                    print(f"  agent error {r.status} {method} {url}", file=sys.stderr)
            etag = r.headers.get("ETag")
        return time.perf_counter() - t0, etag

    async def agent(self, http: Any, name: str) -> None:
        """One node's loop, as ``nsml-agent`` runs it: a heartbeat, then holds syncs (long
        polls bounded by the next heartbeat once an answer's ``ETag`` is known)."""
        hb_url = f"{self.api}/nodes/{name}/heartbeat"
        holds_url = f"{self.api}/nodes/{name}/dataset-holds"
        body = self.body(name)
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self.rng.uniform(0, self.interval)
        next_poll = loop.time() + self.rng.uniform(0, self.holds_interval or 1)
        etag: str | None = None
        while True:
            now = loop.time()
            if now >= next_beat:
                dt, _ = await self.one(http, "PUT", hb_url, body)
                self.heartbeats.append((time.perf_counter(), dt))
                next_beat = loop.time() + self.interval * self.rng.uniform(0.9, 1.1)
            if self.holds_interval > 0 and self.holds_on and now >= next_poll:
                wait = min(self.holds_wait, next_beat - loop.time() - 1.0)
                headers = None
                if wait > 0 and etag:
                    headers = {"If-None-Match": etag, "Prefer": f"wait={wait:.0f}"}
                dt, etag = await self.one(http, "GET", holds_url, None, headers)
                (self.long_polls if headers else self.polls).append((time.perf_counter(), dt))
                next_poll = loop.time() + self.holds_interval
            wake = next_beat
            if self.holds_interval > 0 and self.holds_on:
                wake = min(wake, next_poll)
            await asyncio.sleep(max(0.0, wake - loop.time()))

    async def register(self, http: Any, concurrency: int = 32) -> dict[str, float]:
        """First heartbeat of every node (creates it), *concurrency* at a time."""
        sem = asyncio.Semaphore(concurrency)
        lat: list[float] = []

        async def reg(name: str) -> None:
            async with sem:
                dt, _ = await self.one(
                    http, "PUT", f"{self.api}/nodes/{name}/heartbeat", self.body(name)
                )
                lat.append(dt)

        t0 = time.perf_counter()
        await asyncio.gather(*(reg(n) for n in self.names))
        return summary(lat, time.perf_counter() - t0)

    def start(self, http: Any) -> None:
        self._tasks = [asyncio.create_task(self.agent(http, n)) for n in self.names]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def window(self, since: float, until: float) -> dict[str, dict[str, float]]:
        seconds = until - since
        hb = [dt for end, dt in self.heartbeats if since <= end < until]
        po = [dt for end, dt in self.polls if since <= end < until]
        lp = [dt for end, dt in self.long_polls if since <= end < until]
        return {
            "heartbeats": summary(hb, seconds),
            "holds_polls": summary(po, seconds),
            "holds_long_polls": summary(lp, seconds),
        }


def agent_session(token: str, connections: int) -> Any:
    """One aiohttp client for all agents: a keep-alive connection per agent at most."""
    import aiohttp

    return aiohttp.ClientSession(
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        connector=aiohttp.TCPConnector(limit=connections + 64, force_close=False),
        timeout=aiohttp.ClientTimeout(total=120),
    )


# ---- placement clients ------------------------------------------------------------------------


async def place_loop(
    api: str, tokens: list[str], concurrency: int, seconds: float, body: dict[str, Any]
) -> dict[str, Any]:
    """*concurrency* clients each placing then releasing, for *seconds*."""
    import aiohttp

    decided: list[float] = []
    released: list[float] = []
    errors: list[str] = []

    async def client(k: int, http: Any) -> None:
        i = 0
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            i += 1
            payload = json.dumps({**body, "holder": f"scale-{k}-{i}"})
            t0 = time.perf_counter()
            async with http.post(f"{api}/placements", data=payload) as r:
                out = await r.json(content_type=None)
                status = r.status
            t1 = time.perf_counter()
            if status != 201 or out.get("state") != "placed":
                errors.append(f"{status} {str(out)[:200]}")
                await asyncio.sleep(0.1)
                continue
            decided.append(t1 - t0)
            async with http.delete(f"{api}/placements/{out['id']}") as r:
                await r.read()
                if r.status != 200:
                    errors.append(f"release {r.status}")
            released.append(time.perf_counter() - t1)

    sessions = [
        aiohttp.ClientSession(
            headers={
                "Authorization": f"token {tokens[k % len(tokens)]}",
                "Content-Type": "application/json",
            },
            timeout=aiohttp.ClientTimeout(total=120),
        )
        for k in range(concurrency)
    ]
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k, sessions[k]) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    finally:
        for s in sessions:
            await s.close()
    for e in errors[:3]:
        print(f"  placement error: {e}", file=sys.stderr)
    return {
        "decisions": summary(decided, elapsed),
        "releases": summary(released, elapsed),
        "errors": len(errors),
    }


async def fill_cluster(
    api: str, token: str, nodes: int, fraction: float, rng: random.Random
) -> dict[str, Any]:
    """Hold *fraction* of the cluster's GPUs with placements of 1, 2 and 4 GPUs (kept)."""
    import aiohttp

    target = int(nodes * GPUS_PER_NODE * fraction)
    shapes: list[int] = []
    while sum(shapes) < target:
        shapes.append(min(rng.choice((1, 1, 2, 4)), target - sum(shapes)))
    sem = asyncio.Semaphore(32)
    placed = 0
    headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}

    async def one(i: int, gpus: int, http: Any) -> None:
        nonlocal placed
        body = {"gpus": gpus, "cpu": 1, "memory": "4G", "wait_s": 60, "holder": f"fill-{i}"}
        async with sem, http.post(f"{api}/placements", data=json.dumps(body)) as r:
            out = await r.json(content_type=None)
            if r.status == 201 and out.get("state") == "placed":
                placed += gpus

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(headers=headers) as http:
        await asyncio.gather(*(one(i, g, http) for i, g in enumerate(shapes)))
    return {
        "gpus_held": placed,
        "fraction": round(placed / (nodes * GPUS_PER_NODE), 3),
        "placements": len(shapes),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ---- one cluster size -------------------------------------------------------------------------


@dataclass
class Options:
    seconds: float
    idle_seconds: float
    concurrency: int
    interval: float
    holds_interval: float
    holds_wait: float
    fill: float
    users: int = 8


async def run_size(
    server: ServerProcess, hub: HubProcess, pg_port: int, nodes: int, o: Options
) -> dict[str, Any]:
    """Register *nodes* simulated agents on a fresh server and measure (see the module doc)."""
    admin = hub.user_token("admin")
    tokens = [hub.user_token(f"scale-user-{i}") for i in range(o.users)]
    assert server.proc is not None
    meter = CpuMeter(server.proc.pid, postmaster_pid(pg_port))
    rng = random.Random(nodes)
    agents = Agents(
        server.api,
        admin,
        [f"node-{i:04d}" for i in range(nodes)],
        o.interval,
        o.holds_interval,
        o.holds_wait,
        rng,
    )
    out: dict[str, Any] = {"nodes": nodes, "gpus": nodes * GPUS_PER_NODE}
    body = {"gpus": 1, "cpu": 1, "memory": "4G", "wait_s": 60}

    def phase(name: str) -> None:
        print(f"  {nodes} nodes: {name}", file=sys.stderr, flush=True)

    async with agent_session(admin, nodes) as http:
        phase("register")
        out["register"] = await agents.register(http)
        out["fill"] = await fill_cluster(server.api, admin, nodes, o.fill, rng)
        # Warm the server's token cache and connection pools.
        await place_loop(server.api, tokens, o.concurrency, 1.0, body)
        phase("quiet")
        meter.start()
        await asyncio.sleep(o.idle_seconds)
        out["quiet"] = {"cpu": meter.stop()}
        agents.start(http)
        agents.holds_on = False
        await asyncio.sleep(min(o.interval, 5.0))  # the agents' first beats spread out
        for phase_name, holds in (("idle_heartbeats", False), ("idle_agents", True)):
            agents.holds_on = holds
            phase(phase_name)
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
            meter.start()
            await asyncio.sleep(o.idle_seconds)
            cpu = meter.stop()
            out[phase_name] = {**agents.window(t0, time.perf_counter()), "cpu": cpu}
        phase("load")
        t0 = time.perf_counter()
        meter.start()
        load = await place_loop(server.api, tokens, o.concurrency, o.seconds, body)
        out["load"] = {**load, **agents.window(t0, time.perf_counter()), "cpu": meter.stop()}
        await agents.stop()
        phase("load_silent")
        meter.start()
        load = await place_loop(server.api, tokens, o.concurrency, o.seconds, body)
        out["load_silent"] = {**load, "cpu": meter.stop()}
    out["agent_errors"] = agents.errors
    out["cost"] = heartbeat_cost(out)
    return out


def heartbeat_cost(r: dict[str, Any]) -> dict[str, float]:
    """CPU milliseconds per heartbeat and per holds poll (server and PostgreSQL together).

    The heartbeats-only window prices a heartbeat; the extra CPU of the window with polls,
    divided by its polls, prices a poll. What the server and PostgreSQL use with no agent at
    all (the *quiet* window: the scheduler's idle pass, the lease, the node check) is taken
    off first, in proportion to each window's length.
    """
    hb, ag, quiet = r["idle_heartbeats"], r["idle_agents"], r["quiet"]["cpu"]
    base_rate = (quiet["server_cpu_s"] + quiet["postgres_cpu_s"]) / quiet["seconds"]

    def cpu(w: dict[str, Any]) -> float:
        c = w["cpu"]
        return float(c["server_cpu_s"] + c["postgres_cpu_s"] - base_rate * c["seconds"])

    n_hb = hb["heartbeats"]["n"]
    per_hb = cpu(hb) / n_hb if n_hb else 0.0
    n_po = ag["holds_polls"]["n"] + ag["holds_long_polls"]["n"]
    extra = cpu(ag) - per_hb * ag["heartbeats"]["n"]
    return {
        "ms_cpu_per_heartbeat": round(1000 * per_hb, 3),
        "ms_cpu_per_holds_poll": round(1000 * extra / n_po, 3) if n_po else 0.0,
        "cpu_pct_heartbeats": round(100 * per_hb * hb["heartbeats"]["per_s"], 1),
        "cpu_pct_holds_polls": round(100 * extra / ag["cpu"]["seconds"], 1),
        "server_cpu_pct_quiet": quiet["server_cpu_pct"],
        "server_cpu_pct_idle_agents": ag["cpu"]["server_cpu_pct"],
        "postgres_cpu_pct_idle_agents": ag["cpu"]["postgres_cpu_pct"],
    }


@contextmanager
def fresh_server(hub: HubProcess, pg_url: str, name: str) -> Iterator[ServerProcess]:
    """A new database in the PostgreSQL cluster and an ``nsml-server`` on it."""
    from sqlalchemy import create_engine, text

    base = pg_url.rsplit("/", 1)[0]
    admin = create_engine(base + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    server = ServerProcess(hub, f"{base}/{name}", name, args=["--NSMLServer.node_timeout=3600"])
    try:
        server.start()
        yield server
    finally:
        server.stop()


def print_size(r: dict[str, Any]) -> None:
    d, s, c = r["load"]["decisions"], r["load_silent"]["decisions"], r["cost"]
    hb = r["load"]["heartbeats"]
    print(
        f"{r['nodes']:>5} nodes: {d['per_s']:>6.1f} decisions/s (p50 {d['p50_ms']:.1f} ms, "
        f"p95 {d['p95_ms']:.1f} ms) with agents; {s['per_s']:.1f}/s silent | heartbeats "
        f"{hb['per_s']:.1f}/s p50 {hb['p50_ms']:.1f} ms p95 {hb['p95_ms']:.1f} ms under load | "
        f"CPU/heartbeat {c['ms_cpu_per_heartbeat']:.2f} ms ({c['cpu_pct_heartbeats']:.0f} %), "
        f"holds polls {c['cpu_pct_holds_polls']:.0f} % | server CPU "
        f"{c['server_cpu_pct_idle_agents']:.0f} % with agents idle"
    )


def ratios(base: dict[str, Any], r: dict[str, Any]) -> dict[str, float]:
    def div(a: float, b: float) -> float:
        return round(a / b, 3) if b else 0.0

    return {
        "decisions_per_s": div(r["load"]["decisions"]["per_s"], base["load"]["decisions"]["per_s"]),
        "decision_p50": div(r["load"]["decisions"]["p50_ms"], base["load"]["decisions"]["p50_ms"]),
        "decision_p95": div(r["load"]["decisions"]["p95_ms"], base["load"]["decisions"]["p95_ms"]),
        "decisions_per_s_silent": div(
            r["load_silent"]["decisions"]["per_s"], base["load_silent"]["decisions"]["per_s"]
        ),
        "cpu_per_heartbeat": div(
            r["cost"]["ms_cpu_per_heartbeat"], base["cost"]["ms_cpu_per_heartbeat"]
        ),
    }


def measure_scale(sizes: list[int], o: Options) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        pg_url = stack.enter_context(private_postgres())
        pg_port = int(pg_url.rsplit(":", 1)[1].split("/", 1)[0])
        state = Path(tempfile.mkdtemp(prefix="nsml-scale-"))
        stack.callback(shutil.rmtree, state, True)
        hub = HubProcess(state, env_overrides={"NSML_VIRTUAL_GPUS": "0"})
        stack.callback(hub.stop)
        hub.start()
        for n in sizes:
            with fresh_server(hub, pg_url, f"scale{n}") as server:
                r = asyncio.run(run_size(server, hub, pg_port, n, o))
            results[str(n)] = r
            print_size(r)
    base = results[str(sizes[0])]
    for n in sizes[1:]:
        results[str(n)]["ratio_to_baseline"] = ratios(base, results[str(n)])
        print(f"{n} nodes / {sizes[0]} nodes: {results[str(n)]['ratio_to_baseline']}")
    return results


# ---- the whole path on 1, 2 and 3 engines -------------------------------------------------------

IMAGE = os.environ.get("NSML_NOTEBOOK_IMAGE", "jupyter-nsml/singleuser:latest")
MAIN_PY = "import time; time.sleep(1)\n"


def session_nodes(tb: Any) -> set[str]:
    """The nodes whose engine holds a session container of this test bed's run."""
    return {n for n in tb.nodes if any("-session-" in c.name for c in tb.containers(n, all=True))}


def one_session(client: Any, folder: Path, timeout: float = 120) -> dict[str, Any]:
    """``nsml run`` (1 GPU) until the session's container runs; the node it runs on."""
    from nsml import sessions

    t0 = time.time()
    name = sessions.run(client, "main.py", folder=folder, memory="256M", gpus=1)["name"]
    deadline = time.monotonic() + timeout
    while True:
        st = sessions.status(client, name)
        if st["state"] == "running":
            break
        if st["state"] not in ("queued", "preparing") or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start: {st['state']} {st.get('message')}")
        time.sleep(0.02)
    return {"name": name, "node": st["node"], "running_s": time.time() - t0}


def finish(client: Any, name: str) -> None:
    from nsml import sessions

    sessions.wait(client, name, timeout=60, poll_s=0.1)
    sessions.rm(client, name)


def measure_engines(counts: list[int], n: int) -> dict[str, Any]:
    """API request -> container running, with 1, 2, 3 engines (the test bed)."""
    from concurrent.futures import ThreadPoolExecutor

    from nsml.client import Client
    from nsml.config import ClientConfig
    from tests.cluster.testbed import cluster

    out: dict[str, Any] = {}
    folder = Path(tempfile.mkdtemp(prefix="nsml-scale-code-"))
    try:
        (folder / "main.py").write_text(MAIN_PY)
        os.chmod(folder, 0o755)
        for k in counts:
            t_start = time.perf_counter()
            with cluster(engines=k, image=IMAGE) as tb:
                tb.wait_nodes_up()
                up_s = time.perf_counter() - t_start
                client = Client(
                    ClientConfig(tb.hub.nsml_api + "/", tb.hub.user_token("bench"), "bench")
                )
                finish(client, one_session(client, folder)["name"])  # warm-up
                seq = []
                for _ in range(n):
                    r = one_session(client, folder)
                    r["engines_with_it"] = sorted(session_nodes(tb))
                    finish(client, r["name"])
                    seq.append(r)
                remote: list[dict[str, Any]] = []
                if k > 1:  # node-a drained: the same on a remote engine (TCP+TLS, its agent)
                    admin = tb.admin_token
                    tb.hub.nsml("PATCH", "nodes/node-a", admin, json={"state": "draining"})
                    for _ in range(n):
                        r = one_session(client, folder)
                        r["engines_with_it"] = sorted(session_nodes(tb))
                        finish(client, r["name"])
                        remote.append(r)
                    tb.hub.nsml("PATCH", "nodes/node-a", admin, json={"state": "up"})
                burst_n = 2 * k
                t0 = time.perf_counter()
                with ThreadPoolExecutor(burst_n) as pool:
                    burst = list(pool.map(one_session, [client] * burst_n, [folder] * burst_n))
                burst_s = time.perf_counter() - t0
                for r in burst:
                    finish(client, r["name"])
            runs = sorted(r["running_s"] for r in seq)
            out[str(k)] = {
                "engines": k,
                "testbed_up_s": round(up_s, 1),
                "sequential": {
                    "n": len(seq),
                    "running_median_s": round(runs[len(runs) // 2], 3),
                    "running_max_s": round(runs[-1], 3),
                    "nodes": sorted({r["node"] for r in seq}),
                    "placed_on_its_engine": sum(r["engines_with_it"] == [r["node"]] for r in seq),
                    "runs": seq,
                },
                "sequential_remote": {
                    "n": len(remote),
                    "running_median_s": round(
                        sorted(r["running_s"] for r in remote)[len(remote) // 2], 3
                    )
                    if remote
                    else None,
                    "nodes": sorted({r["node"] for r in remote}),
                    "placed_on_its_engine": sum(
                        r["engines_with_it"] == [r["node"]] for r in remote
                    ),
                    "runs": remote,
                },
                "burst": {
                    "sessions": burst_n,
                    "all_running_s": round(burst_s, 3),
                    "running_median_s": round(
                        sorted(r["running_s"] for r in burst)[burst_n // 2], 3
                    ),
                    "per_node": {
                        node: sum(r["node"] == node for r in burst)
                        for node in sorted({r["node"] for r in burst})
                    },
                },
            }
            e = out[str(k)]
            print(
                f"{k} engine(s): request -> running {e['sequential']['running_median_s']:.3f} s "
                f"median (nodes {', '.join(e['sequential']['nodes'])}; on the chosen engine "
                f"{e['sequential']['placed_on_its_engine']}/{len(seq)}); node-a drained: "
                f"{e['sequential_remote']['running_median_s']} s on "
                f"{e['sequential_remote']['nodes']} | {burst_n} at once: all "
                f"running in {burst_s:.2f} s, per node {e['burst']['per_node']}",
                flush=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = out[str(counts[0])]["sequential"]["running_median_s"]
    for k in counts[1:]:
        out[str(k)]["ratio_to_baseline"] = round(
            out[str(k)]["sequential"]["running_median_s"] / base, 3
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--nodes",
        default="10,1000",
        help="cluster sizes, comma-separated; the first is the baseline (default 10,1000)",
    )
    p.add_argument("--seconds", type=float, default=20.0, help="length of each load window")
    p.add_argument(
        "--idle-seconds", type=float, default=10.0, help="length of each agents-only window"
    )
    p.add_argument("--concurrency", type=int, default=16, help="placement clients")
    p.add_argument(
        "--interval", type=float, default=10.0, help="seconds between an agent's heartbeats"
    )
    p.add_argument(
        "--holds-interval",
        type=float,
        default=1.0,
        help="seconds between an agent's dataset-holds polls (0: none)",
    )
    p.add_argument(
        "--holds-wait",
        type=float,
        default=30.0,
        help="longest long poll of the dataset holds, bounded by the next heartbeat, as "
        "nsml-agent --holds-wait (0: plain polls)",
    )
    p.add_argument(
        "--fill", type=float, default=0.5, help="fraction of GPUs held during the measurement"
    )
    p.add_argument(
        "--part",
        choices=["all", "nodes", "engines"],
        default="all",
        help="nodes: simulated nodes only; engines: the whole path on the test bed only; "
        "with --out, a part run alone replaces its half of an existing file",
    )
    p.add_argument(
        "--engines",
        default="1,2,3",
        help="engine counts of the whole-path part, comma-separated (default 1,2,3)",
    )
    p.add_argument(
        "--sessions", type=int, default=5, help="sessions run one after another per engine count"
    )
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    try:
        sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--nodes takes comma-separated integers, not {args.nodes!r}")
    if not sizes or min(sizes) < 2:
        p.error("--nodes: every size must be at least 2")
    if not 0 <= args.fill < 0.9:
        p.error(f"--fill must be in [0, 0.9), not {args.fill}")
    o = Options(
        seconds=args.seconds,
        idle_seconds=args.idle_seconds,
        concurrency=args.concurrency,
        interval=args.interval,
        holds_interval=args.holds_interval,
        holds_wait=args.holds_wait,
        fill=args.fill,
    )
    try:
        engines = [int(x) for x in args.engines.split(",") if x.strip()]
    except ValueError:
        p.error(f"--engines takes comma-separated integers, not {args.engines!r}")
    if args.part != "nodes" and (not engines or not set(engines) <= {1, 2, 3}):
        p.error(f"--engines: counts of 1 to 3, not {args.engines!r}")
    results: dict[str, Any] = {}
    if args.out and args.out.exists() and args.part != "all":
        results = json.loads(args.out.read_text())

    def machine() -> dict[str, Any]:
        return {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": f"{os.cpu_count()} CPUs, {platform.python_implementation()} "
            f"{platform.python_version()}",
        }

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")

    errors = 0
    if args.part in ("all", "nodes"):
        results["setup"] = {**machine(), "gpus_per_node": GPUS_PER_NODE, **vars(o)}
        results["scale"] = measure_scale(sizes, o)
        results["setup"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        errors += sum(
            r["load"]["errors"] + r["load_silent"]["errors"] + r["agent_errors"]
            for r in results["scale"].values()
        )
        save()
    if args.part in ("all", "engines"):
        try:
            import tests.cluster.testbed  # noqa: F401
        except ImportError as e:
            print(f"the whole-path part needs the test bed (tests/cluster/testbed.py): {e}")
            return 1 if args.part == "engines" else (0 if errors == 0 else 1)
        setup = {**machine(), "image": IMAGE, "sessions": args.sessions}
        results["engines"] = {"setup": setup, **measure_engines(engines, args.sessions)}
        setup["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        save()
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

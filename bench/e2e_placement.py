"""Whole-path placement throughput: API request -> scheduler -> persisted allocation.

Starts a real jupyterhub with the `nsml` service (SQLite, or a private PostgreSQL), registers
virtual nodes, then sends concurrent ``POST /services/nsml/api/placements`` through the proxy
with user tokens and waits for each decision (``wait_s``). Beside it, in the same run, the
floor of the same stack: an authenticated ``GET api/me`` (proxy + token check + one
short transaction), so the placement cost reads as a ratio.

    .venv/bin/python bench/e2e_placement.py --db sqlite --db postgresql --out OUT.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.hubproc import HubProcess, virtual_node_heartbeat  # noqa: E402
from tests.integration.pgproc import private_postgres  # noqa: E402

NODES = 100
GPUS_PER_NODE = 8


def heartbeat(name: str) -> dict[str, Any]:
    return virtual_node_heartbeat(name, gpus=GPUS_PER_NODE, cpu_milli=128000, memory_mib=1048576)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def drive(
    url: str, tokens: list[str], n: int, concurrency: int, method: str, body: Any = None
) -> dict[str, float]:
    """Send *n* requests with *concurrency* in flight; latency percentiles and rate."""
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    AsyncHTTPClient.configure(None, max_clients=concurrency)
    client = AsyncHTTPClient()
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        nonlocal errors
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            payload = None
            if body is not None:
                payload = json.dumps({**body, "holder": f"bench-{i}"})
            req = HTTPRequest(
                url,
                method=method,
                body=payload,
                headers={
                    "Authorization": f"token {tokens[i % len(tokens)]}",
                    "Content-Type": "application/json",
                },
                request_timeout=120,
            )
            t0 = time.perf_counter()
            resp = await client.fetch(req, raise_error=False)
            latencies.append(time.perf_counter() - t0)
            if resp.code not in (200, 201):
                errors += 1
                if errors <= 3:
                    print(f"  error {resp.code}: {resp.body[:200]!r}", file=sys.stderr)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {
        "n": n,
        "errors": errors,
        "per_s": round(n / elapsed, 1),
        "p50_ms": round(pct(latencies, 0.5) * 1000, 2),
        "p99_ms": round(pct(latencies, 0.99) * 1000, 2),
    }


def measure(db: str, n: int, concurrency: int) -> dict[str, Any]:
    """Start a hub with the given database and measure; everything is cleaned up after."""
    with ExitStack() as stack:
        env: dict[str, str] = {"NSML_VIRTUAL_GPUS": "0"}
        if db == "postgresql":
            env["NSML_DB_URL"] = stack.enter_context(private_postgres())
        state = Path(tempfile.mkdtemp(prefix="nsml-bench-"))
        stack.callback(shutil.rmtree, state, True)
        hub = HubProcess(state, env_overrides=env)
        stack.callback(hub.stop)
        hub.start()
        admin = hub.user_token("admin")
        import requests

        for i in range(NODES):
            r = requests.put(
                f"{hub.nsml_api}/nodes/bench-{i:03d}/heartbeat",
                json=heartbeat(f"bench-{i:03d}"),
                headers={"Authorization": f"token {admin}"},
                timeout=30,
            )
            r.raise_for_status()
        tokens = [hub.user_token(f"bench-user-{i}") for i in range(20)]
        # Warm the token cache and the connection pools once.
        asyncio.run(drive(f"{hub.nsml_api}/me", tokens, 40, 20, "GET"))
        floor = asyncio.run(drive(f"{hub.nsml_api}/me", tokens, n, concurrency, "GET"))
        body = {"gpus": 0.5, "cpu": 0.1, "memory": "64M", "wait_s": 60}
        placed = asyncio.run(
            drive(f"{hub.nsml_api}/placements", tokens, n, concurrency, "POST", body)
        )
        return {
            "db": db,
            "nodes": NODES,
            "concurrency": concurrency,
            "placements": placed,
            "floor_get_me": floor,
            "ratio_vs_floor": round(placed["per_s"] / floor["per_s"], 3),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--db",
        action="append",
        choices=["sqlite", "postgresql"],
        help="database(s) to measure (default: both)",
    )
    p.add_argument("--requests", type=int, default=1000, help="placements per database")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each database this many times, each with a fresh hub and database; "
        "the figure is the median run, the minimum is reported beside it",
    )
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.requests > NODES * GPUS_PER_NODE * 2:
        p.error(f"--requests must fit the virtual cluster: at most {NODES * GPUS_PER_NODE * 2}")
    results = {}
    for db in args.db or ["sqlite", "postgresql"]:
        runs = []
        for _ in range(max(1, args.repeat)):
            r = measure(db, args.requests, args.concurrency)
            runs.append(r)
            pl, fl = r["placements"], r["floor_get_me"]
            print(
                f"{db:<10} placements {pl['per_s']:>7.1f}/s p50 {pl['p50_ms']:>7.1f} ms "
                f"p99 {pl['p99_ms']:>7.1f} ms errors {pl['errors']} | floor GET me "
                f"{fl['per_s']:>7.1f}/s p50 {fl['p50_ms']:>6.1f} ms | ratio {r['ratio_vs_floor']}"
            )
        runs.sort(key=lambda r: r["placements"]["per_s"])
        median = runs[len(runs) // 2]
        results[db] = {
            "per_s": median["placements"]["per_s"],
            "min_per_s": runs[0]["placements"]["per_s"],
            "runs_per_s": [r["placements"]["per_s"] for r in runs],
            **median,
        }
        if len(runs) > 1:
            print(
                f"{db:<10} median {results[db]['per_s']:.1f}/s, "
                f"min {results[db]['min_per_s']:.1f}/s over {len(runs)} runs"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["placements"]["errors"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

"""Policy speed: decisions per second and p50/p99 latency of one placement decision.

Measures :func:`gpu_scheduler.policy.place` alone (no database, no API) on the 1,213 openb
GPU nodes and on 5,000 nodes (the same list replicated), each first filled to a realistic
occupancy by placing pods drawn from the default openb trace. Then a stream of requests drawn
from the same trace is decided one by one; each placement is applied to the snapshot and one
running allocation is released after every decision, so occupancy stays level (arrivals and
departures). Only the ``place`` call is timed. The paper's BestFit runs on the same filled
cluster and the same request stream for comparison.

    python bench/scheduler_throughput.py --out bench/results/scheduler_throughput.json

Writes ``{"policy": {"1213": {"per_s", "p50_ms", "p99_ms", ...}, "5000": {...}},
"baseline_bestfit": {...}, "setup": {...}, "e2e": {"sqlite": {"per_s", ...},
"postgresql": {...}}}``; ``e2e`` is the whole path (API request → persisted allocation), see
:func:`measure_e2e`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from gpu_scheduler import ClusterSnapshot, Placement, PlacementRequest, RecentMix, Strategy, place
from gpu_scheduler.sim import TraceNode, TracePod, load_nodes, load_pods

DEFAULT_TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces" / "openb"


def replicate(nodes: list[TraceNode], count: int) -> list[TraceNode]:
    """``count`` nodes: the list repeated, each copy renamed ``<sn>-r<k>``."""
    out: list[TraceNode] = []
    k = 0
    while len(out) < count:
        out += [replace(n, sn=f"{n.sn}-r{k}") for n in nodes[: count - len(out)]]
        k += 1
    return out


def fill(
    nodes: list[TraceNode], pods: list[TracePod], target: float, rng: random.Random
) -> tuple[ClusterSnapshot, list[Placement], RecentMix]:
    """Place random trace pods with the platform's policy until ``target`` of GPU is taken."""
    order = list(range(len(nodes)))
    rng.shuffle(order)
    snap = ClusterSnapshot(nodes[i].snapshot() for i in order)
    capacity = sum(n.gpu for n in nodes) * 1000
    mix = RecentMix(refresh=50)
    running: list[Placement] = []
    allocated = 0
    misses = 0
    while allocated < target * capacity and misses < 500:
        pod = pods[rng.randrange(len(pods))]
        mix.observe(pod.shape)
        result = place(snap, pod.request(), mix=mix.typical())
        if result.placement is None:
            misses += 1
            continue
        snap = snap.assume(result.placement)
        running.append(result.placement)
        allocated += result.placement.gpu_milli
    return snap, running, mix


def measure(
    snap: ClusterSnapshot,
    running: list[Placement],
    mix: RecentMix,
    requests: list[PlacementRequest],
    strategy: Strategy,
    seed: int,
    refresh_every: int = 100,
) -> dict[str, float]:
    """Decide ``requests`` in order; time each ``place`` call."""
    rng = random.Random(seed)
    running = list(running)
    typical = mix.typical()
    latencies = []
    placed = 0
    gc.collect()
    for n, request in enumerate(requests):
        if n % refresh_every == 0:
            typical = mix.typical()  # a scheduler pass takes the current mix
        t0 = time.perf_counter()
        result = place(snap, request, mix=typical, strategy=strategy)
        latencies.append(time.perf_counter() - t0)
        if result.placement is not None:
            placed += 1
            snap = snap.assume(result.placement)
            running.append(result.placement)
        snap = snap.release(running.pop(rng.randrange(len(running))))
    latencies.sort()
    total = sum(latencies)
    return {
        "per_s": round(len(latencies) / total, 1),
        "p50_ms": round(statistics.median(latencies) * 1e3, 3),
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 3),
        "max_ms": round(latencies[-1] * 1e3, 3),
        "decisions": len(latencies),
        "placed": placed,
    }


def measure_e2e(args: argparse.Namespace) -> dict[str, Any] | None:
    """End-to-end placements: API request → persisted allocation (SQLite and PostgreSQL).

    Runs :mod:`bench.e2e_placement` (a real hub with the `nsml` service, concurrent
    ``POST api/placements`` through the proxy, a private PostgreSQL); ``--no-e2e`` skips it.
    """
    if args.no_e2e:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import e2e_placement

    out: dict[str, Any] = {}
    for db in ("sqlite", "postgresql"):
        r = e2e_placement.measure(db, args.e2e_requests, args.e2e_concurrency)
        pl, fl = r["placements"], r["floor_get_me"]
        out[db] = {
            **pl,
            "floor_get_me": fl,
            "ratio_vs_floor": r["ratio_vs_floor"],
            "nodes": r["nodes"],
            "concurrency": r["concurrency"],
        }
        print(
            f"e2e {db:<10} {pl['per_s']:>7.1f} placements/s  p50 {pl['p50_ms']:.1f} ms  "
            f"p99 {pl['p99_ms']:.1f} ms  errors {pl['errors']}  (floor GET me "
            f"{fl['per_s']:.1f}/s)",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default=str(DEFAULT_TRACES / "openb_node_list_gpu_node.csv"))
    p.add_argument("--pods", default=str(DEFAULT_TRACES / "openb_pod_list_default.csv"))
    p.add_argument("--sizes", default="1213,5000", help="cluster sizes, comma separated")
    p.add_argument("--fill", type=float, default=0.8, help="GPU occupancy before measuring")
    p.add_argument("--decisions", type=int, default=3000, help="decisions timed per size")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end measurement")
    p.add_argument("--e2e-requests", type=int, default=1000, help="placements per database")
    p.add_argument("--e2e-concurrency", type=int, default=32, help="requests in flight")
    args = p.parse_args(argv)

    base = load_nodes(args.nodes)
    pods = load_pods(args.pods)
    sizes = [int(s) for s in args.sizes.split(",")]
    ours: dict[str, Any] = {}
    bestfit: dict[str, Any] = {}
    fills: dict[str, float] = {}
    for size in sizes:
        nodes = replicate(base, size)
        rng = random.Random(args.seed)
        snap, running, mix = fill(nodes, pods, args.fill, rng)
        fills[str(size)] = round(
            100 * sum(p.gpu_milli for p in running) / (sum(n.gpu for n in nodes) * 1000), 1
        )
        stream = [pods[rng.randrange(len(pods))] for _ in range(args.decisions)]
        for pod in stream:
            mix.observe(pod.shape)
        requests = [pod.request() for pod in stream]
        ours[str(size)] = measure(snap, running, mix, requests, Strategy.NSML, args.seed)
        bestfit[str(size)] = measure(snap, running, mix, requests, Strategy.BESTFIT, args.seed)
        for name, res in (("ours", ours), ("bestfit", bestfit)):
            r = res[str(size)]
            print(
                f"{size:>6} nodes {name:<8} {r['per_s']:>8.0f}/s  p50 {r['p50_ms']:.2f} ms  "
                f"p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.2f} ms  "
                f"(fill {fills[str(size)]} %, placed {r['placed']}/{r['decisions']})",
                flush=True,
            )
    payload = {
        "policy": ours,
        "baseline_bestfit": bestfit,
        "setup": {
            "fill_pct": fills,
            "decisions": args.decisions,
            "seed": args.seed,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "e2e": measure_e2e(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

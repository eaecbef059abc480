"""Placement quality on the openb traces: GPU allocation at 100 % and 130 % arrived demand.

Replays each pod list under the protocol of ``traces/openb/README.md`` with the platform's
policy (``nsml``) and, in the same run, the FGD paper's BestFit; prints both beside the
published BestFit and FGD means from ``baselines_allocation.csv``.

Examples::

    python bench/placement_openb.py --nodes T/openb_node_list_gpu_node.csv \\
        --pods T/openb_pod_list_default.csv --seeds 42,43,44,45,46,47,48,49,50,51 \\
        --out bench/results/placement_default.json
    python bench/placement_openb.py --nodes T/openb_node_list_gpu_node.csv --all --jobs 2 \\
        --out bench/results/placement_openb_all.json

One workload writes one JSON object; several write a list of such objects::

    {"policy": "nsml", "workload": "openb_pod_list_default",
     "allocation_pct": {"100": x, "130": y},
     "baseline_bestfit_same_run": {"100": x, "130": y},
     "published": {"BestFit": {"100": x, "130": y}, "FGD": {"100": x, "130": y}},
     "seeds": [42, ...], "per_seed": {...}, "seconds_per_seed": {...}}
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from gpu_scheduler.policy import Strategy
from gpu_scheduler.sim import load_nodes, load_pods, replay_seed

POINTS = (100, 130)
PUBLISHED_NAMES = {"BestFit": "05-BestFit", "FGD": "06-FGD"}


def run_one(nodes_csv: str, pods_csv: str, seed: int, strategy: str) -> dict[str, Any]:
    """Replay one (workload, seed, strategy); returns allocation at each point and timing."""
    nodes = load_nodes(nodes_csv)
    pods = load_pods(pods_csv)
    t0 = time.perf_counter()
    result = replay_seed(nodes, pods, seed, Strategy(strategy))
    seconds = time.perf_counter() - t0
    return {
        "workload": Path(pods_csv).stem,
        "seed": seed,
        "strategy": strategy,
        "allocation": {str(x): result.allocation(x) for x in POINTS},
        "seconds": seconds,
        "placed": result.placed,
        "failed": result.failed,
    }


def published(baselines_csv: Path, workload: str, seeds: list[int]) -> dict[str, dict[str, float]]:
    """Mean published allocation at each point over ``seeds``, for BestFit and FGD."""
    if not baselines_csv.exists():
        return {}
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    with open(baselines_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["workload"] == workload and int(row["seed"]) in seeds:
                rows[row["sc_policy"]].append(row)
    out = {}
    for name, key in PUBLISHED_NAMES.items():
        if rows.get(key):
            out[name] = {
                str(x): round(statistics.fmean(float(r[str(x)]) for r in rows[key]), 3)
                for x in POINTS
            }
    return out


def summarize(
    runs: list[dict[str, Any]], workload: str, seeds: list[int], baselines_csv: Path
) -> dict[str, Any]:
    """The JSON object for one workload."""
    by = {(r["strategy"], r["seed"]): r for r in runs if r["workload"] == workload}

    def mean(strategy: str) -> dict[str, float]:
        return {
            str(x): round(
                statistics.fmean(by[(strategy, s)]["allocation"][str(x)] for s in seeds), 3
            )
            for x in POINTS
        }

    def per_seed(strategy: str) -> dict[str, dict[str, float]]:
        return {str(s): by[(strategy, s)]["allocation"] for s in seeds}

    def secs(strategy: str) -> float:
        return round(statistics.fmean(by[(strategy, s)]["seconds"] for s in seeds), 2)

    out: dict[str, Any] = {
        "policy": Strategy.NSML.value,
        "workload": workload,
        "allocation_pct": mean(Strategy.NSML.value),
        "baseline_bestfit_same_run": mean(Strategy.BESTFIT.value),
        "published": published(baselines_csv, workload, seeds),
        "seeds": seeds,
        "per_seed": {
            Strategy.NSML.value: per_seed(Strategy.NSML.value),
            Strategy.BESTFIT.value: per_seed(Strategy.BESTFIT.value),
        },
        "seconds_per_seed": {
            Strategy.NSML.value: secs(Strategy.NSML.value),
            Strategy.BESTFIT.value: secs(Strategy.BESTFIT.value),
        },
    }
    if all((Strategy.FGD.value, s) in by for s in seeds):
        out["baseline_fgd_same_run"] = mean(Strategy.FGD.value)
        out["per_seed"][Strategy.FGD.value] = per_seed(Strategy.FGD.value)
        out["seconds_per_seed"][Strategy.FGD.value] = secs(Strategy.FGD.value)
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    """One line per workload: ours, same-run BestFit, published BestFit and FGD."""
    head = (
        f"{'workload':<28} {'ours 100':>9} {'ours 130':>9} {'BF run 100':>10} {'BF run 130':>10}"
        f" {'BF pub 100':>10} {'BF pub 130':>10} {'FGD pub 100':>11} {'FGD pub 130':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        pub = r["published"]
        bf, fgd = pub.get("BestFit", {}), pub.get("FGD", {})
        print(
            f"{r['workload'].removeprefix('openb_pod_list_'):<28}"
            f" {r['allocation_pct']['100']:>9.2f} {r['allocation_pct']['130']:>9.2f}"
            f" {r['baseline_bestfit_same_run']['100']:>10.2f}"
            f" {r['baseline_bestfit_same_run']['130']:>10.2f}"
            f" {bf.get('100', float('nan')):>10.2f} {bf.get('130', float('nan')):>10.2f}"
            f" {fgd.get('100', float('nan')):>11.2f} {fgd.get('130', float('nan')):>11.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", required=True, help="openb_node_list_gpu_node.csv")
    p.add_argument("--pods", action="append", default=[], help="a pod list CSV; repeat for several")
    p.add_argument(
        "--all",
        action="store_true",
        help="every openb_pod_list_*.csv in the node list's folder",
    )
    p.add_argument("--seeds", default="42,43,44,45,46,47,48,49,50,51", help="comma separated")
    p.add_argument(
        "--baselines",
        default=None,
        help="published results (default: baselines_allocation.csv beside --nodes)",
    )
    p.add_argument("--fgd", action="store_true", help="also replay the paper's FGD (slower)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)

    folder = Path(args.nodes).resolve().parent
    pods = list(args.pods)
    if args.all:
        pods += sorted(str(f) for f in folder.glob("openb_pod_list_*.csv"))
    if not pods:
        p.error("give --pods (one or more times) or --all")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    baselines = Path(args.baselines) if args.baselines else folder / "baselines_allocation.csv"
    strategies = [Strategy.NSML.value, Strategy.BESTFIT.value]
    if args.fgd:
        strategies.append(Strategy.FGD.value)
    tasks = [(args.nodes, pc, s, st) for pc in pods for st in strategies for s in seeds]

    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_one, *t) for t in tasks]
            for f in futures:
                runs.append(f.result())
                print(_progress(runs[-1]), file=sys.stderr, flush=True)
    else:
        for t in tasks:
            runs.append(run_one(*t))
            print(_progress(runs[-1]), file=sys.stderr, flush=True)

    workloads = list(dict.fromkeys(Path(pc).stem for pc in pods))
    results = [summarize(runs, w, seeds, baselines) for w in workloads]
    print_table(results)
    print(f"\n{len(tasks)} replays in {time.perf_counter() - t0:.0f} s with {args.jobs} job(s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload: Any = results[0] if len(results) == 1 else results
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _progress(run: dict[str, Any]) -> str:
    a = run["allocation"]
    return (
        f"{run['workload']} {run['strategy']} seed {run['seed']}: "
        f"{a['100']:.2f} / {a['130']:.2f} ({run['seconds']:.1f} s)"
    )


if __name__ == "__main__":
    sys.exit(main())

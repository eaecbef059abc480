"""Credit tick: one billing pass over 10,000 running allocations on PostgreSQL, against the
same number of plain ``UPDATE``s of one balance each, in the same run.

A private PostgreSQL cluster (``tests/integration/pgproc.py``), a fresh database at the
newest schema, ``--allocations`` users each holding one running allocation of one GPU
(8 GPUs per node). Measured, each ``--repeat`` times on the same database:

- *baseline*: ``UPDATE users SET credits_milli = credits_milli - :d WHERE name = :n``, once
  per allocation, in one transaction (executemany): the least any per-allocation charge
  costs;
- *pass*: :func:`nsml_server.billing.charge_pass` for the next ended billing interval: it
  loads the allocations, computes each charge, inserts the ledger rows (``ON CONFLICT DO
  NOTHING ... RETURNING``) and moves the balances, in one transaction;
- *pass again*: the same interval once more (a standby's pass: every interval is already
  charged, so it finds nothing to insert);
- *enforce*: :func:`nsml_server.billing.enforce` (warnings and stops; nobody is low here).

Target: the pass in at most 1 s for 10,000 allocations.

    python bench/credit_tick.py --out bench/results/credit_tick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import bindparam, insert, update  # noqa: E402

from nsml_server import credits  # noqa: E402
from nsml_server.billing import charge_pass, enforce  # noqa: E402
from nsml_server.credits import Policy  # noqa: E402
from nsml_server.db import Database, check_schema  # noqa: E402
from nsml_server.models import Allocation, Gpu, Node, User  # noqa: E402
from tests.integration.pgproc import private_postgres  # noqa: E402

T0 = datetime(2026, 12, 1, 9, 0, 0)
GPUS_PER_NODE = 8
POLICY = Policy(gpu_hour_milli=60_000, interval_s=60)


def populate(db: Database, n: int) -> None:
    """*n* users, each with a large balance and one running 1-GPU allocation."""
    nodes = (n + GPUS_PER_NODE - 1) // GPUS_PER_NODE
    with db.session() as s:
        credits.set_policy(s, POLICY, "bench", T0 - timedelta(days=1))
        conn = s.connection()
        conn.execute(
            insert(Node),
            [
                {
                    "name": f"n{i}",
                    "backend": "docker",
                    "state": "up",
                    "cpu_milli": 64000,
                    "memory_mib": 512000,
                    "cpu_allocated_milli": 0,
                    "memory_allocated_mib": 0,
                    "gpu_probe": {},
                    "images": [],
                    "labels": {},
                    "datasets": {},
                    "needs_sweep": False,
                    "created": T0,
                }
                for i in range(nodes)
            ],
        )
        ids = dict(
            conn.execute(Node.__table__.select().with_only_columns(Node.name, Node.id)).all()
        )
        conn.execute(
            insert(Gpu),
            [
                {
                    "node_id": ids[f"n{i}"],
                    "index": g,
                    "uuid": f"GPU-{i}-{g}",
                    "model": "A100",
                    "memory_total_mib": 40960,
                    "memory_used_mib": 0,
                    "nvlink_peers": [],
                    "healthy": True,
                    "allocated_milli": 1000,
                }
                for i in range(nodes)
                for g in range(GPUS_PER_NODE)
            ],
        )
        conn.execute(
            insert(User),
            [
                {
                    "name": f"u{k}",
                    "permission": "user",
                    "credits_milli": 0,
                    "created": T0,
                    "last_seen": T0,
                    "level": "user",
                    "groups": [],
                    "credits_warned": False,
                }
                for k in range(n)
            ],
        )
        conn.execute(
            insert(Allocation),
            [
                {
                    "holder": f"u{k}:session/bench/1",
                    "user_name": f"u{k}",
                    "node_id": ids[f"n{k // GPUS_PER_NODE}"],
                    "gpu_indices": [k % GPUS_PER_NODE],
                    "gpu_uuids": [],
                    "gpu_milli_per_gpu": 1000,
                    "cpu_milli": 1000,
                    "memory_mib": 4096,
                    "state": "active",
                    "created": T0,
                    "leader_epoch": 1,
                    "score": {},
                }
                for k in range(n)
            ],
        )
    # the opening balances, through the ledger like every balance
    with db.session() as s:
        for k in range(n):
            credits.post(
                s,
                account=f"u{k}",
                amount_milli=10_000_000,
                kind="grant",
                reason="bench",
                actor="bench",
                now=T0,
            )


def baseline(db: Database, n: int) -> float:
    """Seconds for *n* plain UPDATEs of one balance each, in one transaction."""
    stmt = (
        update(User)
        .where(User.name == bindparam("n"))
        .values(credits_milli=User.credits_milli - bindparam("d"))
    )
    params = [{"n": f"u{k}", "d": 1000} for k in range(n)]
    t = time.perf_counter()
    with db.session() as s:
        s.connection().execute(stmt, params)
    elapsed = time.perf_counter() - t
    with db.session() as s:  # put the balances back (outside the timing)
        s.connection().execute(stmt, [{**p, "d": -1000} for p in params])
    return elapsed


def timed(db: Database, fn: Any, *args: Any, **kw: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    with db.session() as s:
        out = fn(s, *args, **kw)
    return time.perf_counter() - t, out


def measure(db: Database, n: int, repeat: int) -> dict[str, Any]:
    runs = []
    for r in range(repeat):
        now = T0 + timedelta(minutes=r + 1, seconds=1)
        base = baseline(db, n)
        t_pass, report = timed(db, charge_pass, POLICY, now)
        t_again, again = timed(db, charge_pass, POLICY, now)
        t_enforce, _ = timed(db, enforce, POLICY, now)
        assert report.charges == n, report
        assert again.charges == 0, again  # nothing left to charge in that interval
        runs.append(
            {
                "baseline_updates_s": round(base, 4),
                "pass_s": round(t_pass, 4),
                "pass_again_s": round(t_again, 4),
                "enforce_s": round(t_enforce, 4),
                "ratio_pass_to_baseline": round(t_pass / base, 2),
            }
        )
        print(
            f"pass {r + 1}: baseline {base * 1000:.0f} ms, pass {t_pass * 1000:.0f} ms "
            f"({t_pass / base:.1f}x), again {t_again * 1000:.0f} ms, enforce "
            f"{t_enforce * 1000:.0f} ms",
            flush=True,
        )
    with db.session() as s:
        assert credits.mismatched_balances(s) == []
    summary = {
        k: round(statistics.median(run[k] for run in runs), 4)
        for k in ("baseline_updates_s", "pass_s", "pass_again_s", "enforce_s")
    }
    summary["ratio_pass_to_baseline"] = round(summary["pass_s"] / summary["baseline_updates_s"], 2)
    summary["target_pass_s"] = 1.0
    summary["meets_target"] = summary["pass_s"] <= 1.0
    return {"runs": runs, "median": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--allocations", type=int, default=10_000, help="running allocations")
    p.add_argument("--repeat", type=int, default=5, help="passes measured (median reported)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    with private_postgres() as url:
        db = Database(url)
        check_schema(db.engine, db.url)
        t = time.perf_counter()
        populate(db, args.allocations)
        print(f"populated {args.allocations} allocations in {time.perf_counter() - t:.1f} s")
        result = {
            "setup": {
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "machine": f"{os.cpu_count()} CPUs, {platform.python_implementation()} "
                f"{platform.python_version()}",
                "allocations": args.allocations,
                "repeat": args.repeat,
                "database": "PostgreSQL (private cluster, tests/integration/pgproc.py)",
                "load_average_start": [round(x, 2) for x in os.getloadavg()],
            },
            **measure(db, args.allocations, args.repeat),
        }
        result["setup"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        db.dispose()
    print(json.dumps(result["median"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["median"]["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""``nsml.report`` in a training loop against MLflow's ``log_metric``/``log_batch``, one run.

NSML side: a real jupyterhub with the ``nsml`` service runs one session (a script that
sleeps); the bench reads that session's own token and API address from its container (as the
SDK inside sees them) and runs a training-loop stand-in in a fresh Python process with that
environment: ``-n`` steps of ``nsml.report(step=i, loss=..., acc=..., lr=...)`` (3 points per
call). It measures

* the cost per call inside the loop (the background sender runs meanwhile, as in training);
* the points per second the server ingested: all points, from the first call until the last
  batch was stored (``nsml.flush()`` returned) — and the server's count must match.

MLflow side, same machine, same process layout: ``mlflow.log_metric`` once per point (the
per-call API) and ``MlflowClient.log_batch`` with 1000 points per call, each to a fresh local
store: the file store (``file:``, ``MLFLOW_ALLOW_FILE_STORE=true``) and SQLite.

    .venv/bin/pip install 'jupyter-nsml[bench]'   # or: uv pip install mlflow-skinny
    .venv/bin/python bench/report_throughput.py --out bench/results/report_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.hubproc import HubProcess  # noqa: E402

IMAGE = os.environ.get("NSML_NOTEBOOK_IMAGE", "jupyter-nsml/singleuser:latest")

NSML_LOOP = """
import json, sys, time
import nsml
n = int(sys.argv[1])
t0 = time.perf_counter()
for i in range(n):
    nsml.report(step=i, loss=1.0 / (i + 1), acc=i * 1e-6, lr=0.1)
t1 = time.perf_counter()
nsml.flush(timeout=600)
t2 = time.perf_counter()
print(json.dumps({"calls": n, "points": 3 * n, "loop_s": t1 - t0, "total_s": t2 - t0}))
"""

MLFLOW_LOOP = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import mlflow
from mlflow.entities import Metric
uri, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
mlflow.set_tracking_uri(uri)
with mlflow.start_run() as run:
    if mode == "log_metric":
        t0 = time.perf_counter()
        for i in range(n):
            mlflow.log_metric("loss", 1.0 / (i + 1), step=i)
            mlflow.log_metric("acc", i * 1e-6, step=i)
            mlflow.log_metric("lr", 0.1, step=i)
        dt = time.perf_counter() - t0
        print(json.dumps({"calls": 3 * n, "points": 3 * n, "loop_s": dt, "total_s": dt}))
    else:
        client = mlflow.MlflowClient()
        now = int(time.time() * 1000)
        t0 = time.perf_counter()
        batch = []
        calls = 0
        for i in range(n):
            batch += [Metric("loss", 1.0 / (i + 1), now, i), Metric("acc", i * 1e-6, now, i),
                      Metric("lr", 0.1, now, i)]
            if len(batch) >= 999:
                client.log_batch(run.info.run_id, metrics=batch)
                calls += 1
                batch = []
        if batch:
            client.log_batch(run.info.run_id, metrics=batch)
            calls += 1
        dt = time.perf_counter() - t0
        print(json.dumps({"calls": calls, "points": 3 * n, "loop_s": dt, "total_s": dt}))
"""

SLEEP_PY = "import time\nprint('waiting', flush=True)\ntime.sleep(3600)\n"


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
    env.update(extra)
    return env


def run_json(argv: list[str], env: dict[str, str], timeout: float = 3600) -> dict[str, Any]:
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def rates(m: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()},
        "us_per_call": round(m["loop_s"] / m["calls"] * 1e6, 2),
        "points_per_s": round(m["points"] / m["total_s"]),
    }


def remove_containers(prefix: str) -> None:
    """Remove what the bench's hub left on the engine, even when the bench failed."""
    import docker

    client = docker.from_env()
    for c in client.containers.list(all=True, filters={"name": prefix}):
        c.remove(force=True)
    client.close()


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median cost per call and the median rate of the runs (each on its own)."""
    return {
        "calls": runs[0]["calls"],
        "points": runs[0]["points"],
        "us_per_call": statistics.median(r["us_per_call"] for r in runs),
        "points_per_s": round(statistics.median(r["points_per_s"] for r in runs)),
        "runs": runs,
    }


def start_session(hub: HubProcess, folder: Path) -> tuple[str, dict[str, str], Any]:
    """A running session and the environment its SDK sees."""
    from nsml import sessions
    from nsml.client import Client
    from nsml.config import ClientConfig

    token = hub.user_token("bench")
    client = Client(ClientConfig(hub.nsml_api + "/", token, "bench"))
    (folder / "sleep.py").write_text(SLEEP_PY)
    st = sessions.run(client, "sleep.py", folder=folder, memory="256M")
    name = st["name"]
    deadline = time.monotonic() + 120
    while sessions.status(client, name)["state"] != "running":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not start: {sessions.status(client, name)}")
        time.sleep(0.2)
    out = sessions.exec_in(client, name, ["env"])["output"]
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    keep = ("NSML_SESSION", "NSML_API_URL", "NSML_TOKEN")
    return name, {k: env[k] for k in keep}, client


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=200_000, help="report calls (3 points each)")
    p.add_argument("--mlflow-n", type=int, default=1_000, help="steps for log_metric")
    p.add_argument("--mlflow-batch-n", type=int, default=50_000, help="steps for log_batch")
    p.add_argument("--repeat", type=int, default=3, help="runs of each (the median is kept)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "report_throughput.json"))
    args = p.parse_args(argv)
    try:
        import mlflow  # noqa: F401
    except ImportError:
        p.error(
            "MLflow is not installed: .venv/bin/pip install 'jupyter-nsml[bench]' "
            "(or uv pip install mlflow-skinny)"
        )

    py = sys.executable
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        state = Path(tempfile.mkdtemp(prefix="nsml-bench-report-"))
        stack.callback(shutil.rmtree, state, True)
        hub = HubProcess(state)
        hub.env_overrides = {
            "NSML_CONTAINER_PREFIX": f"benchrep{os.getpid()}",
            "NSML_NOTEBOOK_IMAGE": IMAGE,
        }
        print("starting the hub and a session ...", flush=True)
        hub.start(timeout=120)
        stack.callback(remove_containers, hub.env_overrides["NSML_CONTAINER_PREFIX"])
        stack.callback(hub.stop)
        name, senv, client = start_session(hub, state)
        from nsml import sessions

        # Stop the session and let the server record it (and remove its container) before
        # the hub stops.
        stack.callback(
            lambda: sessions.wait(client, sessions.stop(client, name)["name"], timeout=60)
        )
        script = state / "nsml_loop.py"
        script.write_text(textwrap.dedent(NSML_LOOP))
        runs = []
        for i in range(args.repeat):
            before = sessions.status(client, name)["points"]
            m = run_json([py, str(script), str(args.n)], clean_env(senv))
            after = sessions.status(client, name)["points"]
            # The server counts report calls (rows); each carries 3 points.
            assert after - before == args.n, (before, after, args.n)
            runs.append(rates(m))
            print(f"  nsml.report run {i + 1}: {runs[-1]}", flush=True)
        results["nsml_report"] = medians(runs)

        ml = state / "mlflow_loop.py"
        ml.write_text(textwrap.dedent(MLFLOW_LOOP))
        for store in ("file", "sqlite"):
            for mode, n in (("log_metric", args.mlflow_n), ("log_batch", args.mlflow_batch_n)):
                runs = []
                for i in range(args.repeat):
                    d = Path(tempfile.mkdtemp(prefix="mlflow-", dir=state))
                    uri = f"file://{d}/mlruns" if store == "file" else f"sqlite:///{d}/mlflow.db"
                    env = clean_env({"MLFLOW_ALLOW_FILE_STORE": "true"})
                    runs.append(rates(run_json([py, str(ml), uri, mode, str(n)], env)))
                    print(f"  mlflow {store} {mode} run {i + 1}: {runs[-1]}", flush=True)
                results[f"mlflow_{store}_{mode}"] = medians(runs)

    ours = results["nsml_report"]["points_per_s"]
    fastest = max(v["points_per_s"] for k, v in results.items() if k.startswith("mlflow"))
    per_call_ml = min(v["us_per_call"] for k, v in results.items() if k.endswith("log_metric"))
    import mlflow as _mlflow

    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "mlflow": _mlflow.__version__,
            "image": IMAGE,
        },
        "results": results,
        "ratios": {
            "points_per_s_vs_fastest_mlflow": round(ours / fastest, 2),
            "points_per_s_vs_mlflow_file_log_metric": round(
                ours / results["mlflow_file_log_metric"]["points_per_s"], 1
            ),
            "us_per_call_nsml": results["nsml_report"]["us_per_call"],
            "us_per_call_mlflow_log_metric_best": per_call_ml,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print()
    print(f"{'':34} {'us/call':>10} {'points/s':>12}")
    for k, v in results.items():
        print(f"{k:34} {v['us_per_call']:>10.2f} {v['points_per_s']:>12,}")
    print(json.dumps(out["ratios"], indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

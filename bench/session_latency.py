"""From ``nsml run`` to the first line of user code, against a raw ``docker run``.

Both run the same image and the same script, whose first line prints the wall-clock time
(containers share the host's clock):

* ``nsml``: ``nsml.sessions.run`` (what ``nsml run`` and ``%nsml run`` call) against a real
  jupyterhub with the ``nsml`` service: snapshot and upload the folder, create the session,
  placement by the scheduler, the code copied into the session's folder, the container
  started by the session runner with GPUs (virtual), limits and the SDK environment;
* ``docker run``: ``docker run --rm --init --network host --memory 256m -v CODE:/code -w /code
  IMAGE python -u first.py`` from the command line.

Runs alternate between the two (so drift hits both alike), after one unmeasured warm-up each.
The NSML figure is split with the session's events: until ``run`` returned, until the
placement (``preparing``), until the container was started (``running``), until the first
line.

    .venv/bin/python bench/session_latency.py --out bench/results/session_latency.json
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
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.integration.hubproc import HubProcess  # noqa: E402

IMAGE = os.environ.get("NSML_NOTEBOOK_IMAGE", "jupyter-nsml/singleuser:latest")
FIRST_PY = 'import time; print("FIRST", repr(time.time()), flush=True)\n'


def first_line_time(text: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("FIRST "):
            return float(line.split()[1])
    return None


def iso_seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.rstrip("Z")).replace(tzinfo=UTC).timestamp()


DATASET = "bench-latency-data"


def make_dataset(folder: Path, mib: int) -> None:
    """*mib* MiB in 1 MiB files, and a few small ones."""
    folder.mkdir()
    for i in range(mib):
        (folder / f"shard-{i:04d}.bin").write_bytes(os.urandom(1 << 20))
    for i in range(32):
        (folder / f"label-{i:02d}.txt").write_text(f"{i}\n")


def nsml_once(
    client: Any, folder: Path, gpus: int, datasets: list[str], timeout: float = 120
) -> dict[str, float]:
    from nsml import sessions

    t0 = time.time()
    st = sessions.run(
        client, "first.py", folder=folder, memory="256M", gpus=gpus, datasets=datasets
    )
    returned = time.time() - t0
    name = st["name"]
    deadline = time.monotonic() + timeout
    first = None
    while first is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: no first line: {sessions.status(client, name)}")
        first = first_line_time(sessions.logs(client, name)["text"])
        if first is None:
            time.sleep(0.01)
    end = sessions.wait(client, name, timeout=60, poll_s=0.05)
    if end["state"] != "completed":
        raise RuntimeError(f"{name} ended {end['state']}: {end['message']}")
    events = client.request("GET", f"sessions/{name}/events")["events"]
    at = {e["state"]: iso_seconds(e["created"]) for e in events if e["kind"] == "state"}
    sessions.rm(client, name)
    return {
        "first_line_s": first - t0,
        "run_returned_s": returned,
        "placed_s": at["preparing"] - t0,
        "container_started_s": at["running"] - t0,
    }


def docker_once(folder: Path, data: Path | None) -> dict[str, float]:
    mount = ["-v", f"{data}:/data/{DATASET}:ro"] if data is not None else []
    t0 = time.time()
    r = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--init",
            "--network",
            "host",
            "--memory",
            "256m",
            "-v",
            f"{folder}:/code",
            *mount,
            "-w",
            "/code",
            IMAGE,
            "python",
            "-u",
            "first.py",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    first = first_line_time(r.stdout)
    if r.returncode != 0 or first is None:
        raise RuntimeError(f"docker run failed ({r.returncode}): {r.stderr[-2000:]}")
    return {"first_line_s": first - t0}


def remove_containers(prefix: str) -> None:
    """Remove what the bench's hub left on the engine, even when the bench failed."""
    import docker

    client = docker.from_env()
    for c in client.containers.list(all=True, filters={"name": prefix}):
        c.remove(force=True)
    client.close()


def summary(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "n": len(values),
        "median_s": round(statistics.median(values), 3),
        "p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
        "min_s": round(ordered[0], 3),
        "max_s": round(ordered[-1], 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=20, help="measured runs of each (default 20)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per session (virtual; default 1)")
    p.add_argument(
        "--dataset-mib",
        type=int,
        default=256,
        help="a dataset of this many MiB, pushed once and mounted by every session (cached on "
        "the node after the warm-up run; `docker run` bind-mounts the same folder); 0: none",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "session_latency.json"))
    args = p.parse_args(argv)
    from nsml.client import Client
    from nsml.config import ClientConfig

    nsml_runs: list[dict[str, float]] = []
    docker_runs: list[dict[str, float]] = []
    with ExitStack() as stack:
        state = Path(tempfile.mkdtemp(prefix="nsml-bench-latency-"))
        stack.callback(shutil.rmtree, state, True)
        folder = state / "code"
        folder.mkdir()
        (folder / "first.py").write_text(FIRST_PY)
        os.chmod(folder, 0o755)
        hub = HubProcess(state)
        hub.env_overrides = {
            "NSML_CONTAINER_PREFIX": f"benchlat{os.getpid()}",
            "NSML_NOTEBOOK_IMAGE": IMAGE,
        }
        print("starting the hub ...", flush=True)
        hub.start(timeout=120)
        stack.callback(remove_containers, hub.env_overrides["NSML_CONTAINER_PREFIX"])
        stack.callback(hub.stop)
        client = Client(ClientConfig(hub.nsml_api + "/", hub.user_token("bench"), "bench"))
        data: Path | None = None
        datasets: list[str] = []
        if args.dataset_mib > 0:
            from nsml import datasets as nsml_datasets

            data = state / "data"
            make_dataset(data, args.dataset_mib)
            os.chmod(data, 0o755)
            pushed = nsml_datasets.push(client, DATASET, data)
            print(f"pushed {pushed.ref}", flush=True)
            datasets = [DATASET]
        nsml_once(client, folder, args.gpus, datasets)  # warm-up: caches the dataset
        docker_once(folder, data)
        for i in range(args.n):
            nsml_runs.append(nsml_once(client, folder, args.gpus, datasets))
            docker_runs.append(docker_once(folder, data))
            print(
                f"  {i + 1:>3}: nsml {nsml_runs[-1]['first_line_s']:.3f}s  "
                f"docker run {docker_runs[-1]['first_line_s']:.3f}s",
                flush=True,
            )
    nsml = {k: summary([r[k] for r in nsml_runs]) for k in nsml_runs[0]}
    raw = {k: summary([r[k] for r in docker_runs]) for k in docker_runs[0]}
    ratio = nsml["first_line_s"]["median_s"] / raw["first_line_s"]["median_s"]
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "image": IMAGE,
        },
        "datasets": (
            f"{DATASET}: {args.dataset_mib} MiB, cached on the node after the warm-up run "
            "(docker run bind-mounts the same folder read-only)"
            if args.dataset_mib > 0
            else "none"
        ),
        "nsml_run": nsml,
        "docker_run": raw,
        "ratio_of_medians": round(ratio, 2),
        "runs": {"nsml": nsml_runs, "docker": docker_runs},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print()
    for part, s in nsml.items():
        print(f"nsml      {part:<22} median {s['median_s']:.3f}s  p90 {s['p90_s']:.3f}s")
    s = raw["first_line_s"]
    print(f"docker run {'first_line_s':<21} median {s['median_s']:.3f}s  p90 {s['p90_s']:.3f}s")
    print(f"ratio of medians: {ratio:.2f} (target <= 2)")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The node agent: what a node reports to the NSML server, and the ``nsml-agent`` command.

The NSML server runs the same collection in-process for its own machine (the embedded
default); ``nsml-agent`` runs it on every other node and sends the report over the API. This
is a thin shell: the probe does the GPU work, the server does the bookkeeping.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

from .probe import GPUProbe, probe_from_env

log = logging.getLogger("nsml_agent")


def memory_mib() -> int:
    """Total memory of this machine in MiB (from /proc/meminfo; 0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def cpu_milli() -> int:
    """CPUs this process may use, in milli-CPU."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return n * 1000


def docker_images(docker_client: Any) -> list[str]:
    """Tags of the images present on a Docker engine (empty when there is no engine)."""
    if docker_client is None:
        return []
    tags: set[str] = set()
    for image in docker_client.images.list():
        tags.update(image.tags)
    return sorted(tags)


def collect_heartbeat(
    probe: GPUProbe,
    *,
    backend: str,
    docker_url: str | None,
    images: list[str],
    labels: Mapping[str, str] | None = None,
    datasets: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """One heartbeat body (the API's ``Heartbeat`` schema) for this machine.

    *datasets* is what the node's dataset cache holds (``{"name@k": bytes}``): the
    scheduler's locality.
    """
    st = probe.status()
    gpus = probe.gpus() if st.enabled else []
    return {
        "backend": backend,
        "docker_url": docker_url,
        "cpu_milli": cpu_milli(),
        "memory_mib": memory_mib(),
        "gpu_probe": {
            "kind": st.kind,
            "enabled": st.enabled,
            "reason": st.reason,
            "driver_version": st.driver_version,
            "warnings": list(st.warnings),
        },
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "model": g.model,
                "memory_total_mib": g.memory_total_mib,
                "memory_used_mib": g.memory_used_mib,
                "utilization_pct": g.utilization_pct,
                "nvlink_peers": list(g.nvlink_peers),
                "pcie_group": g.pcie_group,
            }
            for g in gpus
        ],
        "images": images,
        "labels": dict(labels or {}),
        "datasets": dict(datasets or {}),
    }


class DatasetHolds:
    """The node's dataset cache, kept in line with what the NSML server says the node holds.

    Each sync asks the server for the node's holds (datasets of active allocations placed
    here), fills the ones still ``preparing`` in the background (manifest and blobs fetched
    over HTTP, every blob hashed and checked), reports each ready (with its folder) or failed,
    and releases cache holders whose allocation ended. Eviction is the cache's: least recently
    used first, never a held version.
    """

    def __init__(
        self,
        http: Any,
        api_url: str,
        node: str,
        cache: Any,
        *,
        workers: int = 2,
        timeout_s: float = 60.0,
    ) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.http = http
        self.api = api_url.rstrip("/")
        self.node = node
        self.cache = cache
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nsml-agent-cache")
        self.running: dict[int, Any] = {}
        self.etag: str | None = None  # of the last answer: a long poll waits for a change

    def _url(self, path: str) -> str:
        return f"{self.api}/{path}"

    def sync(self, wait_s: float = 0.0) -> None:
        """One round: fetch the holds, start fills, report finished ones, release ended ones.

        With *wait_s* > 0 and no fill running, a long poll: the server answers when the holds
        changed since the last answer, or after *wait_s* seconds (a server that does not know
        long polls answers at once).
        """
        from urllib.parse import quote

        headers = {}
        if wait_s > 0 and not self.running and self.etag:
            headers = {"If-None-Match": self.etag, "Prefer": f"wait={wait_s:.0f}"}
        r = self.http.get(
            self._url(f"nodes/{quote(self.node, safe='')}/dataset-holds"),
            headers=headers,
            timeout=self.timeout_s + (wait_s if headers else 0),
        )
        r.raise_for_status()
        self.etag = r.headers.get("ETag")
        holds = r.json()["holds"]
        active = {f"allocation:{h['allocation']}" for h in holds}
        for entry in self.cache.entries():
            for holder in entry.holders - active:
                if holder.startswith("allocation:"):
                    self.cache.release(entry.key, holder)
                    log.info("%s released by %s (allocation ended)", entry.key, holder)
        for h in holds:
            if h["state"] == "preparing" and h["id"] not in self.running:
                self.running[h["id"]] = self.pool.submit(self.fill, h)
        for hid, fut in list(self.running.items()):
            if not fut.done():
                continue
            del self.running[hid]
            state, path, message = fut.result()
            body = {"state": state, "host_path": path, "message": message}
            r = self.http.put(
                self._url(f"nodes/{quote(self.node, safe='')}/dataset-holds/{hid}"),
                json=body,
                timeout=self.timeout_s,
            )
            if r.status_code >= 400:
                log.error("reporting dataset hold %s failed: %s %s", hid, r.status_code, r.text)

    def fill(self, hold: dict[str, Any]) -> tuple[str, str | None, str | None]:
        """Cache one hold's version, held by its allocation: ``(state, path, message)``."""
        from urllib.parse import quote

        from nsml_datasets import DatasetError, Manifest
        from nsml_datasets.hashing import hash_bytes

        key, holder = hold["key"], f"allocation:{hold['allocation']}"
        base = self._url(
            f"datasets/{quote(hold['dataset'], safe='')}/versions/{int(hold['version'])}"
        )
        try:
            r = self.http.get(base + "/manifest", timeout=self.timeout_s)
            if r.status_code != 200:
                return "failed", None, f"the manifest of {key} is not available ({r.status_code})"
            if hash_bytes(r.content) != hold["digest"]:
                return "failed", None, f"the manifest of {key} does not match {hold['digest']}"
            manifest = Manifest.from_json(r.content)

            def fetch(sha: str) -> Any:
                resp = self.http.get(f"{base}/blobs/{sha}", stream=True, timeout=self.timeout_s)
                resp.raise_for_status()
                return resp.raw

            try:
                path = self.cache.ensure(key, manifest, holder=holder, fetch=fetch)
            except DatasetError as e:
                if e.reason != "conflict":
                    raise
                self.cache.remove(key)  # cached for a version since removed: names are reused
                path = self.cache.ensure(key, manifest, holder=holder, fetch=fetch)
        except DatasetError as e:
            log.warning("%s for %s: %s", key, holder, e.message)
            return "failed", None, e.message
        except Exception as e:  # the server or the network: report, the next mount retries
            log.warning("%s for %s: %s", key, holder, e)
            return "failed", None, f"{self.node} could not download {key}: {e}"
        log.info("%s cached at %s for %s", key, path, holder)
        return "ready", str(path), None

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="nsml-agent",
        description=(
            "Report this node (GPUs, CPU, memory, Docker images) to the NSML server every "
            "--interval seconds. GPUs come from NVML, or from NSML_VIRTUAL_GPUS=N on machines "
            "without one."
        ),
    )
    p.add_argument(
        "--api-url",
        default=os.environ.get("NSML_API_URL"),
        help="NSML API URL, e.g. https://hub.example.org/services/nsml/api (env NSML_API_URL)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("NSML_TOKEN"),
        help="a hub admin's API token (env NSML_TOKEN)",
    )
    p.add_argument(
        "--name",
        default=os.environ.get("NSML_NODE_NAME", socket.gethostname()),
        help="node name (env NSML_NODE_NAME; default: the host name)",
    )
    p.add_argument(
        "--docker-url",
        default=os.environ.get("NSML_NODE_DOCKER_URL"),
        help="how the server reaches this node's Docker engine, e.g. tcp://node-a:2376 "
        "(env NSML_NODE_DOCKER_URL)",
    )
    p.add_argument(
        "--cache-dir",
        default=os.environ.get("NSML_DATASET_CACHE_DIR", "/var/lib/nsml/datasets"),
        help="this node's dataset cache, mounted read-only into containers: a folder the "
        "node's Docker engine sees (env NSML_DATASET_CACHE_DIR; default /var/lib/nsml/datasets)",
    )
    p.add_argument(
        "--cache-bytes",
        type=int,
        default=int(os.environ.get("NSML_DATASET_CACHE_BYTES", str(100 << 30))),
        help="byte budget of the dataset cache; least recently used versions are evicted, "
        "never one in use (env NSML_DATASET_CACHE_BYTES; default 100 GiB)",
    )
    p.add_argument("--interval", type=float, default=10.0, help="seconds between heartbeats")
    p.add_argument(
        "--holds-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the datasets the server wants cached here",
    )
    p.add_argument(
        "--holds-wait",
        type=float,
        default=30.0,
        help="longest seconds a check of the dataset holds waits for a change on the server "
        "(a long poll, bounded by the next heartbeat); 0: plain polls every --holds-interval",
    )
    p.add_argument("--once", action="store_true", help="send one heartbeat and exit")
    args = p.parse_args(argv)
    if not args.api_url or not args.token:
        p.error("--api-url and --token (or NSML_API_URL and NSML_TOKEN) are required")
    if args.interval <= 0 or args.holds_interval <= 0:
        p.error(f"--interval and --holds-interval must be positive, not {args.interval}")
    if args.holds_wait < 0:
        p.error(f"--holds-wait must be >= 0 seconds, not {args.holds_wait}")
    if args.cache_bytes < 0:
        p.error(f"--cache-bytes must be a number of bytes >= 0, not {args.cache_bytes}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nsml-agent``."""
    import requests

    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(asctime)s agent] %(message)s")
    try:
        probe = probe_from_env(os.environ, node_name=args.name)
    except ValueError as e:
        print(f"nsml-agent: {e}", file=sys.stderr)
        return 2
    st = probe.status()
    if not st.enabled:
        log.warning("GPU probe disabled: %s", st.reason)
    client = None
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as e:
        log.warning("no local Docker engine answers (%s); reporting no images", e)
        client = None
    if client is not None and not args.docker_url:
        log.warning(
            "no --docker-url: the server cannot reach this node's engine, so the node is "
            "listed but receives no work"
        )
    from nsml_datasets import NodeCache

    # One heartbeat (--once) reports an existing cache but creates none.
    cache = (
        NodeCache(args.cache_dir, args.cache_bytes)
        if not args.once or os.path.isdir(args.cache_dir)
        else None
    )
    session = requests.Session()
    session.headers["Authorization"] = f"token {args.token}"
    holds = DatasetHolds(session, args.api_url, args.name, cache) if cache is not None else None
    url = args.api_url.rstrip("/") + f"/nodes/{args.name}/heartbeat"
    delay = args.interval
    next_beat = 0.0
    try:
        while True:
            if time.monotonic() >= next_beat:
                try:
                    images = docker_images(client)
                except Exception as e:
                    # An engine that does not answer runs nothing: this node stops reporting
                    # itself alive, so the server marks it down (and, past its grace, gives
                    # its work up); heartbeats resume when the engine answers again.
                    log.error("the local Docker engine does not answer (%s); no heartbeat", e)
                    next_beat = time.monotonic() + args.interval
                    continue
                body = collect_heartbeat(
                    probe,
                    backend="docker" if client is not None else "local",
                    docker_url=args.docker_url,
                    images=images,
                    datasets=cache.present() if cache is not None else None,
                )
                try:
                    r = session.put(url, json=body, timeout=10)
                    if r.status_code >= 400:
                        log.error("heartbeat refused (%s): %s", r.status_code, r.text[:500])
                        if 400 <= r.status_code < 500 and args.once:
                            return 1
                    else:
                        log.info("%s: heartbeat sent (%d GPUs)", args.name, len(body["gpus"]))
                    delay = args.interval
                except requests.RequestException as e:
                    delay = min(delay * 2, 300.0)
                    log.error("cannot reach %s: %s; retrying in %.0fs", url, e, delay)
                    if args.once:
                        return 1
                if args.once:
                    return 0
                next_beat = time.monotonic() + delay * random.uniform(0.9, 1.1)
            if holds is not None:
                try:
                    holds.sync(min(args.holds_wait, next_beat - time.monotonic() - 1.0))
                except requests.RequestException as e:
                    log.warning("cannot read this node's dataset holds: %s", e)
            time.sleep(min(args.holds_interval, max(0.0, next_beat - time.monotonic())))
    finally:
        if holds is not None:
            holds.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

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
    p.add_argument("--interval", type=float, default=10.0, help="seconds between heartbeats")
    p.add_argument("--once", action="store_true", help="send one heartbeat and exit")
    args = p.parse_args(argv)
    if not args.api_url or not args.token:
        p.error("--api-url and --token (or NSML_API_URL and NSML_TOKEN) are required")
    if args.interval <= 0:
        p.error(f"--interval must be positive, not {args.interval}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nsml-agent``."""
    import requests

    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(asctime)s agent] %(message)s")
    probe = probe_from_env(os.environ, node_name=args.name)
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
    url = args.api_url.rstrip("/") + f"/nodes/{args.name}/heartbeat"
    headers = {"Authorization": f"token {args.token}"}
    delay = args.interval
    while True:
        body = collect_heartbeat(
            probe,
            backend="docker" if client is not None else "local",
            docker_url=args.docker_url,
            images=docker_images(client),
        )
        try:
            r = requests.put(url, json=body, headers=headers, timeout=10)
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
        time.sleep(delay * random.uniform(0.9, 1.1))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The comparison panel at scale: fetch, build and serialise it for N sessions x P points, and
the bytes it sends to the browser, beside a plain Bokeh figure with all points (same run).

The server side is the NSML server's own code over HTTP: the session routes of
``nsml_server.api.sessions`` (list, status, metrics with ``max_points``) in a tornado server
on loopback in a process of its own, over a SQLite database filled with N sessions of P
report points each (one chunk of ``loss`` per session, as ``nsml.report`` sends them). The
hub's token check is replaced by a fixed user (the hub is not what is measured). The client
side is the real one:
``nsml_magics.comparison.compare_panel`` (pattern ``bench/_/*``: the session list, then the
metrics of each, 8 at a time), the panel built, and serialised as the notebook widget sends
it (``jupyter_bokeh``'s render bundle: Bokeh's document JSON; BokehJS itself is loaded once
per page and counted apart).

The baseline, in the same run: the same sessions' full series fetched (no ``max_points``),
one plain ``figure()`` with one line per session and every point, serialised the same way.

    .venv/bin/python bench/plot_scale.py --sessions 10,100 --points 10000 \\
        --out bench/results/plot_scale.json

Target (issue 14): 100 sessions x 10,000 points within 2 s, and at most 1/10 of the bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

USER = "bench"
BASE = "/services/nsml/"


class FixedUser:
    """Stands in for the hub's token check: every request is the user ``bench``."""

    access_scopes: frozenset[str] = frozenset()

    async def get_user(self, handler: Any, sync: bool = False) -> dict[str, Any]:
        return {"name": USER, "kind": "user", "admin": False, "groups": []}

    def check_scopes(self, required: Any, user: Any) -> bool:
        return True


def fill(db_url: str, sessions: int, points: int) -> None:
    """*sessions* completed sessions of ``bench`` with *points* loss values each."""
    import math

    from nsml_server.db import Database, check_schema
    from nsml_server.sessions import create_session, ingest_points

    db = Database(db_url)
    check_schema(db.engine, db.url)
    now = datetime(2026, 1, 1)
    with db.session() as s:
        for k in range(sessions):
            row = create_session(
                s,
                user=USER,
                datasets=[],
                values={
                    "code_digest": "0" * 64,
                    "entry": "train.py",
                    "image": "i",
                    "resources": {},
                    "args": ["--lr", str(10 ** -(1 + k % 4)), "--seed", str(k), "--bs", "64"],
                },
                now=now,
            )
            row.state = "running"
            s.flush()
            lr = 10 ** -(1 + k % 4)
            loss = [math.exp(-i * lr / 50) + 0.05 * math.sin(i / 7 + k) for i in range(points)]
            body = {
                "steps": list(range(points)),
                "walls": [1.7e9 + i for i in range(points)],
                "values": {"loss": loss},
            }
            ingest_points(s, row, body, now)
            row.state = "completed"
            s.flush()
    db.dispose()


def app_for(db_url: str) -> Any:
    """The session routes of the NSML server over *db_url*, as a tornado application."""
    from tornado import web

    from nsml_server.api.base import ServerContext
    from nsml_server.api.openapi import openapi_document
    from nsml_server.api.sessions import session_routes
    from nsml_server.db import Database

    ctx = ServerContext(
        db=Database(db_url),
        hub_auth=FixedUser(),
        version="bench",
        schema_revision="",
        now=lambda: datetime.now(UTC).replace(tzinfo=None),
    )
    document = openapi_document("bench", BASE)
    routes = session_routes(ctx, None)
    return web.Application([r.spec(BASE + "api/", document) for r in routes])


def serve_forever(db_url: str) -> None:
    """The server process: listen on a free loopback port, print it, serve until killed."""
    from tornado import httpserver
    from tornado.netutil import bind_sockets

    async def run() -> None:
        sockets = bind_sockets(0, "127.0.0.1")
        server = httpserver.HTTPServer(app_for(db_url))
        server.add_sockets(sockets)
        print(sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


def serve(db_url: str) -> tuple[str, Callable[[], None]]:
    """Start the server in its own process (as the NSML server is); its API URL and a stop
    function."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", db_url], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())

    def stop() -> None:
        proc.terminate()
        proc.wait(10)

    return f"http://127.0.0.1:{port}{BASE}api/", stop


def bundle_bytes(layout: Any) -> int:
    """Bytes of what the notebook widget sends for *layout* (jupyter_bokeh's render bundle:
    the document JSON and the render item)."""
    from bokeh.core.json_encoder import serialize_json
    from bokeh.document import Document
    from bokeh.embed.util import standalone_docs_json_and_render_items

    if layout.document is None:
        Document().add_root(layout)
    docs_json, items = standalone_docs_json_and_render_items(
        [layout], suppress_callback_warning=True
    )
    text = serialize_json({"docs_json": docs_json, "render_items": [i.to_json() for i in items]})
    return len(text.encode())


def ours(client: Any, sessions: int) -> dict[str, Any]:
    """What ``nsml_magics.compare`` does (choose, fetch, build), then serialise."""
    from nsml_magics.comparison import fetch_runs, select_sessions
    from nsml_magics.panel import build_panel

    t0 = time.perf_counter()
    statuses = select_sessions(client, [f"{USER}/_/*"])
    runs = fetch_runs(client, statuses)
    t1 = time.perf_counter()
    panel = build_panel(runs)
    t2 = time.perf_counter()
    size = bundle_bytes(panel.layout)
    t3 = time.perf_counter()
    assert len(panel.runs) == sessions, len(panel.runs)
    shown = sum(len(s.steps) for r in panel.runs for s in r.series.values())
    return {
        "fetch_s": t1 - t0,
        "build_s": t2 - t1,
        "serialise_s": t3 - t2,
        "total_s": t3 - t0,
        "bytes": size,
        "points_sent": shown,
    }


def plain(client: Any, sessions: int) -> dict[str, Any]:
    """Every point, one plain figure (what one writes without the panel)."""
    import numpy as np
    from bokeh.plotting import figure

    from nsml import sessions as api

    t0 = time.perf_counter()
    listed = api.ps(client, limit=api.MAX_LIST)
    series = [api.metrics(client, st["name"])["series"]["loss"] for st in listed]
    t1 = time.perf_counter()
    p = figure(width=900, height=300)
    points = 0
    for ser in series:
        ys = np.array([float(v) for v in ser["values"]])
        p.line(np.array(ser["steps"], dtype=np.float64), ys)
        points += len(ys)
    t2 = time.perf_counter()
    size = bundle_bytes(p)
    t3 = time.perf_counter()
    assert len(listed) == sessions
    return {
        "fetch_s": t1 - t0,
        "build_s": t2 - t1,
        "serialise_s": t3 - t2,
        "total_s": t3 - t0,
        "bytes": size,
        "points_sent": points,
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median total time."""
    return sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]


def warm_up() -> None:
    """Import Bokeh and build a small panel once: a kernel pays that once, not per plot."""
    from nsml_magics.panel import Run, Series, build_panel

    bundle_bytes(
        build_panel([Run("u/_/1", series={"m": Series([0, 1], [0.0, 1.0], [0, 1])})]).layout
    )


def bokehjs_bytes() -> int:
    """BokehJS inline (loaded once per page by the notebook, or carried by an HTML file)."""
    from bokeh.resources import INLINE

    return sum(len(js.encode()) for js in INLINE.js_raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="10,100", help="comma-separated session counts")
    ap.add_argument("--points", type=int, default=10_000, help="points per session")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (medians are kept)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    ap.add_argument("--serve", metavar="DB_URL", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve_forever(a.serve)
        return

    from nsml.client import Client
    from nsml.config import ClientConfig

    warm_up()
    results = []
    for n in [int(v) for v in a.sessions.split(",")]:
        runs: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": [], "plain_bokeh": []}
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/bench.sqlite"
            fill(url, n, a.points)
            for _ in range(a.repeat):
                # a fresh server: the first panel decodes every batch (cold), the second
                # finds them in the server's cache of decoded batches (warm)
                api_url, stop = serve(url)
                try:
                    client = Client(ClientConfig(api_url=api_url, token="bench", source="bench"))
                    client._nsml_user = USER  # type: ignore[attr-defined]
                    runs["cold"].append(ours(client, n))
                    runs["warm"].append(ours(client, n))
                finally:
                    stop()
                api_url, stop = serve(url)
                try:
                    client = Client(ClientConfig(api_url=api_url, token="bench", source="bench"))
                    runs["plain_bokeh"].append(plain(client, n))
                finally:
                    stop()
        med = {k: median_run(v) for k, v in runs.items()}
        row = {
            "sessions": n,
            "points_per_session": a.points,
            **med,
            "bytes_ratio": med["cold"]["bytes"] / med["plain_bokeh"]["bytes"],
            "runs": runs,
        }
        results.append(row)
        for k in ("cold", "warm", "plain_bokeh"):
            b = med[k]
            print(
                f"{n:>4} sessions x {a.points} points, {k:<11}: {b['total_s']:.2f} s (fetch "
                f"{b['fetch_s']:.2f}, build {b['build_s']:.2f}, serialise "
                f"{b['serialise_s']:.2f}), {b['bytes'] / 1e6:.2f} MB"
            )
        print(f"     bytes ratio {row['bytes_ratio']:.3f}")
    out = {
        "bench": "plot_scale",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "bokehjs_inline_bytes": bokehjs_bytes(),
        "results": results,
    }
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.out}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()

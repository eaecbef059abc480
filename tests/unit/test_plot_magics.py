"""`%nsml plot` and `%nsml gpumonitor` in an IPython shell, and `nsml plot --html` /
`nsml gpumonitor` on the command line, against a stand-in API on loopback that answers what
the server would (its metric series, its GPU use)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from nsml.cli import main
from tests.unit.fakeapi import FakeAPI

CURVE = [10.0, 55.0, 90.0, 30.0]


def status(n: int, args: list[str], state: str = "completed") -> dict[str, Any]:
    return {"name": f"alice/_/{n}", "state": state, "args": args, "parent": None}


def metrics(n: int) -> dict[str, Any]:
    steps = list(range(5))
    return {
        "session": f"alice/_/{n}",
        "series": {
            "loss": {"steps": steps, "values": [1.0 / (n + s) for s in steps], "walls": steps},
            "acc": {"steps": steps, "values": [0.1 * s for s in steps[:-1]] + ["nan"],
                    "walls": steps},
        },
    }  # fmt: skip


GPU = {
    "session": "alice/_/1",
    "state": "running",
    "node": "node-a",
    "t": [1.7e9 + 10 * k for k in range(4)],
    "seconds": [10.0] * 4,
    "gpus": [{"gpu": "0", "utilization_pct": CURVE, "memory_used_mib": [100.0] * 4}],
    "current_utilization_pct": 30.0,
    "note": None,
    "idle_after_s": 1800.0,
    "idle_threshold_pct": 5.0,
}


@pytest.fixture()
def api(nsml_env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAPI]:
    routes = {
        "me": {"name": "alice"},
        "sessions": {
            "sessions": [status(1, ["--lr", "0.1"]), status(2, ["--lr", "0.01", "--amp"])]
        },
        "sessions/alice/_/1": status(1, ["--lr", "0.1"]),
        "sessions/alice/_/2": status(2, ["--lr", "0.01", "--amp"]),
        "metrics": {"metrics": [metrics(1), metrics(2)], "errors": {}},
        "sessions/alice/_/1/gpu": GPU,
    }
    with FakeAPI.running(routes) as fake:
        nsml_env.setenv("NSML_API_URL", fake.url)
        nsml_env.setenv("NSML_TOKEN", "t")
        nsml_env.chdir(tmp_path)
        yield fake


@pytest.fixture(scope="module")
def ip() -> InteractiveShell:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "nsml_magics")
    return shell


def magic(ip: InteractiveShell, line: str) -> None:
    m = ip.magics_manager.registry["NSMLMagics"]
    m._client = None  # configured from this test's environment
    ip.run_line_magic("nsml", line)


def test_nsml_plot_prints_the_split_and_writes_a_standalone_file(
    api: FakeAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plot", "alice/_/*", "--html", str(tmp_path / "p.html")]) == 0
    out = capsys.readouterr().out
    assert "exclusive arguments:" in out and "--lr" in out and "--amp" in out
    assert "metrics: loss, acc" in out
    html = (tmp_path / "p.html").read_text()
    assert "nsml-exclusive" in html and "cdn.bokeh.org" not in html
    asked = [p for _, p in api.requests if "metrics" in p]
    assert len(asked) == 1, "one request for all the sessions' metrics"
    assert "sessions=alice%2F_%2F1%2Calice%2F_%2F2" in asked[0], asked
    assert "max_points=600" in asked[0], asked


def test_the_plot_magic_shows_the_panel_as_a_widget(
    api: FakeAPI, ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    from nsml_magics.comparison import LivePanel

    magic(ip, "plot alice/_/1 alice/_/2 --metric loss --colour-by lr")
    m = ip.magics_manager.registry["NSMLMagics"]
    live = m.lines["plot:alice/_/1,alice/_/2"]
    assert isinstance(live, LivePanel)
    assert type(live.widget).__name__ == "BokehModel"
    assert live.panel.metrics == ["loss"] and live.running() == []
    assert live.task is None, "ended sessions are drawn once"


def test_the_gpumonitor_magic_plots_the_utilisation_curve(
    api: FakeAPI, ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from nsml_magics.gpumonitor import LiveGpuMonitor

    # The kernel's loop (an earlier asyncio.run() in this process leaves none current).
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        magic(ip, "gpumonitor alice/_/1")
        out = capsys.readouterr().out
        assert "GPU 0: now 30%, mean 46%, peak 90%, memory peak 100 MiB" in out, out
        live = ip.magics_manager.registry["NSMLMagics"].lines["gpumonitor:alice/_/1"]
        assert isinstance(live, LiveGpuMonitor) and type(live.widget).__name__ == "BokehModel"
        assert live.task is not None, "a running session is followed"
        live.task.cancel()
        loop.run_until_complete(asyncio.gather(live.task, return_exceptions=True))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    assert main(["gpumonitor", "alice/_/1"]) == 0
    assert "peak 90%" in capsys.readouterr().out


def test_the_gpumonitor_panel_follows_a_running_session_until_it_ends(api: FakeAPI) -> None:
    import asyncio

    from nsml.client import Client
    from nsml_magics.gpumonitor import LiveGpuMonitor

    first = {**GPU, "t": [], "seconds": [], "gpus": [], "note": "no samples yet"}
    live = LiveGpuMonitor(Client(), first, interval_s=0.05)
    (note,) = live.panel.layout.children
    assert note.name == "nsml-gpumonitor-note" and "no samples yet" in note.text
    # The session's first samples, then samples the server merged as they aged, then its end.
    merged = {**GPU, "t": GPU["t"][::2], "seconds": [20.0] * 2}
    merged["gpus"] = [{"gpu": "0", "utilization_pct": [30.0, 60.0], "memory_used_mib": [1, 2]}]

    def drawn() -> list[float]:
        util = live.panel.layout.children[0]
        if util.name == "nsml-gpumonitor-note":
            return []
        return list(util.renderers[0].data_source.data["util"])

    async def follow() -> None:
        task = asyncio.create_task(live.follow())
        for answer, expected in ((GPU, CURVE), (merged, [30.0, 60.0])):
            api.routes["sessions/alice/_/1/gpu"] = answer
            while drawn() != expected:  # "the curve replaces the note", then the merged
                await asyncio.sleep(0.02)  # series replaces the line's points
        assert live.running and not task.done()
        api.routes["sessions/alice/_/1/gpu"] = {**merged, "state": "completed"}
        await task  # following ends with the session

    asyncio.run(asyncio.wait_for(follow(), 20))
    assert not live.running and drawn() == [30.0, 60.0]
    asked = [p for _, p in api.requests if p.endswith("/gpu")]
    assert len(asked) >= 3, asked


def test_many_sessions_metrics_are_asked_in_urls_of_at_most_1000_characters_of_names(
    api: FakeAPI,
) -> None:
    from urllib.parse import parse_qs, urlsplit

    from nsml import sessions
    from nsml.client import Client

    names = [f"alice/{'d' * 40}/{k}" for k in range(1, 61)]  # 2,950 characters in all
    found, _ = sessions.metrics_many(Client(), [*names, names[0]])
    asked = [
        parse_qs(urlsplit(p).query)["sessions"][0]
        for _, p in api.requests
        if urlsplit(p).path.endswith("/metrics")
    ]
    assert len(asked) == 3 and all(len(a) <= 1000 for a in asked), [len(a) for a in asked]
    # The requests may run at once, so they arrive in any order: each name is asked once.
    asked_names = [n for a in asked for n in a.split(",")]
    assert sorted(asked_names) == sorted(names) and len(asked_names) == len(names), asked
    assert set(found) == {"alice/_/1", "alice/_/2"}  # what the stand-in answers

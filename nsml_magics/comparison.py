"""``nsml_magics.compare(...)`` and ``%nsml plot``: choose sessions, fetch their metrics
(downsampled by the server), build the panel (:mod:`nsml_magics.panel`), and in a notebook
keep it live.

Sessions are chosen

- by name (``alice/mnist/3`` or ``mnist/3``);
- by pattern (``alice/mnist/*``, ``mnist/1?``: shell wildcards over your sessions' names);
- by lineage (``lineage=["alice/mnist/3"]``: that session and every session forked from it,
  and from those, among your sessions);
- as your newest N (``last=N``).

In a notebook the panel is shown as a ``jupyter_bokeh`` widget, which syncs the Bokeh
document both ways over the kernel's comms: a refresh task on the kernel's event loop (the
HTTP calls in worker threads, so cells keep running) streams the new points of running
sessions into their lines and stops when all have ended; zooming the x axis (by step) fetches
the exact points of the visible range. BokehJS is loaded INLINE (the platform may be offline:
never from a CDN). ``--html FILE`` writes the same panel as one standalone HTML file.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from nsml import sessions
from nsml.client import Client
from nsml.sessions import FINAL_STATES

from .panel import Panel, Run, Series, XAxis, build_panel, columns, line_data, run_from_api

log = logging.getLogger("nsml_magics")

#: Points per series asked from the server for the overview: LTTB keeps a curve's shape
#: with about one point per pixel or two of a ~900 px plot; zooming fetches exact points.
DEFAULT_MAX_POINTS = 600
#: Parallel metric fetches (the server answers each from its own rows).
FETCH_WORKERS = 8
_WILDCARDS = set("*?[")


def _own_sessions(client: Client) -> list[dict[str, Any]]:
    return sessions.ps(client, limit=sessions.MAX_LIST)


def select_sessions(
    client: Client,
    refs: Sequence[str] = (),
    *,
    lineage: Sequence[str] = (),
    last: int | None = None,
) -> list[dict[str, Any]]:
    """The descriptions of the sessions *refs*, *lineage* and *last* name (see the module),
    each once, in the order named.

    Raises:
        ValueError: nothing named, or a pattern that matches none of your sessions.
    """
    listed: list[dict[str, Any]] | None = None

    def own() -> list[dict[str, Any]]:
        nonlocal listed
        if listed is None:
            listed = _own_sessions(client)
        return listed

    chosen: dict[str, dict[str, Any]] = {}
    for ref in refs:
        if _WILDCARDS & set(ref):
            pattern = ref.strip("/")
            if pattern.count("/") == 1:
                pattern = f"{sessions._me(client)}/{pattern}"
            found = [s for s in own() if fnmatchcase(str(s["name"]), pattern)]
            if not found:
                raise ValueError(f"no session of yours matches {ref!r}")
            chosen.update((str(s["name"]), s) for s in found)
        else:
            st = sessions.status(client, ref)
            chosen[str(st["name"])] = st
    for ref in lineage:
        root = sessions.status(client, ref)
        chosen[str(root["name"])] = root
        for s in descendants(str(root["name"]), own()):
            chosen[str(s["name"])] = s
    if last is not None:
        chosen.update((str(s["name"]), s) for s in own()[-last:])
    if not chosen:
        raise ValueError(
            "name the sessions to compare: SESSION ..., a pattern such as alice/mnist/*, "
            "--lineage SESSION or --last N"
        )
    return list(chosen.values())


def descendants(root: str, listed: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sessions of *listed* forked from *root*, directly or through other forks, in
    breadth-first order."""
    children: dict[str, list[dict[str, Any]]] = {}
    for s in listed:
        parent = s.get("parent")
        if parent:
            children.setdefault(str(parent), []).append(s)
    out: list[dict[str, Any]] = []
    todo = [root]
    seen = {root}
    while todo:
        name = todo.pop(0)
        for c in children.get(name, []):
            if str(c["name"]) not in seen:
                seen.add(str(c["name"]))
                out.append(c)
                todo.append(str(c["name"]))
    return out


def fetch_runs(
    client: Client,
    statuses: Sequence[dict[str, Any]],
    *,
    metrics: Sequence[str] | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
) -> list[Run]:
    """The runs of *statuses*, their series downsampled by the server to *max_points*
    (one request for all of them, or a few when their names fill a URL). A session removed
    since it was listed is drawn without points."""
    found, _missing = sessions.metrics_many(
        client,
        [str(st["name"]) for st in statuses],
        names=metrics,
        max_points=max_points,
        workers=FETCH_WORKERS,
    )
    empty: dict[str, Any] = {"series": {}}
    return [run_from_api(st, found.get(str(st["name"]), empty)) for st in statuses]


def compare_panel(
    *refs: str,
    metric: Sequence[str] | None = None,
    lineage: Sequence[str] = (),
    last: int | None = None,
    smooth: float = 0.0,
    log: bool = False,
    x: XAxis = "step",
    colour_by: str | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    client: Client | None = None,
) -> tuple[Panel, list[dict[str, Any]]]:
    """Choose, fetch and build: the :class:`Panel` and the sessions' descriptions."""
    client = client or Client()
    statuses = select_sessions(client, refs, lineage=lineage, last=last)
    runs = fetch_runs(client, statuses, metrics=metric, max_points=max_points)
    panel = build_panel(runs, metrics=metric, weight=smooth, log=log, x=x, colour_by=colour_by)
    return panel, statuses


def compare(
    *refs: str,
    metric: Sequence[str] | None = None,
    lineage: Sequence[str] = (),
    last: int | None = None,
    smooth: float = 0.0,
    log: bool = False,
    x: XAxis = "step",
    colour_by: str | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    client: Client | None = None,
) -> Any:
    """The comparison panel of the sessions named (see the module) as a Bokeh layout:
    ``bokeh.io.show(nsml_magics.compare("alice/mnist/*", metric=["loss"]))``, or
    ``bokeh.embed.file_html`` it. One plot per metric (*metric*: these, else all), one line
    per session; *smooth*: TensorBoard's smoothing weight (0 to < 1); *log*: log y axes;
    *x*: ``step`` or ``time`` (seconds since each session's first report); *colour_by*: an
    argument that differs, to colour the lines by its value."""
    panel, _ = compare_panel(
        *refs,
        metric=metric,
        lineage=lineage,
        last=last,
        smooth=smooth,
        log=log,
        x=x,
        colour_by=colour_by,
        max_points=max_points,
        client=client,
    )
    return panel.layout


def standalone_html(panel: Panel, title: str = "NSML sessions") -> str:
    """The panel as one HTML file, BokehJS inline (opens offline, no server needed)."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    return str(file_html(panel.layout, INLINE, title=title))


def write_html(panel: Panel, path: str | Path) -> Path:
    """Write :func:`standalone_html` to *path* (the folder must exist)."""
    p = Path(path)
    p.write_text(standalone_html(panel, "NSML: " + ", ".join(r.name for r in panel.runs)[:200]))
    return p


def summary_text(panel: Panel) -> str:
    """The argument split as text (what ``nsml plot`` prints): the exclusive matrix, then
    the common arguments, then the metrics plotted."""
    from nsml._fmt import text_table

    from .argsplit import show

    split = panel.split
    rows = [
        {"session": s, **{a: show(split.exclusive[a][s]) for a in split.exclusive}}
        for s in split.sessions
    ]
    cols = [("session", "SESSION"), *((a, a) for a in split.exclusive)]
    out = ["exclusive arguments:" if split.exclusive else "no argument differs:"]
    out.append(text_table(rows, cols))
    if split.common:
        out.append(
            "common arguments: " + " ".join(f"{a}={show(v)}" for a, v in split.common.items())
        )
    out.append("metrics: " + (", ".join(panel.metrics) or "none reported yet"))
    return "\n".join(out)


# ---- in a notebook ---------------------------------------------------------------------------

_bokehjs_loaded = False


def display_live(layout: Any) -> tuple[Any, asyncio.AbstractEventLoop | None]:
    """Show *layout* in the cell's output as a ``jupyter_bokeh`` widget, whose models the
    kernel may change later: ``(widget, the kernel's event loop)``. Without
    ``jupyter_bokeh`` (or without a loop) it is shown once: ``(None, None)``."""
    from IPython.display import display

    try:
        from jupyter_bokeh.widgets import BokehModel
    except ImportError:  # pragma: no cover - the notebook image has it
        from bokeh.io import show

        show(layout)
        return None, None
    widget = BokehModel(layout)
    display(widget)
    try:
        return widget, asyncio.get_event_loop()
    except RuntimeError:
        return widget, None


def load_bokehjs() -> None:
    """Load BokehJS into the notebook page, inline (once per kernel)."""
    global _bokehjs_loaded
    if _bokehjs_loaded:
        return
    from bokeh.io import output_notebook
    from bokeh.resources import INLINE

    output_notebook(INLINE, hide_banner=True)
    _bokehjs_loaded = True


class LivePanel:
    """A panel in a notebook that follows its running sessions and refines zoomed ranges.

    ``LivePanel(client, panel, statuses).show()``: displays the panel (a ``jupyter_bokeh``
    widget), then a task on the kernel's event loop polls the running sessions every
    *interval_s* seconds (HTTP in worker threads) and streams their new points into the
    lines; it ends when every session has ended. Without ``jupyter_bokeh`` the panel is
    shown once (no live updates, no zoom refinement).
    """

    def __init__(
        self,
        client: Client,
        panel: Panel,
        statuses: Sequence[dict[str, Any]],
        *,
        interval_s: float = 3.0,
        max_points: int = DEFAULT_MAX_POINTS,
    ) -> None:
        self.client = client
        self.panel = panel
        self.states = {str(s["name"]): str(s.get("state")) for s in statuses}
        self.interval_s = interval_s
        self.max_points = max_points
        self.widget: Any = None
        self.task: asyncio.Task[None] | None = None
        self.zoom_task: asyncio.Task[None] | None = None

    def running(self) -> list[int]:
        return [
            k for k, r in enumerate(self.panel.runs) if self.states.get(r.name) not in FINAL_STATES
        ]

    def show(self) -> LivePanel:
        load_bokehjs()
        self.widget, loop = display_live(self.panel.layout)
        if loop is None:
            return self
        if self.running():
            self.task = loop.create_task(self.follow())
        if self.panel.x == "step":
            self.panel.x_range.on_change("start", self._zoomed)
            self.panel.x_range.on_change("end", self._zoomed)
        return self

    async def follow(self) -> None:
        """Poll the running sessions until all have ended (or the task is cancelled)."""
        loop = asyncio.get_running_loop()
        delay = self.interval_s
        while self.running():
            await asyncio.sleep(delay)
            try:
                fresh = await loop.run_in_executor(None, self.poll)
            except Exception as e:  # retried with back-off: the panel must not die silently
                log.warning("compare: refresh failed: %s", e)
                delay = min(delay * 2, 60.0)
                continue
            delay = self.interval_s
            self.apply(fresh)

    def poll(self) -> list[tuple[int, str, dict[str, Any]]]:
        """The new points of the running sessions (blocking: runs in a worker thread)."""
        out: list[tuple[int, str, dict[str, Any]]] = []
        for k in self.running():
            run = self.panel.runs[k]
            st = sessions.status(self.client, run.name)
            last = max((s.steps[-1] for s in run.series.values() if s.steps), default=None)
            answer = sessions.metrics(
                self.client,
                run.name,
                names=self.panel.metrics or None,
                since_step=None if last is None else last + 1,
                max_points=self.max_points,
            )
            out.append((k, str(st.get("state")), answer))
        return out

    def apply(self, fresh: Sequence[tuple[int, str, dict[str, Any]]]) -> None:
        """Stream new points into the lines (on the kernel's loop: Bokeh models are not
        thread-safe). The points fetched so far are kept with the runs: jupyter_bokeh 4.1
        sends a patch it applied in the browser back to the kernel, so a streamed batch is
        appended twice to the kernel's copy of a data source (the browser's is right), and
        nothing here reads that copy."""
        p = self.panel
        for k, state, answer in fresh:
            run = p.runs[k]
            self.states[run.name] = state
            new = run_from_api({"name": run.name, "state": state}, answer)
            for m, s in new.series.items():
                if m not in p.metrics or not s.steps:
                    continue
                have = run.series.setdefault(m, Series([], [], [], 0))
                have.steps += s.steps
                have.values += s.values
                have.walls += s.walls
                have.total += s.total
                src = p.sources[(k, m)]
                if p.weight or p.x == "time":  # smoothing and relative time need the whole line
                    src.data = columns(line_data(have, p.x, p.weight, p.log), p.x)
                else:
                    src.stream(columns(line_data(s, p.x, 0.0, p.log), p.x))

    def _zoomed(self, attr: str, old: Any, new: Any) -> None:
        """The x range changed in the browser: fetch the visible range's exact points once
        the zoom settles (0.4 s)."""
        if self.zoom_task is not None:
            self.zoom_task.cancel()
        try:
            loop = asyncio.get_event_loop()
        except RuntimeError:
            return
        self.zoom_task = loop.create_task(self._refine())

    async def _refine(self) -> None:
        await asyncio.sleep(0.4)
        lo, hi = self.panel.x_range.start, self.panel.x_range.end
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            return
        if self.covers_all(lo, hi):
            return  # the plot fitting its data (first drawing, new points, reset): no zoom
        loop = asyncio.get_running_loop()
        try:
            exact = await loop.run_in_executor(None, self.fetch_range, lo, hi)
        except Exception as e:
            log.warning("compare: zoom refinement failed: %s", e)
            return
        self.merge_range(lo, hi, exact)

    def covers_all(self, lo: float, hi: float) -> bool:
        """Whether [lo, hi] holds every step of every line (then the overview is what a
        plot of that width shows)."""
        steps = [s.steps for r in self.panel.runs for s in r.series.values() if s.steps]
        if not steps:
            return True
        return lo <= min(min(s) for s in steps) and hi >= max(max(s) for s in steps)

    def fetch_range(self, lo: float, hi: float) -> dict[tuple[int, str], Series]:
        """Exact points in steps [lo, hi] of every series that was downsampled (blocking): up
        to the overview's budget, at least :data:`DEFAULT_MAX_POINTS` (a zoomed plot is as
        wide as the whole one)."""
        out: dict[tuple[int, str], Series] = {}
        thinned = {
            k: {m for m, s in run.series.items() if s.total > len(s.steps)}
            for k, run in enumerate(self.panel.runs)
        }
        thinned = {k: ms for k, ms in thinned.items() if ms}
        if not thinned:
            return out
        found, _missing = sessions.metrics_many(
            self.client,
            [self.panel.runs[k].name for k in thinned],
            names=sorted(set().union(*thinned.values())),
            since_step=max(math.floor(lo), -(2**62)),
            to_step=min(math.ceil(hi), 2**62),
            max_points=max(self.max_points, DEFAULT_MAX_POINTS),
        )
        for k, ms in thinned.items():
            run = self.panel.runs[k]
            answer = found.get(run.name)
            if answer is None:
                continue
            for m, s in run_from_api({"name": run.name}, answer).series.items():
                if m in ms:
                    out[(k, m)] = s
        return out

    def merge_range(self, lo: float, hi: float, exact: dict[tuple[int, str], Series]) -> None:
        """Each refined line: the overview outside [lo, hi], the exact points inside. The
        overview is the points fetched so far (kept in the panel's runs), not the data source
        (which the browser also writes to)."""
        p = self.panel
        for key, s in exact.items():
            k, m = key
            if key not in p.sources or m not in p.runs[k].series:
                continue
            base = line_data(p.runs[k].series[m], p.x, p.weight, p.log)
            inside = line_data(s, p.x, p.weight, p.log)
            bx = [float(v) for v in base["x"]]
            by = [float(v) for v in base["y"]]
            left = [i for i, xv in enumerate(bx) if xv < lo]
            right = [i for i, xv in enumerate(bx) if xv > hi]
            merged = {
                "x": [bx[i] for i in left] + inside["x"] + [bx[i] for i in right],
                "y": [by[i] for i in left] + inside["y"] + [by[i] for i in right],
            }
            merged["step"] = merged["x"]  # zoom refinement is by step only
            p.sources[key].data = columns(merged, p.x)

    def stop(self) -> None:
        for t in (self.task, self.zoom_task):
            if t is not None:
                t.cancel()

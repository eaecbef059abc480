"""``%nsml gpumonitor SESSION``: a session's GPU use over time, as the server keeps it
(:mod:`nsml_server.gpu_use`): utilisation and memory of each of its GPUs, one sample per node
heartbeat, older samples merged. Virtual GPUs report none, and the panel says so. In a
notebook the panel follows a running session (:class:`LiveGpuMonitor`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nsml import sessions
from nsml.sessions import FINAL_STATES

from .panel import palette

if TYPE_CHECKING:
    from nsml.client import Client

log = logging.getLogger("nsml_magics")


def gpu_columns(answer: Mapping[str, Any]) -> list[dict[str, list[float]]]:
    """Per GPU: ``t`` (milliseconds since the epoch, Bokeh's datetime unit), ``util``
    (percent) and ``mem`` (MiB) of the samples that have them."""
    ts = [float(t) * 1000.0 for t in answer.get("t") or []]
    out = []
    for g in answer.get("gpus") or []:
        cols: dict[str, list[float]] = {"t": [], "util": [], "mem": []}
        for t, u, m in zip(ts, g["utilization_pct"], g["memory_used_mib"], strict=True):
            if u is None:
                continue
            cols["t"].append(t)
            cols["util"].append(float(u))
            cols["mem"].append(float(m or 0))
        out.append(cols)
    return out


def summary(answer: Mapping[str, Any]) -> str:
    """One line per GPU: now, mean (time-weighted) and peak utilisation, peak memory; or
    the server's note when there are no samples."""
    if not answer.get("t"):
        return f"{answer['session']}: no GPU samples ({answer.get('note') or 'none yet'})"
    weights = [float(w) for w in answer.get("seconds") or []]
    lines = [f"{answer['session']} ({answer['state']}, node {answer.get('node') or '-'}):"]
    for g in answer["gpus"]:
        pairs = [
            (float(u), w)
            for u, w in zip(g["utilization_pct"], weights, strict=True)
            if u is not None
        ]
        if not pairs:
            lines.append(f"  GPU {g['gpu']}: no samples")
            continue
        total = sum(w for _, w in pairs) or 1.0
        mean = sum(u * w for u, w in pairs) / total
        peak_mem = max(float(m) for m in g["memory_used_mib"] if m is not None)
        lines.append(
            f"  GPU {g['gpu']}: now {pairs[-1][0]:.0f}%, mean {mean:.0f}%, "
            f"peak {max(u for u, _ in pairs):.0f}%, memory peak {peak_mem:.0f} MiB"
        )
    return "\n".join(lines)


class GpuPanel:
    """Two plots sharing the time axis, utilisation (%) and memory (MiB), one line per GPU
    (``layout``: a column whose first child is the utilisation plot); a note in their place
    while the session has no samples. :meth:`update` redraws it from a later answer."""

    def __init__(self, answer: Mapping[str, Any], width: int = 900) -> None:
        from bokeh.layouts import column

        self.width = width
        self.layout = column(sizing_mode="stretch_width", name="nsml-gpumonitor")
        self.sources: list[Any] = []
        self.gpus: list[str] = []
        self.update(answer)

    def update(self, answer: Mapping[str, Any]) -> None:
        """Show *answer*'s samples. The server merges older samples as they age, so each
        line's data is replaced, not appended to (a line holds at most what the server
        keeps)."""
        cols = gpu_columns(answer)
        gpus = [str(g["gpu"]) for g in answer.get("gpus") or []]
        if not any(c["t"] for c in cols):
            if not self.sources:  # a later answer without samples leaves the curve drawn
                self.layout.children = [self._note(answer)]
            return
        if gpus != self.gpus:
            self.layout.children = list(self._plots(answer, cols))
            self.gpus = gpus
            return
        for src, c in zip(self.sources, cols, strict=True):
            src.data = c

    @staticmethod
    def _note(answer: Mapping[str, Any]) -> Any:
        from bokeh.models.widgets import Div

        return Div(
            text=f"<b>{answer['session']}: GPU use</b>: "
            f"<i>{answer.get('note') or 'no samples yet'}</i>",
            name="nsml-gpumonitor-note",
        )

    def _plots(self, answer: Mapping[str, Any], cols: list[dict[str, list[float]]]) -> Any:
        from bokeh.models import ColumnDataSource, HoverTool, Range1d
        from bokeh.plotting import figure

        util = figure(
            title=f"{answer['session']}: GPU use (utilisation, idle at or below "
            f"{answer['idle_threshold_pct']:g}%)",
            x_axis_type="datetime",
            height=240,
            width=self.width,
            sizing_mode="stretch_width",
            y_range=Range1d(start=0, end=105),
            y_axis_label="%",
            tools="pan,box_zoom,wheel_zoom,reset,save",
            name="nsml-gpumonitor-util",
        )
        mem = figure(
            title="memory in use",
            x_axis_type="datetime",
            x_range=util.x_range,
            height=200,
            width=self.width,
            sizing_mode="stretch_width",
            y_axis_label="MiB",
            tools="pan,box_zoom,wheel_zoom,reset,save",
            name="nsml-gpumonitor-mem",
        )
        self.sources = []
        for g, c, colour in zip(answer["gpus"], cols, palette(len(cols)), strict=True):
            src = ColumnDataSource(data=c)
            self.sources.append(src)
            label = f"GPU {g['gpu']}"
            util.step("t", "util", source=src, mode="after", color=colour, legend_label=label)
            mem.step("t", "mem", source=src, mode="after", color=colour, legend_label=label)
        for p, field, unit in ((util, "@util{0}", "%"), (mem, "@mem{0,0}", " MiB")):
            p.add_tools(
                HoverTool(
                    tooltips=[("time", "@t{%F %T}"), ("use", field + unit)],
                    formatters={"@t": "datetime"},
                )
            )
            p.legend.location = "top_left"
            p.legend.click_policy = "hide"
        return util, mem


def build_gpu_panel(answer: Mapping[str, Any], width: int = 900) -> Any:
    """The panel of *answer* as a Bokeh layout (see :class:`GpuPanel`)."""
    return GpuPanel(answer, width).layout


class LiveGpuMonitor:
    """``%nsml gpumonitor`` in a notebook: the panel as a widget that follows a running
    session. A task on the kernel's event loop asks the server for the session's GPU use every
    *interval_s* seconds (the request runs in a worker thread, so the kernel never blocks) and
    redraws the lines; it ends once the session has ended. Without ``jupyter_bokeh`` the panel
    is shown once."""

    def __init__(
        self, client: Client, answer: Mapping[str, Any], *, interval_s: float = 10.0
    ) -> None:
        self.client = client
        self.session = str(answer["session"])
        self.state = str(answer.get("state"))
        self.panel = GpuPanel(answer)
        self.interval_s = interval_s
        self.widget: Any = None
        self.task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.state not in FINAL_STATES

    def show(self) -> LiveGpuMonitor:
        from .comparison import display_live

        self.widget, loop = display_live(self.panel.layout)
        if loop is not None and self.running:
            self.task = loop.create_task(self.follow())
        return self

    async def follow(self) -> None:
        """Redraw until the session has ended (or the task is cancelled); a failed request is
        retried with back-off, up to a minute apart."""
        loop = asyncio.get_running_loop()
        delay = self.interval_s
        while self.running:
            await asyncio.sleep(delay)
            try:
                answer = await loop.run_in_executor(
                    None, sessions.gpu_use, self.client, self.session
                )
            except Exception as e:
                log.warning("gpumonitor: refresh of %s failed: %s", self.session, e)
                delay = min(delay * 2, 60.0)
                continue
            delay = self.interval_s
            self.apply(answer)

    def apply(self, answer: Mapping[str, Any]) -> None:
        """Redraw from *answer* (on the kernel's loop: Bokeh models are not thread-safe)."""
        self.state = str(answer.get("state"))
        self.panel.update(answer)

"""``%nsml gpumonitor SESSION``: a session's GPU use over time, as the server keeps it
(:mod:`nsml_server.gpu_use`): utilisation and memory of each of its GPUs, one sample per node
heartbeat, older samples merged. Virtual GPUs report none, and the panel says so."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .panel import palette


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


def build_gpu_panel(answer: Mapping[str, Any], width: int = 900) -> Any:
    """Two plots sharing the time axis: utilisation (%) and memory (MiB), one line per GPU;
    a note instead when the session has no samples."""
    from bokeh.layouts import column
    from bokeh.models import ColumnDataSource, HoverTool, Range1d
    from bokeh.models.widgets import Div
    from bokeh.plotting import figure

    cols = gpu_columns(answer)
    title = f"{answer['session']}: GPU use"
    if not any(c["t"] for c in cols):
        return Div(
            text=f"<b>{title}</b>: <i>{answer.get('note') or 'no samples yet'}</i>",
            name="nsml-gpumonitor-note",
        )
    colours = palette(len(cols))
    util = figure(
        title=f"{title} (utilisation, idle at or below {answer['idle_threshold_pct']:g}%)",
        x_axis_type="datetime",
        height=240,
        width=width,
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
        width=width,
        sizing_mode="stretch_width",
        y_axis_label="MiB",
        tools="pan,box_zoom,wheel_zoom,reset,save",
        name="nsml-gpumonitor-mem",
    )
    for g, c, colour in zip(answer["gpus"], cols, colours, strict=True):
        src = ColumnDataSource(data=c)
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
    return column(util, mem, sizing_mode="stretch_width", name="nsml-gpumonitor")

"""Bokeh charts of the admin panel, built from already-collected series.

BokehJS is embedded INLINE in the page (:func:`bokeh_resources`): the platform runs offline,
so nothing may load from a CDN. Bokeh is imported when a chart is drawn, not at import time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

PALETTE = {
    "session": "#1f77b4",
    "notebook": "#ff7f0e",
    "evaluation": "#2ca02c",
    "total": "#444444",
    "capacity": "#d62728",
    "use": "#9467bd",
}


def bokeh_resources() -> str:
    """The ``<script>``/``<link>`` tags of BokehJS itself, inline (no network)."""
    from bokeh.resources import INLINE

    return str(INLINE.render())


def allocation_chart(
    series: Mapping[str, tuple[Sequence[datetime], Sequence[float]]],
    capacity: float,
    start: datetime,
    end: datetime,
) -> tuple[str, str]:
    """A step chart of GPUs held over time, one line per kind plus the total, and the
    capacity of the nodes that take work. Returns Bokeh's ``(script, div)``."""
    from bokeh.embed import components
    from bokeh.models import HoverTool, Range1d
    from bokeh.models.annotations import Span
    from bokeh.plotting import figure

    top = max(capacity, *(max(v, default=0) for _, v in series.values())) + 1

    fig = figure(
        title="GPUs allocated",
        x_axis_type="datetime",
        x_range=Range1d(start=start, end=end),
        y_range=Range1d(start=0, end=top),
        height=320,
        sizing_mode="stretch_width",
        y_axis_label="GPUs",
        tools="pan,xwheel_zoom,box_zoom,reset,save",
        name="gpu-allocation",
    )
    for kind, (times, values) in series.items():
        if not times:
            continue
        fig.step(
            list(times),
            list(values),
            mode="after",
            line_width=3 if kind == "total" else 2,
            color=PALETTE.get(kind, "#17becf"),
            legend_label=kind,
        )
    fig.add_layout(
        Span(
            location=capacity,
            dimension="width",
            line_color=PALETTE["capacity"],
            line_dash="dashed",
            line_width=2,
        )
    )
    fig.add_tools(
        HoverTool(tooltips=[("time", "@x{%F %T}"), ("GPUs", "@y")], formatters={"@x": "datetime"})
    )
    fig.legend.location = "top_left"
    fig.legend.click_policy = "hide"
    script, div = components(fig)
    return str(script), str(div)


def use_chart(
    times: Sequence[float],
    means: Sequence[float | None],
    bucket_s: float,
    start: datetime,
    end: datetime,
) -> tuple[str, str]:
    """Bars of the mean utilisation (%) of the GPUs that reported, per time bucket, over the
    window ``[start, end]`` (the same as the allocation chart's)."""
    from bokeh.embed import components
    from bokeh.models import ColumnDataSource, HoverTool, Range1d
    from bokeh.plotting import figure

    xs = [datetime.fromtimestamp(t + bucket_s / 2, UTC).replace(tzinfo=None) for t in times]
    data: dict[str, Any] = {
        "x": xs,
        "use": [m if m is not None else 0.0 for m in means],
        "reported": ["yes" if m is not None else "no GPU reported" for m in means],
    }
    fig = figure(
        title="GPU utilisation (mean of the GPUs that reported)",
        x_axis_type="datetime",
        height=280,
        sizing_mode="stretch_width",
        y_axis_label="%",
        x_range=Range1d(start=start, end=end),
        y_range=Range1d(start=0, end=100),
        tools="pan,xwheel_zoom,box_zoom,reset,save",
        name="gpu-use",
    )
    fig.vbar(
        x="x",
        top="use",
        width=bucket_s * 1000 * 0.9,
        source=ColumnDataSource(data),
        color=PALETTE["use"],
    )
    fig.add_tools(
        HoverTool(
            tooltips=[("time", "@x{%F %T}"), ("use %", "@use"), ("", "@reported")],
            formatters={"@x": "datetime"},
        )
    )
    script, div = components(fig)
    return str(script), str(div)


def usage_chart(
    days: Sequence[str], credits: Sequence[float], gpu_hours: Sequence[float]
) -> tuple[str, str]:
    """Bars of credits charged per day, with the GPU-hours held per day as a line."""
    from bokeh.embed import components
    from bokeh.models import ColumnDataSource, FactorRange, HoverTool, LinearAxis, Range1d
    from bokeh.plotting import figure

    source = ColumnDataSource(
        {"day": list(days), "credits": list(credits), "gpu_h": list(gpu_hours)}
    )
    fig = figure(
        title="Usage by day",
        x_range=FactorRange(factors=list(days)),
        y_range=Range1d(start=0, end=max([*credits, 1.0]) * 1.1),
        height=260,
        sizing_mode="stretch_width",
        y_axis_label="credits charged",
        tools="save",
        name="usage-by-day",
    )
    fig.vbar(
        x="day",
        top="credits",
        width=0.8,
        source=source,
        color=PALETTE["session"],
        legend_label="credits",
    )
    top = max([*gpu_hours, 1.0]) * 1.1
    fig.extra_y_ranges = {"gpu": Range1d(start=0, end=top)}
    fig.add_layout(LinearAxis(y_range_name="gpu", axis_label="GPU-hours"), "right")
    fig.line(
        x="day",
        y="gpu_h",
        source=source,
        y_range_name="gpu",
        color=PALETTE["notebook"],
        line_width=2,
        legend_label="GPU-hours",
    )
    fig.xaxis.major_label_orientation = 0.8
    fig.add_tools(
        HoverTool(tooltips=[("day", "@day"), ("credits", "@credits"), ("GPU-h", "@gpu_h")])
    )
    fig.legend.location = "top_left"
    script, div = components(fig)
    return str(script), str(div)

"""The comparison panel: curves of many sessions side by side, and what differed between them.

:func:`build_panel` turns already-fetched runs (plain values: :class:`Run`) into one Bokeh
layout, with no I/O:

- one plot per metric, one line per session, one colour per session in every plot; the
  plots share their x range (zoom one, all follow);
- hovering a line, or a session's row in the argument tables, highlights that session in
  every plot (wider line, the others faded) in the browser (BokehJS, no kernel round trip);
  a legend click hides a session in every plot;
- the **common arguments** (same value in every session) as a table, the **exclusive
  arguments** as a matrix of sessions by arguments (missing values marked ``—``), and a
  "colour by" choice that colours the lines by the value of one argument;
- non-finite values (NaN, ±inf) drawn as red crosses at the line's last finite value, so a
  divergence is seen, not hidden as a gap.

The fetching, the live updates and the notebook display are in :mod:`nsml_magics.comparison`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .argsplit import Split, show, split_args, value_groups

XAxis = Literal["step", "time"]

#: The line width of a session, and of the highlighted one; the alpha of the others then.
LINE_WIDTH = 1.8
HIGHLIGHT_WIDTH = 4.5
FADED_ALPHA = 0.15
#: Legend entries per column.
LEGEND_ROWS = 12

_PALETTE_10 = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


@dataclass
class Series:
    """One metric of one session: steps, values (floats, NaN and infinities included) and
    wall times (seconds since the epoch); ``total``: points before downsampling."""

    steps: list[int]
    values: list[float]
    walls: list[float]
    total: int = 0


@dataclass
class Run:
    """A session as the panel needs it."""

    name: str
    state: str = "completed"
    args: list[str] = field(default_factory=list)
    series: dict[str, Series] = field(default_factory=dict)


def palette(n: int) -> list[str]:
    """*n* distinct colours: Category10, then Category20, then evenly through Turbo."""
    if n <= len(_PALETTE_10):
        return list(_PALETTE_10[:n])
    from bokeh.palettes import Category20, Turbo256

    if n <= 20:
        return list(Category20[20][:n])
    return [Turbo256[round(i * 255 / max(n - 1, 1))] for i in range(n)]


def colours_by(split: Split, arg: str | None) -> list[str]:
    """The line colour of each session (in ``split.sessions`` order): one per session, or,
    by *arg*, one per distinct value of it (sessions missing it are grey)."""
    if arg is None:
        return palette(len(split.sessions))
    groups = value_groups(split, arg)
    values = [v for v in groups if v != "—"]
    colours = dict(zip(values, palette(len(values)), strict=True))
    colours["—"] = "#b0b0b0"
    by_session = {s: colours[v] for v, ss in groups.items() for s in ss}
    return [by_session[s] for s in split.sessions]


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with *weight* (0 to < 1),
    debiased at the start. Non-finite values stay as they are and do not enter the average."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be at least 0 and below 1, got {weight}")
    out: list[float] = []
    last = 0.0
    n = 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        out.append(last / (1 - weight**n) if weight else last)
    return out


def metric_names(runs: Sequence[Run], wanted: Sequence[str] | None = None) -> list[str]:
    """The metrics to plot: *wanted* (in its order), else every metric any run reported, in
    the order first seen."""
    if wanted:
        return list(wanted)
    seen: dict[str, None] = {}
    for r in runs:
        seen.update(dict.fromkeys(r.series))
    return list(seen)


def xs_of(s: Series, x: XAxis) -> list[float]:
    """The x values of a series: its steps, or seconds since the session's first report."""
    if x == "step":
        return [float(v) for v in s.steps]
    t0 = min(s.walls) if s.walls else 0.0
    return [w - t0 for w in s.walls]


def line_data(
    s: Series, x: XAxis, weight: float = 0.0, log: bool = False
) -> dict[str, list[float]]:
    """The columns of one line: ``x``, ``y`` (smoothed when *weight*; not positive values
    are NaN on a log axis) and ``step``."""
    ys = smooth(s.values, weight) if weight else list(s.values)
    if log:
        ys = [v if v > 0 else math.nan for v in ys]
    return {"x": xs_of(s, x), "y": ys, "step": [float(v) for v in s.steps]}


def columns(data: Mapping[str, Sequence[float]] | None, x: XAxis = "step") -> dict[str, Any]:
    """A line's columns as compact arrays, which Bokeh sends as binary buffers rather than
    JSON text: values as float32 (a plot shows 4 digits), steps as int32 when they fit
    (else float64), seconds as float32. By step the x column is the step: no ``step``
    column is sent."""
    import numpy as np

    def steps(v: Sequence[float]) -> Any:
        a = np.asarray(v, dtype=np.float64)
        if len(a) and (np.abs(a).max() >= 2**31):
            return a
        return a.astype(np.int32)

    if data is None:
        data = {"x": [], "y": [], "step": []}
    out = {
        "x": steps(data["x"]) if x == "step" else np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.float32),
    }
    if x != "step":
        out["step"] = steps(data["step"])
    return out


def nonfinite_marks(s: Series, x: XAxis) -> dict[str, list[Any]]:
    """Where a series has NaN or ±inf: x, the last finite value before it (0 if none) as y,
    and the value's text."""
    xs = xs_of(s, x)
    out: dict[str, list[Any]] = {"x": [], "y": [], "step": [], "value": []}
    last = 0.0
    for xv, step, v in zip(xs, s.steps, s.values, strict=True):
        if math.isfinite(v):
            last = v
            continue
        out["x"].append(xv)
        out["y"].append(last)
        out["step"].append(step)
        out["value"].append("nan" if math.isnan(v) else "inf" if v > 0 else "-inf")
    return out


@dataclass
class Panel:
    """The built panel: its layout and the models a live update or a zoom changes."""

    layout: Any
    runs: list[Run]
    metrics: list[str]
    split: Split
    #: (session index, metric) -> the line's ColumnDataSource
    sources: dict[tuple[int, str], Any]
    #: metric -> the ColumnDataSource of its non-finite marks
    marks: dict[str, Any]
    #: (session index, metric) -> the line renderer
    lines: dict[tuple[int, str], Any]
    x_range: Any
    highlight: Any
    x: XAxis = "step"
    weight: float = 0.0
    log: bool = False


_HIGHLIGHT_JS = f"""
const k = cb_obj.data.k[0];
for (const r of lines) {{
  const on = k < 0 || r.tags[0] === k;
  r.glyph.line_width = (k >= 0 && r.tags[0] === k) ? {HIGHLIGHT_WIDTH} : {LINE_WIDTH};
  r.glyph.line_alpha = on ? 1.0 : {FADED_ALPHA};
}}
"""

_HOVER_JS = """
const r = cb_data.renderer;
const idx = cb_data.index;
const hit = idx != null && ((idx.line_indices && idx.line_indices.length > 0) ||
                            (idx.indices && idx.indices.length > 0));
if (hit && hl.data.k[0] !== r.tags[0]) { hl.data = {k: [r.tags[0]]}; }
"""

_COLOUR_JS = """
const cs = colours[cb_obj.value];
for (const r of lines) { r.glyph.line_color = cs[r.tags[0]]; }
"""


def _row_events(hl_id: str, k: int) -> str:
    """Inline handlers of a session's table row: set the panel's highlight (the model with
    id *hl_id*, found among the page's Bokeh documents) to session *k*, or back to none."""

    def set_to(v: int) -> str:
        return (
            "for(const d of (window.Bokeh?Bokeh.documents:[])){"
            f"const m=d.get_model_by_id('{hl_id}');if(m){{m.data={{k:[{v}]}};}}}}"
        )

    return f' onmouseenter="{set_to(k)}" onmouseleave="{set_to(-1)}"'


_TABLE_CSS = (
    "<style>.nsml-args{border-collapse:collapse;font:12px monospace;margin:4px 0}"
    ".nsml-args th,.nsml-args td{border:1px solid #ddd;padding:2px 6px;text-align:left}"
    ".nsml-args tr.nsml-run:hover{background:#fff3c4}"
    ".nsml-args td.nsml-missing{color:#999}"
    ".nsml-args caption{text-align:left;font-weight:bold;padding:2px 0}</style>"
)


def common_table(split: Split) -> str:
    """The common arguments as an HTML table (argument, value)."""
    if not split.common:
        return "<p class='nsml-common'><i>no argument common to all sessions</i></p>"
    rows = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{html.escape(show(v))}</td></tr>"
        for a, v in split.common.items()
    )
    return (
        "<table class='nsml-args nsml-common'><caption>common arguments</caption>"
        f"<tr><th>argument</th><th>value</th></tr>{rows}</table>"
    )


def exclusive_matrix(split: Split, colours: Sequence[str], hl_id: str) -> str:
    """The exclusive arguments as an HTML matrix: one row per session (its colour, its name,
    one cell per differing argument, ``—`` where missing); hovering a row highlights the
    session in every plot."""
    args = list(split.exclusive)
    head = "".join(f"<th>{html.escape(a)}</th>" for a in args)
    rows = []
    for k, s in enumerate(split.sessions):
        cells = []
        for a in args:
            v = split.exclusive[a][s]
            cls = " class='nsml-missing'" if show(v) == "—" else ""
            cells.append(f"<td{cls}>{html.escape(show(v))}</td>")
        swatch = f"<span style='color:{colours[k]}'>&#9632;</span> "
        rows.append(
            f"<tr class='nsml-run' data-session='{html.escape(s)}'{_row_events(hl_id, k)}>"
            f"<td>{swatch}{html.escape(s)}</td>{''.join(cells)}</tr>"
        )
    caption = "exclusive arguments" if args else "sessions (no argument differs)"
    return (
        f"<table class='nsml-args nsml-exclusive'><caption>{caption}</caption>"
        f"<tr><th>session</th>{head}</tr>{''.join(rows)}</table>"
    )


def build_panel(
    runs: Sequence[Run],
    *,
    metrics: Sequence[str] | None = None,
    weight: float = 0.0,
    log: bool = False,
    x: XAxis = "step",
    colour_by: str | None = None,
    width: int = 900,
    plot_height: int = 260,
) -> Panel:
    """The comparison panel of *runs* (see the module): plots, argument tables, colour-by.

    Raises:
        ValueError: no runs; *colour_by* is not an argument that differs; a bad weight.
    """
    from bokeh.layouts import column
    from bokeh.models import (
        CDSView,
        ColumnDataSource,
        CustomJS,
        HoverTool,
        Selection,
        UnionRenderers,
    )
    from bokeh.models.annotations import Legend, LegendItem
    from bokeh.models.glyphs import Line
    from bokeh.models.renderers import GlyphRenderer
    from bokeh.models.widgets import Div, Select
    from bokeh.plotting import figure

    if not runs:
        raise ValueError("no sessions to compare")
    split = split_args({r.name: r.args for r in runs})
    if colour_by is not None and colour_by not in split.exclusive:
        # "lr" names --lr (a command line cannot easily pass "--lr" as an option's value)
        colour_by = next(
            (a for a in (f"--{colour_by}", f"-{colour_by}") if a in split.exclusive), colour_by
        )
    if colour_by is not None and colour_by not in split.exclusive:
        choices = ", ".join(split.exclusive) or "none differ"
        raise ValueError(
            f"cannot colour by {colour_by!r}: choose an argument that differs ({choices})"
        )
    names = metric_names(runs, metrics)
    colours = colours_by(split, colour_by)
    if weight:
        smooth([], weight)  # validates
    hl = ColumnDataSource(data={"k": [-1]}, name="nsml-highlight")
    sources: dict[tuple[int, str], Any] = {}
    lines: dict[tuple[int, str], Any] = {}
    marks: dict[str, Any] = {}
    plots = []
    shared_x: Any = None
    # Models every line shares (a model costs the kernel time to build and serialise, and
    # the browser time to load): the data view (all rows), the selection and its policy (the
    # panel has no selection tool: hovering uses each source's own inspection).
    view = CDSView()
    policy = UnionRenderers()
    selected = Selection()
    for m in names:
        p = figure(
            title=m,
            height=plot_height,
            width=width,
            sizing_mode="stretch_width",
            y_axis_type="log" if log else "linear",
            tools="pan,box_zoom,wheel_zoom,reset,save",
            x_axis_label="step" if x == "step" else "seconds since the first report",
            output_backend="canvas",
            name=f"nsml-plot-{m}",
            **({"x_range": shared_x} if shared_x is not None else {}),
        )
        if shared_x is None:
            shared_x = p.x_range
        own: list[Any] = []
        for k, r in enumerate(runs):
            s = r.series.get(m)
            src = ColumnDataSource(
                data=columns(line_data(s, x, weight, log) if s else None, x),
                selection_policy=policy,
                selected=selected,
            )
            # A renderer made directly (not p.line): BokehJS derives the selection, hover
            # and muted glyphs itself, so a session costs one glyph model, not three.
            line = GlyphRenderer(
                data_source=src,
                glyph=Line(x="x", y="y", line_color=colours[k], line_width=LINE_WIDTH),
                view=view,
                name=r.name,
            )
            p.renderers.append(line)
            line.tags = [k]
            sources[(k, m)] = src
            lines[(k, m)] = line
            own.append(line)
        nf: dict[str, list[Any]] = {"x": [], "y": [], "step": [], "value": [], "session": []}
        for r in runs:
            s = r.series.get(m)
            if s is None:
                continue
            mk = nonfinite_marks(s, x)
            for key in ("x", "y", "step", "value"):
                nf[key].extend(mk[key])
            nf["session"].extend([r.name] * len(mk["x"]))
        marks[m] = ColumnDataSource(data=nf)
        p.scatter("x", "y", source=marks[m], marker="x", size=10, color="#d62728", line_width=2)
        p.add_tools(
            HoverTool(
                renderers=own,
                tooltips=[
                    ("session", "$name"),
                    ("step", "@x{0,0}" if x == "step" else "@step{0,0}"),
                    (m, "@y{0.[0000]}"),
                ],
                line_policy="nearest",
                callback=CustomJS(args={"hl": hl}, code=_HOVER_JS),
            )
        )
        p.js_on_event("mouseleave", CustomJS(args={"hl": hl}, code="hl.data = {k: [-1]};"))
        plots.append(p)
    all_lines = list(lines.values())
    hl.js_on_change("data", CustomJS(args={"lines": all_lines}, code=_HIGHLIGHT_JS))
    # A legend beside every plot (so the plots line up); a click hides the session in
    # every plot: each of its lines passes its visibility to the others.
    ncols = max(1, math.ceil(len(runs) / LEGEND_ROWS))
    for m, p in zip(names, plots, strict=True):
        legend = Legend(
            items=[LegendItem(label=r.name, renderers=[lines[(k, m)]]) for k, r in enumerate(runs)],
            click_policy="hide",
            location="top_left",
            ncols=ncols,
            label_text_font_size="8pt" if len(runs) > LEGEND_ROWS else "10pt",
        )
        p.add_layout(legend, "right")
    for k in range(len(runs)):
        mine = [lines[(k, m)] for m in names]
        if len(mine) > 1:
            sync = CustomJS(
                args={"lines": mine},
                code="for (const r of lines) { if (r.visible !== cb_obj.visible) "
                "{ r.visible = cb_obj.visible; } }",
            )
            for line in mine:
                line.js_on_change("visible", sync)
    hl_id = str(hl.id)
    colour_options: list[str | None] = ["session", *split.exclusive]
    colour_map = {"session": palette(len(runs))}
    colour_map.update({a: colours_by(split, a) for a in split.exclusive})
    select = Select(
        title="colour lines by",
        value=colour_by or "session",
        options=colour_options,
        name="nsml-colour-by",
        width=240,
    )
    select.js_on_change(
        "value", CustomJS(args={"lines": all_lines, "colours": colour_map}, code=_COLOUR_JS)
    )
    tables = Div(
        text=_TABLE_CSS + exclusive_matrix(split, colours, hl_id) + common_table(split),
        name="nsml-args",
        sizing_mode="stretch_width",
    )
    children: list[Any] = [tables, select]
    if not names:
        children.append(Div(text="<i>no metrics reported yet</i>", name="nsml-no-metrics"))
    children.extend(plots)
    layout = column(*children, sizing_mode="stretch_width", name="nsml-compare")
    return Panel(
        layout=layout,
        runs=list(runs),
        metrics=names,
        split=split,
        sources=sources,
        marks=marks,
        lines=lines,
        x_range=shared_x,
        highlight=hl,
        x=x,
        weight=weight,
        log=log,
    )


def run_from_api(status: Mapping[str, Any], metrics: Mapping[str, Any]) -> Run:
    """A :class:`Run` from a session's description and its ``GET .../metrics`` answer
    (``"nan"``, ``"inf"``, ``"-inf"`` read back as floats)."""
    series: dict[str, Series] = {}
    for name, s in (metrics.get("series") or {}).items():
        series[name] = Series(
            steps=[int(v) for v in s["steps"]],
            values=[float(v) for v in s["values"]],
            walls=[float(v) for v in s["walls"]],
            total=int(s.get("total") or len(s["steps"])),
        )
    return Run(
        name=str(status["name"]),
        state=str(status.get("state", "completed")),
        args=[str(a) for a in status.get("args") or []],
        series=series,
    )

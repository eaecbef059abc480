"""The comparison panel built from plain runs: one plot per metric, one line per session in
one colour across plots, the argument tables, smoothing, log axes, non-finite marks, and a
standalone HTML file that needs no network."""

from __future__ import annotations

import math

import pytest

from nsml_magics.argsplit import split_args
from nsml_magics.panel import (
    FADED_ALPHA,
    Run,
    Series,
    build_panel,
    colours_by,
    common_table,
    exclusive_matrix,
    line_data,
    metric_names,
    nonfinite_marks,
    palette,
    run_from_api,
    smooth,
)

NAN, INF = math.nan, math.inf


def run(name: str, args: list[str], **series: list[float]) -> Run:
    return Run(
        name=name,
        args=args,
        series={
            m: Series(list(range(len(v))), v, [100.0 + i for i in range(len(v))], len(v))
            for m, v in series.items()
        },
    )


RUNS = [
    run("u/m/1", ["--lr", "0.1", "--bs", "32"], loss=[3.0, 2.0, 1.0], acc=[0.1, 0.5, 0.9]),
    run("u/m/2", ["--lr", "0.01", "--bs", "32", "--amp"], loss=[3.0, NAN, 2.0], acc=[0.2]),
    run("u/m/3", ["--lr=0.1", "--bs", "32"], loss=[4.0, 3.0]),
]


def test_one_plot_per_metric_one_line_per_session_one_colour_per_session() -> None:
    panel = build_panel(RUNS)
    assert panel.metrics == ["loss", "acc"]
    assert set(panel.lines) == {(k, m) for k in range(3) for m in ("loss", "acc")}
    for k in range(3):
        colours = {panel.lines[(k, m)].glyph.line_color for m in panel.metrics}
        assert len(colours) == 1, "one colour per session across plots"
        assert {panel.lines[(k, m)].name for m in panel.metrics} == {RUNS[k].name}
        assert {panel.lines[(k, m)].tags[0] for m in panel.metrics} == {k}
    assert len({panel.lines[(k, "loss")].glyph.line_color for k in range(3)}) == 3
    assert len(panel.sources[(2, "acc")].data["x"]) == 0, "a metric a session lacks: empty line"
    assert list(panel.sources[(0, "loss")].data["y"]) == [3.0, 2.0, 1.0]


def test_the_tables_hold_exactly_the_differing_and_the_common_arguments() -> None:
    panel = build_panel(RUNS)
    assert list(panel.split.exclusive) == ["--lr", "--amp"]
    assert panel.split.common == {"--bs": 32}
    div = next(c for c in panel.layout.children if getattr(c, "name", "") == "nsml-args")
    assert "exclusive arguments" in div.text and "common arguments" in div.text
    assert div.text.count("class='nsml-run'") == 3


def test_exclusive_matrix_rows_highlight_their_session_and_mark_missing_values() -> None:
    split = split_args({r.name: r.args for r in RUNS})
    text = exclusive_matrix(split, palette(3), "p42")
    assert text.count("<tr class='nsml-run'") == 3
    assert "get_model_by_id('p42')" in text and "m.data={k:[1]}" in text
    assert "m.data={k:[-1]}" in text, "leaving a row clears the highlight"
    assert text.count("nsml-missing") == 2, "--amp is missing from two sessions"


def test_argument_values_are_escaped_in_the_tables() -> None:
    split = split_args({"a": ["--x", "<b>1</b>"], "b": ["--y", "'"]})
    text = exclusive_matrix(split, palette(2), "p1") + common_table(split)
    assert "<b>1</b>" not in text and "&lt;b&gt;1&lt;/b&gt;" in text
    assert "&#x27;" in text


@pytest.mark.parametrize(
    ("arg", "expected_groups"),
    [
        pytest.param(None, 3, id="by session: three colours"),
        pytest.param("--lr", 2, id="by --lr: 0.1 twice, 0.01 once"),
        pytest.param("--amp", 2, id="by --amp: set once, missing (grey) twice"),
    ],
)
def test_colour_by_an_argument(arg: str | None, expected_groups: int) -> None:
    split = split_args({r.name: r.args for r in RUNS})
    colours = colours_by(split, arg)
    assert len(colours) == 3 and len(set(colours)) == expected_groups
    if arg == "--lr":
        assert colours[0] == colours[2] != colours[1]
    if arg == "--amp":
        assert colours[0] == colours[2] == "#b0b0b0"
    panel = build_panel(RUNS, colour_by=arg)
    assert [panel.lines[(k, "loss")].glyph.line_color for k in range(3)] == colours


def test_colour_by_names_an_option_without_its_dashes() -> None:
    panel = build_panel(RUNS, colour_by="lr")
    assert panel.lines[(0, "loss")].glyph.line_color == panel.lines[(2, "loss")].glyph.line_color


def test_colour_by_an_argument_that_does_not_differ_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"--bs.*choose an argument that differs \(--lr, --amp\)"):
        build_panel(RUNS, colour_by="--bs")


@pytest.mark.parametrize(
    ("values", "weight", "expected"),
    [
        ([1.0, 2.0, 3.0], 0.0, [1.0, 2.0, 3.0]),
        ([2.0, 2.0, 2.0], 0.9, [2.0, 2.0, 2.0]),
        ([0.0, 10.0], 0.5, [0.0, 20 / 3]),
        ([1.0, NAN, 1.0], 0.5, [1.0, NAN, 1.0]),
    ],
)
def test_smoothing_is_tensorboards_debiased_ema(
    values: list[float], weight: float, expected: list[float]
) -> None:
    got = smooth(values, weight)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert (math.isnan(g) and math.isnan(e)) or g == pytest.approx(e)


@pytest.mark.parametrize("weight", [-0.1, 1.0, 2.0])
def test_a_smoothing_weight_out_of_range_is_refused(weight: float) -> None:
    with pytest.raises(ValueError, match="at least 0 and below 1"):
        smooth([1.0], weight)


def test_log_axes_show_non_positive_values_as_gaps_and_time_is_relative() -> None:
    s = Series([0, 1, 2], [1.0, 0.0, -1.0], [50.0, 51.5, 53.0], 3)
    data = line_data(s, "time", log=True)
    assert data["x"] == [0.0, 1.5, 3.0]
    assert data["y"][0] == 1.0 and math.isnan(data["y"][1]) and math.isnan(data["y"][2])


def test_non_finite_values_are_marked_at_the_last_finite_value() -> None:
    s = Series([0, 1, 2, 3], [NAN, 2.0, INF, -INF], [0.0] * 4, 4)
    assert nonfinite_marks(s, "step") == {
        "x": [0.0, 2.0, 3.0],
        "y": [0.0, 2.0, 2.0],
        "step": [0, 2, 3],
        "value": ["nan", "inf", "-inf"],
    }
    panel = build_panel(RUNS)
    assert panel.marks["loss"].data["session"] == ["u/m/2"]


def test_metrics_named_come_first_in_their_order() -> None:
    assert metric_names(RUNS, ["acc"]) == ["acc"]
    assert metric_names(RUNS) == ["loss", "acc"]
    assert build_panel(RUNS, metrics=["acc", "loss"]).metrics == ["acc", "loss"]


def test_a_run_from_the_api_reads_nan_and_inf_back() -> None:
    r = run_from_api(
        {"name": "u/m/1", "state": "running", "args": ["--lr", "1"]},
        {"series": {"l": {"steps": [0, 1], "values": ["nan", "-inf"], "walls": [1, 2]}}},
    )
    assert r.state == "running" and r.args == ["--lr", "1"]
    assert math.isnan(r.series["l"].values[0]) and r.series["l"].values[1] == -INF
    assert r.series["l"].total == 2


def test_many_sessions_get_distinct_colours() -> None:
    for n in (1, 10, 11, 20, 21, 100):
        assert len(set(palette(n))) == n


def test_highlight_code_fades_the_others() -> None:
    panel = build_panel(RUNS)
    (cb,) = panel.highlight.js_property_callbacks["change:data"]
    assert str(FADED_ALPHA) in cb.code
    assert len(cb.args["lines"]) == 6


def test_the_standalone_html_carries_bokehjs_inline_and_no_cdn() -> None:
    from nsml_magics.comparison import standalone_html

    text = standalone_html(build_panel(RUNS))
    assert "cdn.bokeh.org" not in text
    assert '<script type="text/javascript" src=' not in text
    assert "Bokeh" in text and len(text) > 500_000, "BokehJS itself is in the file"


def test_no_runs_is_refused() -> None:
    with pytest.raises(ValueError, match="no sessions"):
        build_panel([])


def test_lineage_is_the_session_and_its_forks_breadth_first() -> None:
    from nsml_magics.comparison import descendants

    listed = [
        {"name": "u/m/1", "parent": None},
        {"name": "u/m/2", "parent": "u/m/1"},
        {"name": "u/m/3", "parent": "u/m/2"},
        {"name": "u/m/4", "parent": "u/m/1"},
        {"name": "u/m/5", "parent": "u/x/9"},
    ]
    assert [s["name"] for s in descendants("u/m/1", listed)] == ["u/m/2", "u/m/4", "u/m/3"]
    assert descendants("u/m/3", listed) == []


def test_a_live_panel_streams_new_points_and_stops_following_ended_sessions() -> None:
    from nsml_magics.comparison import LivePanel

    runs = [
        run("u/m/1", ["--lr", "1"], loss=[3.0, 2.0]),
        run("u/m/2", ["--lr", "2"], loss=[5.0]),
    ]
    runs[0].state = "running"
    panel = build_panel(runs)
    live = LivePanel(
        None,  # type: ignore[arg-type]  # apply() makes no HTTP call
        panel,
        [{"name": "u/m/1", "state": "running"}, {"name": "u/m/2", "state": "completed"}],
    )
    assert live.running() == [0]
    answer = {"series": {"loss": {"steps": [2, 3], "values": [1.5, "nan"], "walls": [9, 10]}}}
    live.apply([(0, "running", answer)])
    src = panel.sources[(0, "loss")]
    assert list(src.data["x"]) == [0, 1, 2, 3]
    assert list(src.data["y"][:3]) == [3.0, 2.0, 1.5] and math.isnan(src.data["y"][3])
    assert runs[0].series["loss"].steps == [0, 1, 2, 3]
    live.apply([(0, "completed", {"series": {}})])
    assert live.running() == []


def test_a_zoomed_range_is_spliced_into_the_overview() -> None:
    from nsml_magics.comparison import LivePanel

    runs = [run("u/m/1", [], loss=[float(v) for v in range(0, 100, 10)])]
    runs[0].series["loss"].steps = list(range(0, 100, 10))
    panel = build_panel(runs)
    live = LivePanel(None, panel, [{"name": "u/m/1", "state": "completed"}])  # type: ignore[arg-type]
    exact = Series(list(range(40, 51)), [float(v) for v in range(40, 51)], [0.0] * 11, 11)
    live.merge_range(35, 55, {(0, "loss"): exact})
    xs = list(panel.sources[(0, "loss")].data["x"])
    assert xs == [0, 10, 20, 30, *range(40, 51), 60, 70, 80, 90]


def test_a_range_that_holds_every_point_is_no_zoom() -> None:
    from nsml_magics.comparison import LivePanel

    runs = [run("u/m/1", [], loss=[1.0] * 10)]
    live = LivePanel(None, build_panel(runs), [{"name": "u/m/1", "state": "completed"}])  # type: ignore[arg-type]
    assert live.covers_all(-0.5, 9.5)
    assert not live.covers_all(2, 9.5)

"""``%nsml plot`` in a real JupyterLab, as a researcher uses it: three sessions run with
different arguments, one notebook cell, and the comparison panel in the cell's output.

Real Chromium, the real hub, the user's notebook container, real training sessions (the
project's train.py reporting a loss). The panel must render inside the output, its exclusive
matrix must hold exactly the arguments that differ (a missing one marked), the common table the
rest, and hovering a session's row must highlight that session's line in every plot: read back
from BokehJS's own models in the page, not from Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import HubUser
from tests.browser.test_homes import small_server
from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_gpu_monitor import CURVE, MODEL, programmed_node  # noqa: F401  (fixture)
from tests.integration.test_gpu_monitor import TRAIN_PY as GPU_TRAIN_PY
from tests.integration.test_sessions import TRAIN_PY, cli_for, status, wait_state

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.docker]

USER = "browser-cmp"
# Three runs: --lr and --epochs differ, --sleep is given to one only, --steps is common.
RUNS = [
    ["--lr", "0.1", "--epochs", "2", "--steps", "5"],
    ["--lr", "0.01", "--epochs", "2", "--steps", "5"],
    ["--lr=0.01", "--epochs", "3", "--steps", "5", "--sleep", "0"],
]
EXCLUSIVE = [
    ["--lr", "--epochs", "--sleep"],
    ["0.1", "2", "—"],
    ["0.01", "2", "—"],
    ["0.01", "3", "0"],
]

# The state of every session line in the page: (session index, line width, alpha), read from
# the Bokeh document that holds the comparison panel.
LINES_JS = """() => {
  if (!window.Bokeh) return null;
  for (const d of Bokeh.documents) {
    const models = [...d.all_models];
    if (!models.some(m => m.name === 'nsml-highlight')) continue;
    return models
      .filter(m => m.type === 'GlyphRenderer' && m.glyph.type === 'Line')
      .map(m => [m.tags[0], m.name, m.glyph.line_width.value ?? m.glyph.line_width,
                 m.glyph.line_alpha.value ?? m.glyph.line_alpha]);
  }
  return null;
}"""


def lines_where(condition: str) -> str:
    """A page function: true once the panel's lines (``lines``, as :data:`LINES_JS` reads
    them) meet *condition*."""
    return f"() => {{ const lines = ({LINES_JS})(); return lines !== null && ({condition}); }}"


def run_sessions(hub: HubProcess, tmp_path: Path) -> list[str]:
    """Start the three sessions through the CLI as the user and wait until they ended."""
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY)
    nsml = cli_for(hub, hub.user_token(USER), folder)
    names = [nsml("run", "train.py", "--", *args).stdout.strip() for args in RUNS]
    for name in names:
        assert wait_state(nsml, name, timeout=180)["state"] == "completed", name
    return names


def run_cell(page: Any, code: str) -> None:
    """Once the kernel is idle, type *code* into the notebook's last cell and run it
    (Shift+Enter)."""
    from playwright.sync_api import expect

    status = page.get_by_role("button", name=re.compile(r"Python 3 \(ipykernel\) \| Idle"))
    expect(status).to_be_visible()
    editor = page.locator(".jp-Notebook .jp-Cell").last.locator(".cm-content")
    editor.click()
    page.keyboard.type(code)
    expect(editor).to_have_text(code)
    page.keyboard.press("Shift+Enter")


def open_notebook(hub: HubProcess, hub_user: Callable[[str], HubUser], user: str) -> HubUser:
    """Log *user* in, start a small server and open a new notebook."""
    from playwright.sync_api import expect

    me = hub_user(user)
    me.log_in()
    me.start_server(small_server(hub))
    me.page.locator(".jp-LauncherCard[data-category='Notebook']").first.click()
    expect(me.page.get_by_role("tab", name=re.compile(r"Untitled.*\.ipynb"))).to_be_visible()
    return me


def warm_kernel(page: Any) -> None:
    """Wait until the notebook's kernel answered a first cell."""
    from playwright.sync_api import expect

    run_cell(page, "warm = 1 + 1; warm")
    expect(page.locator(".jp-OutputArea-output").last).to_have_text("2")


def test_a_notebook_cell_compares_three_sessions_and_hover_highlights_one_in_every_plot(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    names = run_sessions(hub, tmp_path)
    me = open_notebook(hub, hub_user, USER)
    page = me.page
    expect(page.locator(".jp-Notebook .jp-Cell .cm-content").first).to_be_visible()
    me.shot("notebook-open")

    run_cell(page, f"%nsml plot {USER}/_/* --metric loss --metric epoch")
    output = page.locator(".jp-OutputArea-output")
    matrix = output.locator("table.nsml-exclusive")
    expect(matrix).to_be_visible()
    expect(output.locator("canvas").first).to_be_visible()
    me.shot("panel")

    # The exclusive matrix: exactly the differing arguments, one row per session, missing
    # marked; the common table: the rest.
    rows = [
        [c.strip() for c in r.split("\t")]
        for r in matrix.locator("tr").all_inner_texts()
        if r.strip() and "exclusive arguments" not in r
    ]
    assert rows[0] == ["session", *EXCLUSIVE[0]], rows
    for name, row, want in zip(names, rows[1:], EXCLUSIVE[1:], strict=True):
        assert row[0].endswith(name) and row[1:] == want, (name, row)
    common = output.locator("table.nsml-common")
    assert [r.split("\t") for r in common.locator("tr").all_inner_texts()] == [
        ["argument", "value"],
        ["--steps", "5"],
    ], common.inner_text()

    # Before hovering: every line plain. Hover the second session's row: its line is wide
    # and opaque in both plots, the others faded; leaving the row restores them.
    page.wait_for_function(lines_where("lines.length > 0"))
    before = page.evaluate(LINES_JS)
    assert len(before) == 2 * len(names), before
    assert {(w, a) for _, _, w, a in before} == {(1.8, 1)}, before
    matrix.locator("tr.nsml-run").nth(1).hover()
    page.wait_for_function(lines_where("lines.some(([k, , w]) => k === 1 && w > 4)"))
    during = page.evaluate(LINES_JS)
    me.shot("row-hovered")
    for k, name, width, alpha in during:
        if k == 1:
            assert name == names[1] and (width, alpha) == (4.5, 1), during
        else:
            assert (width, alpha) == (1.8, 0.15), during
    assert sum(1 for k, *_ in during if k == 1) == 2, "one highlighted line in each plot"
    page.locator(".jp-Notebook .jp-Cell").first.locator(".cm-content").hover()
    page.wait_for_function(lines_where("lines.every(([, , , a]) => a === 1)"))
    me.shot("row-left")


# The x values of the line of session NAME in plot METRIC, and the plot's x range, read from
# the Bokeh document that holds that line.
LINE_X_JS = """([name, metric]) => {
  if (!window.Bokeh) return null;
  for (const d of Bokeh.documents) {
    const models = [...d.all_models];
    const line = models.find(m => m.type === 'GlyphRenderer' && m.name === name);
    if (!line) continue;
    const plot = models.find(m => m.name === 'nsml-plot-' + metric);
    return {x: Array.from(line.data_source.data.x), range: [plot.x_range.start, plot.x_range.end]};
  }
  return null;
}"""


def test_a_running_session_grows_live_and_a_zoom_fetches_the_exact_points(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    """The panel follows a running session without blocking the kernel (its line grows), and
    zooming into a range (by step) replaces the downsampled points there by the exact ones."""
    from playwright.sync_api import expect

    user = USER + "-live"
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY)
    nsml = cli_for(hub, hub.user_token(user), folder)
    me = open_notebook(hub, hub_user, user)
    page = me.page
    warm_kernel(page)  # the kernel is up before the session starts
    # 3 epochs x 20 steps, 0.5 s a step: about 30 s of reports, steps 0 to 59
    name = nsml(
        "run", "train.py", "--", "--epochs", "3", "--steps", "20", "--sleep", "0.5"
    ).stdout.strip()
    wait_for(
        lambda: (st := status(nsml, name))["state"] == "running" and (st["last_step"] or 0) >= 2,
        timeout=120,
        interval=0.3,
        what=f"{name} running with a few reports",
    )
    run_cell(page, f"%nsml plot {name} --metric loss --max-points 3")
    expect(page.locator(".jp-OutputArea-output table.nsml-exclusive")).to_be_visible()
    first = page.wait_for_function(f"(a) => ({LINE_X_JS})(a)", arg=[name, "loss"]).json_value()
    assert 0 < len(first["x"]) <= 3, first
    me.shot("live-first")
    # The kernel is free meanwhile: another cell runs.
    run_cell(page, "answer = 6 * 7; answer")
    expect(page.locator(".jp-OutputArea-output").last).to_have_text("42")
    # The line grows while the session runs (new points streamed in, each batch downsampled).
    page.wait_for_function(
        f"(a) => {{ const r = ({LINE_X_JS})(a); return r && r.x.length > {len(first['x'])}; }}",
        arg=[name, "loss"],
    )
    assert wait_state(nsml, name, timeout=180)["state"] == "completed"
    page.wait_for_function(
        f"(a) => {{ const r = ({LINE_X_JS})(a); return r && Math.max(...r.x) === 59; }}",
        arg=[name, "loss"],
    )
    me.shot("live-ended")
    before = page.evaluate(LINE_X_JS, [name, "loss"])
    assert before["x"] == sorted(set(before["x"])), ("streamed once each, in order", before)
    inside = [x for x in before["x"] if 20 <= x <= 40]
    assert len(inside) < 21, ("the series is downsampled before the zoom", before)
    # Zoom to steps 20-40 (as the zoom tool sets the range): the kernel fetches that range's
    # exact points and splices them in.
    page.evaluate(
        """([name]) => { for (const d of Bokeh.documents) {
             const plot = [...d.all_models].find(m => m.name === 'nsml-plot-loss');
             const line = [...d.all_models].find(m => m.name === name);
             if (plot && line) { plot.x_range.start = 20; plot.x_range.end = 40; } } }""",
        [name],
    )
    page.wait_for_function(
        f"""(a) => {{ const r = ({LINE_X_JS})(a);
             return r && r.x.filter(x => x >= 20 && x <= 40).length === 21; }}""",
        arg=[name, "loss"],
    )
    after = page.evaluate(LINE_X_JS, [name, "loss"])
    assert [x for x in after["x"] if 20 <= x <= 40] == list(range(20, 41)), after
    assert after["x"] == sorted(set(after["x"])), ("overview outside, exact inside", after)
    me.shot("zoomed")


def test_the_same_panel_as_a_standalone_html_file_opens_offline(
    hub: HubProcess, browser: Any, tmp_path: Path
) -> None:
    """``nsml plot --html``: the file opens with no network (BokehJS inline), and hovering a
    row highlights the session there too."""
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY)
    nsml = cli_for(hub, hub.user_token(USER + "-html"), folder)
    names = [nsml("run", "train.py", "--", *args).stdout.strip() for args in RUNS[:2]]
    for name in names:
        wait_state(nsml, name, timeout=180)
    out = nsml("plot", *names, "--html", str(tmp_path / "panel.html"))
    assert "exclusive arguments:" in out.stdout and "--lr" in out.stdout, out.stdout
    context = browser.new_context(offline=True)
    try:
        page = context.new_page()
        page.goto((tmp_path / "panel.html").as_uri())
        page.locator("table.nsml-exclusive tr.nsml-run").nth(0).hover()
        page.wait_for_function(lines_where("lines.some(([k, , w]) => k === 0 && w > 4)"))
        # Hovering a line in a plot highlights its session in every plot: sweep down the
        # first plot at a fixed x until the pointer is over a line.
        box = page.locator("canvas").first.bounding_box()
        assert box is not None
        hit: list[Any] = []
        for i in range(2, 98):
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * i / 100)
            lines = page.evaluate(LINES_JS)
            hit = [(k, w) for k, _, w, _ in lines if w > 4]
            if hit:
                break
        assert hit, "no line found under the pointer"
        k = hit[0][0]
        assert hit == [(k, 4.5)] * 2, "the hovered session, wide in both plots"
    finally:
        context.close()
    assert "cdn.bokeh.org" not in (tmp_path / "panel.html").read_text()


# The utilisation line of ``%nsml gpumonitor``'s panel in the page: its samples, in percent.
GPU_UTIL_JS = """() => {
  if (!window.Bokeh) return null;
  for (const d of Bokeh.documents) {
    const plot = [...d.all_models].find(m => m.name === 'nsml-gpumonitor-util');
    if (plot) return Array.from(plot.renderers[0].data_source.data.util);
  }
  return null;
}"""


def test_gpumonitor_follows_a_running_sessions_gpu_use_in_the_notebook(
    hub: HubProcess,
    hub_user: Callable[[str], HubUser],
    programmed_node: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``%nsml gpumonitor`` on a session running on a node whose GPU plays a programmed curve:
    the panel in the cell's output draws the curve's values and keeps adding samples while
    the session runs, the kernel free meanwhile."""
    from playwright.sync_api import expect

    user = USER + "-gpu"
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "train.py").write_text(GPU_TRAIN_PY)
    nsml = cli_for(hub, hub.user_token(user), folder)
    me = open_notebook(hub, hub_user, user)
    page = me.page
    warm_kernel(page)
    name = nsml(
        "run", "--gpus", "1", "--gpu-model", MODEL, "--cpu", "0.25", "--memory", "256M", "train.py"
    ).stdout.strip()
    try:
        assert wait_state(nsml, name, ("running",))["node"] == programmed_node
        run_cell(page, f"%nsml gpumonitor {name}")
        first = page.wait_for_function(f"() => ({GPU_UTIL_JS})() ?? (window.Bokeh && [])")
        shown = len(first.json_value())
        run_cell(page, "answer = 6 * 7; answer")  # the kernel is free while the panel follows
        expect(page.locator(".jp-OutputArea-output").last).to_have_text("42")
        grown = page.wait_for_function(
            f"(n) => {{ const u = ({GPU_UTIL_JS})(); return u && u.length > n + 1 && u; }}",
            arg=shown,
            timeout=60_000,
        ).json_value()
        assert all(int(u) in CURVE for u in grown), grown
        places = [CURVE.index(int(u)) for u in grown]
        assert places == sorted(set(places)), ("the curve's values, in its order", grown)
        me.shot("gpumonitor-live")
    finally:
        nsml("exec", name, "--", "touch", "/tmp/go", check=False)
        nsml("stop", name, check=False)
        wait_state(nsml, name)

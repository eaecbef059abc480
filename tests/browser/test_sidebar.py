"""The NSML sidebar in a real JupyterLab, as a researcher clicks it.

Real Chromium, the real hub, the user's notebook container with the prebuilt extension and its
server extension (the forwarder of ``nsml/api/*`` and the shared event stream), real sessions in
Docker. Every state the page shows comes through the notebook server from the service: the
tests start sessions with the CLI (as a terminal would) and watch the sidebar follow them
without a reload; they click Stop, Fork, Compare and the file browser's "Push to NSML" and
check the result against the service.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.browser.conftest import HubUser
from tests.browser.test_homes import small_server
from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_leaderboards import TRAIN_PY as BOARD_TRAIN_PY
from tests.integration.test_sessions import FAIL_PY, TRAIN_PY, Cli, cli_for, status, wait_state
from tests.integration.test_team_sessions import join, team  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.docker]

#: A session that runs until the test creates /tmp/go in its container (through the API's
#: exec), not for a fixed time a slow machine may spend before the page shows it running.
GO_PY = """
import os, time
import nsml
print("waiting for /tmp/go", flush=True)
deadline = time.time() + 600
while not os.path.exists("/tmp/go") and time.time() < deadline:
    time.sleep(0.2)
nsml.report(step=1, loss=0.25)
print("done", flush=True)
"""

#: A script the palette runs: says hello with its arguments.
HELLO_PY = """
import sys
print("hello from", " ".join(sys.argv[1:]), flush=True)
"""

#: The sidebar's settings (JupyterLab's settings registry, schema/plugin.json).
PLUGIN = "jupyter-nsml-lab:plugin"

#: Set in the page before a wait; still set after it: the page was not reloaded meanwhile.
MARK_JS = "() => { window.__nsmlNoReload = 1; }"
MARKED_JS = "() => window.__nsmlNoReload === 1"


class Sidebar:
    """The NSML panel of one person's JupyterLab."""

    def __init__(self, me: HubUser) -> None:
        self.me = me
        self.page = me.page
        self.panel = self.page.locator("#jp-nsml-sidebar")

    def open(self, tab: str = "Sessions") -> None:
        """Click the NSML icon in the left bar, then the tab."""
        from playwright.sync_api import expect

        # A click on the shown panel's icon hides it, and after a reload JupyterLab may show
        # the panel it restores just after a look found it hidden: click until it is shown.
        icon = self.page.locator('.jp-SideBar [data-id="jp-nsml-sidebar"]')
        for _ in range(3):
            if self.panel.is_visible():
                break
            icon.click()
            try:
                expect(self.panel).to_be_visible(timeout=5_000)
            except AssertionError:
                continue
        expect(self.panel).to_be_visible()
        self.panel.get_by_role("tab", name=tab).click()
        expect(self.panel.get_by_role("tab", name=tab)).to_have_attribute("aria-selected", "true")

    def row(self, name: str) -> Any:
        """The list item of a session or dataset (named by it)."""
        return self.panel.get_by_role("listitem", name=name, exact=True)

    def expect_state(self, name: str, state: str, timeout: float | None = None) -> None:
        from playwright.sync_api import expect

        expect(self.row(name).locator(".jp-NSML-state")).to_have_text(state, timeout=timeout)


def open_lab(hub: HubProcess, hub_user: Callable[[str], HubUser], user: str) -> Sidebar:
    me = hub_user(user)
    me.log_in()
    me.start_server(small_server(hub))
    return Sidebar(me)


def project(tmp_path: Path) -> Path:
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY)
    (folder / "fail.py").write_text(FAIL_PY)
    (folder / "go.py").write_text(GO_PY)
    return folder


def run(nsml: Cli, entry: str, *args: str) -> str:
    return str(nsml("run", entry, "--", *args).stdout.strip())


def test_the_sessions_tab_lists_a_running_session_and_shows_it_end_without_a_reload(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    user = "sb-live"
    token = hub.user_token(user)
    nsml = cli_for(hub, token, project(tmp_path))
    side = open_lab(hub, hub_user, user)
    side.open()
    side.page.evaluate(MARK_JS)
    # Started after the page loaded: the sidebar learns of it without a reload (the event
    # stream, or the slow refresh while the stream's upstream is down).
    name = run(nsml, "go.py")
    side.expect_state(name, "running")
    side.me.shot("running")
    assert status(nsml, name)["state"] == "running"
    r = hub.nsml("POST", f"sessions/{name}/exec", token, json={"command": ["touch", "/tmp/go"]})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    side.expect_state(name, "completed")
    assert side.page.evaluate(MARKED_JS), "the page was reloaded"
    assert wait_state(nsml, name)["state"] == "completed"
    # The last metrics of the ended session are on its row.
    expect(side.row(name).locator(".jp-NSML-metrics")).to_contain_text("loss")
    side.me.shot("completed")


def test_stop_from_the_sidebar_stops_the_session(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    user = "sb-stop"
    nsml = cli_for(hub, hub.user_token(user), project(tmp_path))
    name = run(nsml, "train.py", "--epochs", "1", "--steps", "2000", "--sleep", "0.5")
    side = open_lab(hub, hub_user, user)
    side.open()
    side.expect_state(name, "running")
    side.row(name).get_by_role("button", name="Stop", exact=True).click()
    side.expect_state(name, "stopped")
    side.me.shot("stopped")
    assert wait_state(nsml, name)["state"] == "stopped"


def test_a_teammates_team_session_is_listed_and_followed_and_its_team_admin_may_stop_it(
    hub: HubProcess,
    hub_user: Callable[[str], HubUser],
    tmp_path: Path,
    team: str,  # noqa: F811
) -> None:
    """A member of a team sees a teammate's team session in the sessions tab (its owner and
    team on the row), follows it to its end without a reload (the stream carries a team
    session's events to the team's members), may read its log and fork it but not stop it;
    the "whose" chooser shows it under the team's and hides it under mine. Made the team's
    admin, the member stops the next team session from the sidebar."""
    from playwright.sync_api import expect

    tag = secrets.token_hex(3)
    owner, member = f"sb-own-{tag}", f"sb-mem-{tag}"
    for u in (owner, member):
        hub.user_token(u)
    join(hub, team, owner, member)
    nsml = cli_for(hub, hub.user_token(owner), project(tmp_path))  # a token made after joining
    side = open_lab(hub, hub_user, member)
    side.open()
    side.page.evaluate(MARK_JS)
    name = str(nsml("run", "--team", team, "go.py").stdout.strip())
    side.expect_state(name, "running")
    row = side.row(name)
    expect(row.locator(".jp-NSML-owner")).to_have_text(f"{owner} · team {team}")
    expect(row.locator(".jp-NSML-action")).to_have_text(["Logs", "Fork"])
    whose = side.panel.locator("select[title^='Whose sessions']")
    whose.select_option("mine")
    expect(row).to_have_count(0)
    whose.select_option("team")
    expect(row).to_be_visible()
    side.me.shot("teammate-running")
    r = hub.nsml(
        "POST",
        f"sessions/{name}/exec",
        hub.user_token(owner),
        json={"command": ["touch", "/tmp/go"]},
    )
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    side.expect_state(name, "completed")
    assert side.page.evaluate(MARKED_JS), "the page was reloaded"
    expect(row.locator(".jp-NSML-action")).to_have_text(["Logs", "Fork"])  # no Remove
    side.me.shot("teammate-completed")
    # Made the team's admin, the member may stop the team's sessions from the sidebar.
    r = hub.nsml(
        "PUT", f"teams/{team}/admins/{member}", hub.user_token("admin"), json={"admin": True}
    )
    assert r.status_code == 200, r.text
    side.page.reload()
    side.open()
    second = str(nsml("run", "--team", team, "go.py").stdout.strip())
    side.expect_state(second, "running")
    expect(side.row(second).locator(".jp-NSML-action")).to_have_text(["Stop", "Logs", "Fork"])
    side.row(second).get_by_role("button", name="Stop", exact=True).click()
    side.expect_state(second, "stopped")
    assert wait_state(nsml, second)["state"] == "stopped"
    side.me.shot("team-admin-stopped")


def test_fork_from_the_dialog_starts_a_child_with_the_edited_argument(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    user = "sb-fork"
    nsml = cli_for(hub, hub.user_token(user), project(tmp_path))
    parent = run(nsml, "train.py", "--lr", "0.1", "--epochs", "1", "--steps", "2")
    assert wait_state(nsml, parent)["state"] == "completed"
    side = open_lab(hub, hub_user, user)
    side.open()
    side.expect_state(parent, "completed")
    side.row(parent).get_by_role("button", name="Fork", exact=True).click()
    dialog = side.page.get_by_role("dialog")
    args = dialog.get_by_label("Arguments")
    expect(args).to_have_value("--lr 0.1 --epochs 1 --steps 2")
    # The checkpoint the child loads: the parent's last one, chosen by default.
    expect(dialog.get_by_label("Checkpoint")).to_have_value("0")
    args.fill("--lr 0.5 --epochs 1 --steps 2")
    side.me.shot("fork-dialog")
    dialog.get_by_role("button", name="Fork").click()
    children = wait_for(
        lambda: [s for s in json.loads(nsml("ps", "--json").stdout) if s.get("parent") == parent],
        timeout=60,
        interval=0.5,
        what=f"a child of {parent}",
    )
    child = children[0]
    assert child["args"] == ["--lr", "0.5", "--epochs", "1", "--steps", "2"], child
    assert child["parent_checkpoint"] == "0", child
    expect(side.row(child["name"])).to_be_visible()
    assert wait_state(nsml, child["name"])["state"] == "completed"
    log = nsml("logs", child["name"]).stdout
    assert "lr 0.5" in log and "loaded" in log, log
    side.expect_state(child["name"], "completed")
    side.me.shot("child")


def test_compare_opens_the_panel_of_two_selected_sessions(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    user = "sb-cmp"
    nsml = cli_for(hub, hub.user_token(user), project(tmp_path))
    names = [
        run(nsml, "train.py", "--lr", lr, "--epochs", "1", "--steps", "4") for lr in ("0.1", "0.3")
    ]
    for name in names:
        assert wait_state(nsml, name)["state"] == "completed"
    side = open_lab(hub, hub_user, user)
    side.open()
    compare = side.panel.get_by_role("button", name="Compare")
    expect(compare).to_be_disabled()
    for name in names:
        side.panel.get_by_role("checkbox", name=f"Select {name}").check()
    compare.click()
    console = side.page.locator(".jp-ConsolePanel")
    matrix = console.locator("table.nsml-exclusive")
    expect(matrix).to_be_visible()
    expect(console.locator("canvas").first).to_be_visible()
    rows = [r for r in matrix.locator("tr.nsml-run").all_inner_texts()]
    assert len(rows) == 2 and "0.1" in rows[0] and "0.3" in rows[1], rows
    side.me.shot("compare")


def server_api(me: HubUser, method: str, path: str, body: Any = None) -> Any:
    """Call the notebook server's own API (``/user/NAME/<path>``) with the page's cookies and
    XSRF header, as JupyterLab does; the Playwright response."""
    xsrf = next(c["value"] for c in me.context.cookies() if c["name"] == "_xsrf")
    return me.page.request.fetch(
        f"{me.hub.url}/user/{me.name}/{path}",
        method=method,
        data=None if body is None else json.dumps(body),
        headers={"X-XSRFToken": xsrf, "Content-Type": "application/json"},
    )


def xsrf_put(me: HubUser, path: str, body: dict[str, Any]) -> None:
    """Write through the notebook server's contents API, as JupyterLab does (XSRF header)."""
    r = server_api(me, "PUT", f"api/contents/{path}", body)
    assert r.ok, (r.status, r.text())


def write_file(me: HubUser, path: str, text: str) -> None:
    """A text file in the user's home (folders above it made first)."""
    parts = path.split("/")
    for i in range(1, len(parts)):
        xsrf_put(me, "/".join(parts[:i]), {"type": "directory"})
    xsrf_put(me, path, {"type": "file", "format": "text", "content": text})


def read_file(me: HubUser, path: str) -> str | None:
    """A text file of the user's home through the contents API (None: there is none)."""
    r = server_api(me, "GET", f"api/contents/{path}?content=1&format=text&type=file")
    return str(r.json()["content"]) if r.ok else None


def file_item(me: HubUser, name: str) -> Any:
    """The file browser's entry named *name* (located by its name cell: the item's text
    holds its age too)."""
    listing = me.page.get_by_role("region", name="File Browser Section")
    cell = me.page.locator(".jp-DirListing-itemText", has_text=re.compile(rf"^{re.escape(name)}$"))
    return listing.locator(".jp-DirListing-item").filter(has=cell)


def show_file_browser(me: HubUser) -> Any:
    """Show the file browser (a click on its icon while it is shown would hide it)."""
    from playwright.sync_api import expect

    section = me.page.get_by_role("region", name="File Browser Section")
    if not section.is_visible():
        me.page.locator('.jp-SideBar [data-id="filebrowser"]').click()
    expect(section).to_be_visible()
    return section


def browse_to(me: HubUser, folder: str) -> None:
    """Show the file browser and open *folder* (one below the home) by double-clicking it."""
    from playwright.sync_api import expect

    show_file_browser(me)
    me.page.locator("#filebrowser .jp-BreadCrumbs-home").click()
    file_item(me, folder).dblclick()
    expect(me.page.locator(".jp-BreadCrumbs")).to_contain_text(folder)


def test_the_datasets_tab_lists_a_pushed_dataset_and_a_context_menu_push_adds_a_version(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    user = "sb-data"
    folder = tmp_path / "digits"
    folder.mkdir()
    (folder / "train.csv").write_text("x,y\n1,2\n")
    nsml = cli_for(hub, hub.user_token(user), tmp_path)
    nsml("dataset", "push", "digits", str(folder), "--no-progress")
    side = open_lab(hub, hub_user, user)
    side.open("Datasets")
    row = side.row("digits")
    expect(row.get_by_label("versions")).to_have_text("1 version")
    side.me.shot("one-version")

    # A folder in the user's home, pushed from the file browser's context menu.
    me = side.me
    xsrf_put(me, "digits2", {"type": "directory"})
    xsrf_put(
        me,
        "digits2/train.csv",
        {"type": "file", "format": "text", "content": "x,y\n1,2\n3,4\n"},
    )
    me.page.locator('.jp-SideBar [data-id="filebrowser"]').click()
    browser = me.page.get_by_role("region", name="File Browser Section")
    # (the file browser lists it at its next poll)
    name = me.page.locator(".jp-DirListing-itemText", has_text=re.compile(r"^digits2$"))
    item = browser.locator(".jp-DirListing-item").filter(has=name)
    item.click(button="right")
    me.page.get_by_role("menuitem", name="Push to NSML as a dataset").click()
    dialog = me.page.get_by_role("dialog")
    dialog.get_by_label("Dataset name").fill("digits")
    dialog.get_by_role("button", name="OK").click()
    side.open("Datasets")
    expect(row.get_by_label("versions")).to_have_text("2 versions", timeout=180_000)
    me.shot("two-versions")
    listed = json.loads(nsml("dataset", "ls", "--json").stdout)
    digits = [d for d in listed if d["name"] == "digits"]
    assert digits and digits[0]["versions"] == 2, listed


def test_a_failed_session_raises_a_notification_that_opens_it(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    user = "sb-fail"
    nsml = cli_for(hub, hub.user_token(user), project(tmp_path))
    side = open_lab(hub, hub_user, user)
    side.open()
    # Another tab in front: the notification is how the user learns of it.
    side.page.locator('.jp-SideBar [data-id="filebrowser"]').click()
    name = run(nsml, "fail.py")
    toast = side.page.locator(".jp-toast-message, .Toastify__toast", has_text=f"{name} failed")
    expect(toast.first).to_be_visible()
    side.me.shot("notification")
    assert wait_state(nsml, name)["state"] == "failed"
    side.page.locator(".Toastify__toast", has_text=f"{name} failed").get_by_role(
        "button", name="Open"
    ).click()
    expect(side.panel).to_be_visible()
    expect(side.row(name)).to_have_class(re.compile(r"jp-mod-open"))
    side.me.shot("opened")


def is_listing(url: str) -> bool:
    """Whether *url* is the sidebar's listing of sessions (``nsml/api/sessions?...``), not
    one session's own request (``nsml/api/sessions/USER/DATASET/N``)."""
    return urlsplit(url).path.endswith("/nsml/api/sessions")


def test_a_state_change_comes_through_the_event_stream_not_the_periodic_refresh(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    """With the slow refresh an hour apart, a session started and ended after the page
    loaded shows up and ends within seconds while the page lists no sessions: the event
    stream brought it."""
    from playwright.sync_api import expect

    user = "sb-stream"
    token = hub.user_token(user)
    nsml = cli_for(hub, token, project(tmp_path))
    side = open_lab(hub, hub_user, user)
    # The user's setting, saved as the Settings Editor saves it (the settings registry's
    # store); the page is reloaded so that the sidebar starts with it.
    r = server_api(
        side.me, "PUT", f"lab/api/settings/{PLUGIN}", {"raw": '{"refreshSeconds": 3600}'}
    )
    assert r.ok, (r.status, r.text())
    r = server_api(side.me, "GET", f"lab/api/settings/{PLUGIN}")
    assert r.json()["settings"]["refreshSeconds"] == 3600, r.text()
    listings: list[tuple[float, str]] = []
    nsml_requests: list[tuple[float, str]] = []

    def seen(request: Any) -> None:
        if "/nsml/" in request.url:
            nsml_requests.append((time.monotonic(), request.url))
        if is_listing(request.url):
            listings.append((time.monotonic(), request.url))

    side.page.on("request", seen)
    side.me.open_lab()
    side.open()
    expect(side.panel.get_by_role("status", name="live")).to_be_visible()
    assert listings, "the sidebar lists the sessions when it starts"
    side.page.evaluate(MARK_JS)

    since = time.monotonic()
    name = run(nsml, "go.py")
    side.expect_state(name, "running", timeout=60_000)
    side.me.shot("running")
    r = hub.nsml("POST", f"sessions/{name}/exec", token, json={"command": ["touch", "/tmp/go"]})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    side.expect_state(name, "completed", timeout=30_000)
    shown = datetime.now(UTC)
    side.me.shot("completed")
    assert side.page.evaluate(MARKED_JS), "the page was reloaded"
    finished = datetime.fromisoformat(wait_state(nsml, name)["finished"].replace("Z", "+00:00"))
    lag = (shown - finished).total_seconds()
    print(f"{name}: the sidebar showed its end {lag:.1f} s after the service recorded it")
    assert lag < 10, f"the sidebar showed the end {lag:.1f} s after it happened"
    during = [url for at, url in listings if at >= since]
    assert during == [], f"the sessions were listed meanwhile: {during}"
    asked = [urlsplit(url).path.split("/nsml/", 1)[1] for at, url in nsml_requests if at >= since]
    print(f"the sidebar's requests meanwhile: {asked}")


def test_run_current_file_from_the_command_palette_starts_a_session_shown_in_the_sidebar(
    hub: HubProcess, hub_user: Callable[[str], HubUser]
) -> None:
    from playwright.sync_api import expect

    user = "sb-palette"
    token = hub.user_token(user)
    side = open_lab(hub, hub_user, user)
    me, page = side.me, side.page
    write_file(me, "runme/hello.py", HELLO_PY)
    browse_to(me, "runme")
    file_item(me, "hello.py").click()
    expect(file_item(me, "hello.py")).to_have_class(re.compile(r"jp-mod-selected"))
    page.keyboard.press("Control+Shift+C")
    palette = page.locator("#modal-command-palette")
    palette.locator("input").fill("NSML: Run current")
    me.shot("palette")
    palette.locator(".lm-CommandPalette-item", has_text="NSML: Run current file").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Run hello.py as an NSML session")
    dialog.get_by_role("textbox").fill("--who the palette")
    me.shot("run-dialog")
    dialog.get_by_role("button", name="OK").click()
    api = cli_for(hub, token, Path("."))
    sessions = wait_for(
        lambda: json.loads(api("ps", "--json").stdout),
        timeout=120,
        interval=1,
        what="the session the palette started",
    )
    name = sessions[0]["name"]
    assert sessions[0]["entry"] == "hello.py" and sessions[0]["args"] == ["--who", "the", "palette"]
    # The command shows the new session opened in the sessions tab.
    expect(side.panel).to_be_visible()
    expect(side.panel.get_by_role("tab", name="Sessions")).to_have_attribute(
        "aria-selected", "true"
    )
    expect(side.row(name)).to_have_class(re.compile(r"jp-mod-open"))
    side.expect_state(name, "completed")
    assert "hello from --who the palette" in api("logs", name).stdout
    me.shot("session")


def test_the_log_viewer_follows_new_lines_of_a_running_session(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    user = "sb-logs"
    token = hub.user_token(user)
    nsml = cli_for(hub, token, project(tmp_path))
    name = run(nsml, "go.py")
    side = open_lab(hub, hub_user, user)
    side.open()
    side.expect_state(name, "running")
    side.row(name).get_by_role("button", name="Logs", exact=True).click()
    viewer = side.page.locator(".jp-NSML-log")
    log = viewer.get_by_label(f"Log of {name}")
    expect(log).to_contain_text("waiting for /tmp/go")
    expect(log).not_to_contain_text("done")
    expect(viewer.locator(".jp-NSML-logstatus")).to_have_text(f"{name}: following…")
    side.me.shot("following")
    r = hub.nsml("POST", f"sessions/{name}/exec", token, json={"command": ["touch", "/tmp/go"]})
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    expect(log).to_contain_text(re.compile(r"waiting for /tmp/go\s+done"))
    expect(viewer.locator(".jp-NSML-logstatus")).to_contain_text("ended")
    side.me.shot("ended")
    assert wait_state(nsml, name)["state"] == "completed"


def test_pull_puts_the_dataset_into_the_file_browsers_current_folder(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    user = "sb-pull"
    folder = tmp_path / "pets"
    (folder / "images").mkdir(parents=True)
    (folder / "labels.csv").write_text("id,label\n1,cat\n")
    (folder / "images" / "1.txt").write_text("a cat\n")
    nsml = cli_for(hub, hub.user_token(user), tmp_path)
    nsml("dataset", "push", "pets", str(folder), "--no-progress")
    side = open_lab(hub, hub_user, user)
    me = side.me
    write_file(me, "work/notes.txt", "my notes\n")
    browse_to(me, "work")
    side.open("Datasets")
    side.row("pets").get_by_role("button", name="Pull", exact=True).click()
    toast = side.page.locator(".Toastify__toast", has_text="Pulled pets@1")
    expect(toast.first).to_be_visible(timeout=180_000)
    me.shot("pulled")
    assert read_file(me, "work/pets-v1/labels.csv") == "id,label\n1,cat\n"
    assert read_file(me, "work/pets-v1/images/1.txt") == "a cat\n"
    show_file_browser(me)
    expect(file_item(me, "pets-v1")).to_be_visible()
    me.shot("file-browser")
    # A second pull does not touch the first copy: it goes next to it.
    side.open("Datasets")
    side.row("pets").get_by_role("button", name="Pull", exact=True).click()
    expect(side.page.locator(".Toastify__toast", has_text="pets-v1-2").first).to_be_visible()
    assert read_file(me, "work/pets-v1-2/labels.csv") == "id,label\n1,cat\n"


def test_the_leaderboards_tab_shows_my_best_rank_and_my_submissions(
    hub: HubProcess, hub_user: Callable[[str], HubUser], tmp_path: Path
) -> None:
    """The owner of a public dataset with a hidden test split scores 1.0; I submit twice
    (5 of 6 and 3 of 6 public labels right): my best is rank 2, highlighted, and both my
    submissions are listed as scored. One of them goes from the sidebar's Submit."""
    from playwright.sync_api import expect

    ds = f"sbboard{secrets.token_hex(2)}"
    work = tmp_path / "board"
    (work / "train").mkdir(parents=True)
    (work / "train" / "readme.txt").write_text("training data\n")
    inputs = work / "inputs"
    inputs.mkdir()
    for i in range(6):
        (inputs / f"x{i}").write_text(str(i))
    (work / "labels.csv").write_text("id,label\n" + "".join(f"x{i},{i % 2}\n" for i in range(6)))
    code = work / "project"
    code.mkdir()
    (code / "train.py").write_text(BOARD_TRAIN_PY)
    owner = cli_for(hub, hub.user_token("sb-lbown"), code)
    owner(
        "dataset",
        "push",
        ds,
        str(work / "train"),
        "--test-inputs",
        str(inputs),
        "--test-labels",
        str(work / "labels.csv"),
        "--metric",
        "accuracy",
        "--no-progress",
    )
    owner("dataset", "share", ds, "--public")
    user = "sb-board"
    mine = cli_for(hub, hub.user_token(user), code)

    def trained(nsml: Cli, *args: str) -> str:
        name = str(nsml("run", "-d", ds, "train.py", "--", *args).stdout.strip())
        assert wait_state(nsml, name, timeout=180)["state"] == "completed"
        return name

    best = trained(owner)
    owner("submit", best, "--wait")
    good = trained(mine, "--flip", "x0")
    worse = trained(mine, "--flip", "x0,x1,x2")
    scored = json.loads(mine("submit", worse, "--wait", "--json").stdout)
    assert scored["state"] == "scored" and scored["score"] == 0.5, scored

    side = open_lab(hub, hub_user, user)
    side.open()
    side.row(good).get_by_role("button", name="Submit", exact=True).click()
    expect(
        side.page.locator(".Toastify__toast", has_text=f"Submitted {good}").first
    ).to_be_visible()
    side.open("Leaderboards")
    side.panel.get_by_label("Leaderboard", exact=True).select_option(ds)
    table = side.panel.get_by_role("table", name=f"{ds} leaderboard")
    highlighted = table.locator("tr.jp-NSML-best")
    # The sidebar's submission is scored while the tab is shown (the stream's submission
    # event brings the new board).
    expect(highlighted).to_have_count(1, timeout=180_000)
    expect(highlighted.locator("td").first).to_have_text("2")
    expect(highlighted).to_contain_text(user)
    expect(highlighted.locator("td").last).to_have_text("0.8333", timeout=180_000)
    expect(table.locator("tbody tr").first).to_contain_text("sb-lbown")
    expect(side.panel.locator(".jp-NSML-bestrank")).to_have_text("Your best rank: #2")
    submissions = side.panel.get_by_role("list", name="My submissions").get_by_role("listitem")
    expect(submissions).to_have_count(2)
    for session in (good, worse):
        item = submissions.filter(has_text=session)
        expect(item.locator(".jp-NSML-state")).to_have_text("scored")
    expect(submissions.filter(has_text=good)).to_contain_text("score 0.8333")
    expect(submissions.filter(has_text=worse)).to_contain_text("score 0.5")
    side.me.shot("leaderboard")

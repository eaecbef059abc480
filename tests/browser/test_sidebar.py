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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import HubUser
from tests.browser.test_homes import small_server
from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_sessions import FAIL_PY, TRAIN_PY, Cli, cli_for, status, wait_state

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

        if not self.panel.is_visible():  # a click on the shown panel's icon would hide it
            self.page.locator('.jp-SideBar [data-id="jp-nsml-sidebar"]').click()
        expect(self.panel).to_be_visible()
        self.panel.get_by_role("tab", name=tab).click()
        expect(self.panel.get_by_role("tab", name=tab)).to_have_attribute("aria-selected", "true")

    def row(self, name: str) -> Any:
        """The list item of a session or dataset (named by it)."""
        return self.panel.get_by_role("listitem", name=name, exact=True)

    def expect_state(self, name: str, state: str) -> None:
        from playwright.sync_api import expect

        expect(self.row(name).locator(".jp-NSML-state")).to_have_text(state)


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


def xsrf_put(me: HubUser, path: str, body: dict[str, Any]) -> None:
    """Write through the notebook server's contents API, as JupyterLab does (XSRF header)."""
    xsrf = next(c["value"] for c in me.context.cookies() if c["name"] == "_xsrf")
    r = me.page.request.put(
        f"{me.hub.url}/user/{me.name}/api/contents/{path}",
        data=json.dumps(body),
        headers={"X-XSRFToken": xsrf, "Content-Type": "application/json"},
    )
    assert r.ok, (r.status, r.text())


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

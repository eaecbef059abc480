"""The promise, kept through the browser as a user keeps it: a file written in JupyterLab is
there after the server is stopped and started again.

Real Chromium, the real hub, a real notebook container with the user's home volume. The user
signs in, starts a server from the spawn form (a quarter of one of the local node's virtual
GPUs), writes a text file in JupyterLab's editor and saves it, stops the server from the hub's
home page, starts it again, and opens the file: the text is there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.browser.conftest import HubUser
from tests.integration.hubproc import HubProcess
from tests.integration.test_placements import local_model

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.docker]

TEXT = "Results of run 7: loss 0.031 after 12 epochs. Keep this!"


def small_server(hub: HubProcess) -> Callable[[Any], None]:
    """Fill the spawn form: a share of a virtual GPU of the local node, 0.5 CPU, 512M."""
    model = local_model(hub)

    def choose(page: Any) -> None:
        page.get_by_label("GPUs").select_option("0.25")
        page.get_by_label("GPU model").select_option(model)
        page.get_by_label("CPU cores").fill("0.5")
        page.get_by_label("Memory").fill("512M")

    return choose


def saved_file(page: Any) -> Any:
    """The file browser's entry of results.txt."""
    listing = page.get_by_role("region", name="File Browser Section")
    return listing.get_by_role("listitem", name=re.compile(r"^Name: results\.txt "))


def test_a_file_written_in_jupyterlab_is_there_after_the_server_is_stopped_and_started_again(
    hub: HubProcess, hub_user: Callable[[str], HubUser]
) -> None:
    from playwright.sync_api import expect

    alice = hub_user("browser-alice")
    page = alice.page
    alice.log_in()
    alice.start_server(small_server(hub))
    alice.shot("lab-open")

    # A new text file from the launcher; type, save.
    page.get_by_text("Text File", exact=True).click()
    editor = page.get_by_role("tabpanel", name="untitled.txt").get_by_role("textbox")
    expect(editor).to_be_visible()
    editor.click()
    page.keyboard.type(TEXT)
    alice.shot("text-typed")
    page.keyboard.press("Control+s")
    # JupyterLab asks for a name on the first save.
    rename = page.get_by_role("dialog")
    rename.get_by_role("textbox", name="File name").fill("results.txt")
    alice.shot("save-as")
    rename.get_by_role("button", name="Rename and Save").click()
    expect(page.get_by_role("tab", name="results.txt")).to_be_visible()
    # On disk: the file browser lists it with the bytes typed.
    size = f"Size: {len(TEXT)} B"
    expect(saved_file(page)).to_have_accessible_name(re.compile(re.escape(size)))
    alice.shot("file-saved")

    alice.stop_server()
    alice.start_from_home(small_server(hub))
    expect(saved_file(page)).to_have_accessible_name(re.compile(re.escape(size)))
    alice.shot("lab-after-restart")

    saved_file(page).get_by_role("button", name="results.txt").dblclick()
    panel = page.get_by_role("tabpanel", name="results.txt")
    expect(panel.get_by_role("textbox")).to_have_text(TEXT)
    alice.shot("file-reopened")

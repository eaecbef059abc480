"""The browser fixture of the project: real headless Chromium, driven by Playwright, on the hub.

One browser per test session (Debian's ``chromium``; test tools never download a browser), one
hub (the shared ``hub`` fixture of ``tests/hub_fixtures.py``), and a fresh browser context per
user, so that two users never share cookies. :class:`HubUser` does what a person does: log in,
start (or reuse) their server from the spawn form, open JupyterLab, stop the server from the
hub's home page. Every step can leave a screenshot (``shot``), and every failing test leaves one
of each page it had open (with the page's accessibility tree next to it, ``.aria.txt``), in
``$NSML_SCREENSHOTS`` (default ``.cache/screenshots``), one folder per test.

Locate by role and label, wait for state with Playwright's ``expect``, never for time. Later
tests (Bokeh panels, the JupyterLab sidebar, the admin panel) build on :func:`hub_user`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, service_missing
from tests.integration.hubproc import HubProcess

SCREENSHOTS = Path(os.environ.get("NSML_SCREENSHOTS") or REPO / ".cache" / "screenshots")

# Flags that keep Debian's Chromium headless, quiet and off the network (see ENV.md).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# How long a page may take to reach a state (a server start is seconds; a first JupyterLab
# load on two busy cores can take tens).
STATE_TIMEOUT_MS = 90_000


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    """Keep each phase's report on the test item, so fixtures know whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="package")
def browser(chromium_path: str) -> Iterator[Any]:
    """One headless Chromium for the whole test session: every browser test lives in this
    package, and the browser stops when the package's last test has run. (Playwright's sync
    API runs an event loop on the main thread while it is started; left running, it would
    break every later test that calls ``asyncio.run``.)"""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        service_missing("browser", f"the playwright package is missing ({e}); install .[test]")
    from playwright.sync_api import expect

    expect.set_options(timeout=STATE_TIMEOUT_MS)  # states, not sleeps: wait as long as it takes
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
    except Exception as e:
        pw.stop()
        service_missing("browser", f"Chromium at {chromium_path} does not start: {e}")
    try:
        yield b
    finally:
        b.close()
        pw.stop()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:120] or "test"


class Shots:
    """Numbered screenshots of one test, in a folder of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)

    def take(self, page: Any, step: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{_slug(step)}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Shots:
    """This test's screenshot folder: ``$NSML_SCREENSHOTS/<test name>/NN-step.png``."""
    return Shots(SCREENSHOTS / _slug(request.node.nodeid.split("::", 1)[-1]))


class HubUser:
    """One person at the hub in their own browser context (cookies of their own).

    Attributes:
        name: the hub user name.
        page: the Playwright page this person looks at.
    """

    def __init__(self, hub: HubProcess, context: Any, name: str, shots: Shots) -> None:
        self.hub = hub
        self.context = context
        self.name = name
        self.shots = shots
        self.page = context.new_page()
        self.page.set_default_timeout(STATE_TIMEOUT_MS)

    # -- what a person sees ------------------------------------------------------------------

    def shot(self, step: str) -> Path:
        """A screenshot of the page now, named after *step*."""
        return self.shots.take(self.page, f"{self.name}-{step}")

    @property
    def lab_url(self) -> str:
        return f"{self.hub.url}/user/{self.name}/lab"

    # -- the hub -------------------------------------------------------------------------------

    def log_in(self, password: str | None = None) -> None:
        """Sign in on the hub's login page with the shared user password (or *password*:
        ``hub.admin_password`` for an admin)."""
        from playwright.sync_api import expect

        page = self.page
        page.goto(f"{self.hub.url}/hub/login")
        page.get_by_label("Username").fill(self.name)
        page.get_by_label("Password").fill(password or self.hub.user_password)
        self.shot("login")
        page.get_by_role("button", name="Sign in").click()
        expect(page).not_to_have_url(re.compile(r"/hub/login"))

    def start_server(self, choose: Callable[[Any], None] | None = None) -> None:
        """Start the server from the spawn form (*choose* fills it in) and wait until
        JupyterLab is up; a running server is reused."""
        from playwright.sync_api import expect

        page = self.page
        page.goto(f"{self.hub.url}/hub/spawn/{self.name}")
        if "/hub/spawn" in page.url and page.get_by_role("button", name="Start").count():
            if choose is not None:
                choose(page)
            self.shot("spawn-form")
            page.get_by_role("button", name="Start").click()
        expect(page).to_have_url(re.compile(rf"/user/{re.escape(self.name)}/"))
        self.wait_for_lab()

    def wait_for_lab(self) -> None:
        """Wait until JupyterLab is up: its splash gone, a tab in the main area, the file
        browser shown."""
        from playwright.sync_api import expect

        page = self.page
        if "/lab" not in page.url:
            page.goto(self.lab_url)
        expect(page.locator("#jupyterlab-splash")).to_have_count(0)
        expect(
            page.get_by_role("main", name="Main Content").get_by_role("tab").first
        ).to_be_visible()
        expect(page.get_by_role("region", name="File Browser Section")).to_be_visible()
        self.dismiss_notifications()

    def open_lab(self) -> None:
        """Go to JupyterLab of the running server."""
        self.page.goto(self.lab_url)
        self.wait_for_lab()

    def dismiss_notifications(self) -> None:
        """Close JupyterLab's toasts (e.g. the news question) if one is shown."""
        page = self.page
        for name in ("No", "Dismiss"):
            button = page.get_by_role("button", name=name, exact=True)
            if button.count() and button.first.is_visible():
                button.first.click()

    def stop_server(self) -> None:
        """Stop the server from the hub's home page, as a person does."""
        from playwright.sync_api import expect

        page = self.page
        page.goto(f"{self.hub.url}/hub/home")
        page.get_by_role("button", name="Stop My Server").click()
        expect(page.get_by_role("button", name="Start My Server")).to_be_visible()
        self.shot("server-stopped")

    def start_from_home(self, choose: Callable[[Any], None] | None = None) -> None:
        """Start the server again from the hub's home page."""
        from playwright.sync_api import expect

        page = self.page
        page.goto(f"{self.hub.url}/hub/home")
        page.get_by_role("button", name="Start My Server").click()
        expect(page.get_by_role("button", name="Start")).to_be_visible()
        if choose is not None:
            choose(page)
        self.shot("spawn-form-again")
        page.get_by_role("button", name="Start").click()
        expect(page).to_have_url(re.compile(rf"/user/{re.escape(self.name)}/"))
        self.wait_for_lab()


@pytest.fixture
def hub_user(
    hub: HubProcess, browser: Any, shots: Shots, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], HubUser]]:
    """``hub_user(name)``: a person at the hub in a fresh browser context.

    After the test: a screenshot of every page when it failed, then the contexts are closed
    and the users' servers stopped (their homes are kept, as always).
    """
    people: list[HubUser] = []

    def make(name: str) -> HubUser:
        if hub.admin("GET", f"/users/{name}").status_code == 404:
            hub.admin("POST", f"/users/{name}").raise_for_status()
        person = HubUser(
            hub, browser.new_context(viewport={"width": 1280, "height": 800}), name, shots
        )
        people.append(person)
        return person

    yield make
    failed = any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )
    for person in people:
        if failed:
            try:
                path = person.shot("FAILED")
                # What the page offers by role and name, to fix a locator without guessing.
                aria = person.page.locator("body").aria_snapshot()
                path.with_suffix(".aria.txt").write_text(aria)
            except Exception as e:  # a crashed page: say so, keep cleaning up
                print(f"no failure screenshot of {person.name}: {e}")
        person.context.close()
    for person in people:
        hub.admin("DELETE", f"/users/{person.name}/server")

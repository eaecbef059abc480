"""The hub admin panel (``/services/nsml/admin/``), used as an admin and tried as a non-admin.

Real Chromium, the real hub and its NSML service, a real notebook container. The admin signs
in at the hub, follows the "NSML admin" link of the hub's navigation bar (the panel signs
them in through the hub's OAuth), grants credits to a user, drains the local node, stops a
user's notebook server, and finds each of these in the audit log; the API agrees with what
the pages say. A non-admin gets 403 on every page of the panel, every form, and every admin
route of the REST API. A form posted without its XSRF token (as another site would post it)
is refused and changes nothing.

Screenshots of every page land in ``$NSML_SCREENSHOTS`` (default ``.cache/screenshots``),
``test_an_admin_...`` folder.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nsml_server.admin.handlers import PAGES
from tests.browser.conftest import HubUser
from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_placements import local_model

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.docker]

NODE = "local-test"  # the hub fixture's local node (NSML_NODE_NAME)

FORMS = [
    "users/browser-carol/credits",
    "users/browser-carol/level",
    "teams/new",
    "teams/some-team/credits",
    "teams/some-team/pays",
    "teams/some-team/admins",
    "teams/some-team/members",
    "levels/user",
    f"nodes/{NODE}/state",
    "sessions/stop",
    "servers/stop",
    "policy",
]
"""Every form target of the panel (POST)."""

# Admin-only calls of the REST API, with a body where the route needs one. The test adds
# every operation of the OpenAPI document whose summary marks it "(admin)".
ADMIN_API: list[tuple[str, str, dict[str, Any] | None]] = [
    ("PATCH", f"nodes/{NODE}", {"state": "draining"}),
    ("PUT", f"nodes/{NODE}/heartbeat", {"gpus": []}),
    ("POST", "dataset-store/gc", None),
    ("GET", f"nodes/{NODE}/dataset-holds", None),
    ("GET", "placements?all=1", None),
    ("GET", "sessions?all=1", None),
    ("GET", "sessions?user=admin", None),
    ("GET", "submissions?all=1", None),
    ("GET", "usage?user=admin", None),
    ("GET", "users/admin/credits", None),
    ("GET", "users/admin/level", None),
]

PARAMS = {"name": NODE, "user": "admin", "id": "1", "version": "1", "level": "user"}


def admin_api_calls(hub: HubProcess, token: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    """:data:`ADMIN_API` plus every operation the OpenAPI document marks "(admin)"."""
    r = hub.nsml("GET", "openapi.json", token)
    assert r.status_code == 200, r.text
    calls = list(ADMIN_API)
    seen = {(m, p.split("?")[0]) for m, p, _ in calls}
    for path, ops in r.json()["paths"].items():
        for method, op in ops.items():
            if not isinstance(op, dict) or "(admin)" not in op.get("summary", ""):
                continue
            concrete = re.sub(r"\{(\w+)\}", lambda m: PARAMS.get(m.group(1), "x"), path)
            key = (method.upper(), concrete.lstrip("/"))
            if key not in seen:
                seen.add(key)
                body = {} if method in ("post", "put", "patch") else None
                calls.append((key[0], key[1], body))
    return calls


def node_state(hub: HubProcess, token: str) -> str:
    r = hub.nsml("GET", f"nodes/{NODE}", token)
    assert r.status_code == 200, r.text
    return str(r.json()["state"])


@pytest.fixture
def admin_token(hub: HubProcess) -> Iterator[str]:
    """An API token of the hub admin ``admin``; the local node is up again after the test."""
    token = hub.user_token("admin")
    yield token
    hub.nsml("PATCH", f"nodes/{NODE}", token, json={"state": "up"})


def admin_at_panel(hub: HubProcess, hub_user: Callable[[str], HubUser]) -> HubUser:
    """The admin, signed in at the hub, on the panel's users page (through the nav link)."""
    from playwright.sync_api import expect

    admin = hub_user("admin")
    admin.log_in(hub.admin_password)
    page = admin.page
    page.goto(f"{hub.url}/hub/home")
    link = page.get_by_role("link", name="NSML admin")
    expect(link).to_be_visible()
    admin.shot("hub-nav-link")
    link.click()
    expect(page).to_have_url(re.compile(r"/services/nsml/admin/users$"))
    expect(page.get_by_role("heading", name="Users")).to_be_visible()
    return admin


def test_an_admin_grants_credits_drains_a_node_and_stops_a_server_and_sees_each_in_the_audit_log(
    hub: HubProcess, hub_user: Callable[[str], HubUser], admin_token: str
) -> None:
    from playwright.sync_api import expect

    # Carol has used NSML (the API knows her) and runs a notebook server on a GPU share.
    carol_token = hub.user_token("browser-carol")
    before = hub.nsml("GET", "me", carol_token)
    assert before.status_code == 200, before.text
    balance_before = float(before.json()["credits"])
    r = hub.admin(
        "POST",
        "/users/browser-carol/server",
        json={
            "user_options": {
                "gpus": 0.25,
                "gpu_model": local_model(hub),
                "cpu": 0.5,
                "memory": "512M",
            }
        },
    )
    assert r.status_code in (201, 202), r.text
    wait_for(
        lambda: hub.admin("GET", "/users/browser-carol").json().get("server"),
        timeout=120,
        what="carol's server to be ready",
    )

    admin = admin_at_panel(hub, hub_user)
    page = admin.page
    admin.shot("users")
    carol_row = page.get_by_role("row", name=re.compile(r"browser-carol"))
    expect(carol_row).to_be_visible()

    # Grant 25 credits from carol's page.
    carol_row.get_by_role("link", name="browser-carol").click()
    expect(page.get_by_role("heading", name=re.compile("browser-carol"))).to_be_visible()
    form = page.get_by_role("form", name="Grant or set credits")
    form.get_by_label("Credits").fill("25")
    form.get_by_label("Reason").fill("browser test: course project")
    admin.shot("user-grant-filled")
    form.get_by_role("button", name="Apply").click()
    expect(page.get_by_role("status")).to_contain_text("Granted 25.000 credits to browser-carol")
    expect(page.get_by_role("table", name="Ledger")).to_contain_text("browser test: course project")
    admin.shot("user-after-grant")
    after = float(hub.nsml("GET", "me", carol_token).json()["credits"])
    assert after == pytest.approx(balance_before + 25, abs=1.0)  # charges may tick meanwhile

    # Set her balance to exactly 40.
    form.get_by_label("Set the balance to").check()
    form.get_by_label("Credits").fill("40")
    form.get_by_label("Reason").fill("browser test: reset")
    form.get_by_role("button", name="Apply").click()
    expect(page.get_by_role("status")).to_contain_text("balance 40.000")

    # Make her a team admin with a cap of 2 GPUs.
    form = page.get_by_role("form", name="Level, limits and billing")
    form.get_by_label("Permission level").select_option("team_admin")
    form.get_by_label("Most GPUs at once").fill("2")
    form.get_by_role("button", name="Save level and limits").click()
    expect(page.get_by_role("status")).to_contain_text("Saved the level, limits and billing")
    expect(page.get_by_label("Permission level")).to_have_value("team_admin")
    level = hub.nsml("GET", "users/browser-carol/level", admin_token)
    assert level.status_code == 200, level.text
    assert "team_admin" in level.text, level.text

    # A new team, then credits for its pool.
    team = f"lab-{secrets.token_hex(2)}"
    hub.admin("POST", f"/groups/{team}").raise_for_status()
    page.get_by_role("link", name="Teams", exact=True).click()
    new = page.get_by_role("form", name="New team")
    new.get_by_label("Hub group").fill(team)
    new.get_by_label("Its pool pays").check()
    new.get_by_role("button", name="Make it a team").click()
    expect(page.get_by_role("status")).to_contain_text(f"Team {team} created; its pool pays")
    pool = page.get_by_role("form", name=f"Grant to team {team}")
    pool.get_by_label("Credits").fill("10")
    pool.get_by_label("Reason").fill("browser test: lab pool")
    pool.get_by_role("button", name="Grant").click()
    expect(page.get_by_role("status")).to_contain_text("pool 10.000")
    # Carol joins the team: the hub's group changes.
    members = page.get_by_role("form", name=f"Members of {team}")
    members.get_by_label("Member", exact=True).fill("browser-carol")
    members.get_by_role("button", name="Apply").click()
    expect(page.get_by_role("status")).to_contain_text(f"browser-carol is now in team {team}.")
    assert "browser-carol" in hub.admin("GET", f"/groups/{team}").json()["users"]
    admin.shot("teams")

    # Drain the local node from the nodes page; the API says draining too.
    page.get_by_role("link", name="Nodes", exact=True).click()
    expect(page.get_by_role("region", name=f"Node {NODE}")).to_be_visible()
    admin.shot("nodes")
    page.get_by_role("button", name=f"Drain {NODE}", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text(f"Node {NODE} drained (was up)")
    expect(page.get_by_role("button", name=f"Undrain {NODE}", exact=True)).to_be_visible()
    admin.shot("nodes-drained")
    assert node_state(hub, admin_token) == "draining"

    # Stop carol's notebook server from the sessions page; the hub stops it.
    page.get_by_role("link", name="Sessions & servers", exact=True).click()
    stop = page.get_by_role("button", name="Stop server of browser-carol")
    expect(stop).to_be_visible()
    admin.shot("sessions")
    stop.click()
    expect(page.get_by_role("status")).to_contain_text("Server browser-carol stop")
    wait_for(
        lambda: not hub.admin("GET", "/users/browser-carol").json().get("server"),
        timeout=60,
        what="carol's server to stop",
    )

    # Undrain: the node takes work again.
    page.get_by_role("link", name="Nodes", exact=True).click()
    page.get_by_role("button", name=f"Undrain {NODE}", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text(f"Node {NODE} undrained (was draining)")
    assert node_state(hub, admin_token) == "up"

    # Double the GPU-hour rate, then put it back: both changes are in force at once.
    page.get_by_role("link", name="Credit policy", exact=True).click()
    rate = page.get_by_label("Credits per GPU-hour", exact=True)
    old_rate = rate.input_value()
    rate.fill("2")
    page.get_by_role("button", name="Save the policy").click()
    expect(page.get_by_role("status")).to_contain_text("The credit policy is changed")
    expect(page.get_by_label("Credits per GPU-hour", exact=True)).to_have_value("2.000")
    page.get_by_label("Credits per GPU-hour", exact=True).fill(old_rate)
    page.get_by_role("button", name="Save the policy").click()
    expect(page.get_by_label("Credits per GPU-hour", exact=True)).to_have_value(old_rate)

    # The audit log lists each action, by admin.
    page.get_by_role("link", name="Audit log", exact=True).click()
    log = page.get_by_role("table", name="Audit log")
    for action, target in [
        ("credits.grant", "user:browser-carol"),
        ("node.state", f"node:{NODE}"),
        ("server.stop", "server:browser-carol"),
        ("credits.policy", "policy"),
        ("levels.user", "user:browser-carol"),
        ("teams.create", f"team:{team}"),
        ("credits.grant", f"team:{team}"),
        ("teams.member.add", f"team:{team}"),
    ]:
        expect(
            log.get_by_role("row").filter(has_text=action).filter(has_text=target).first
        ).to_contain_text("admin")
    expect(log).to_contain_text("browser test: course project")
    expect(log).to_contain_text("after: draining")
    expect(log).to_contain_text("gpu_hour_milli: ")
    admin.shot("audit")

    # The other pages, for the record (each must render for an admin).
    for path, title in PAGES:
        resp = page.goto(f"{hub.url}/services/nsml/admin/{path}")
        assert resp is not None and resp.status == 200, (path, resp and resp.status)
        expect(page.get_by_role("link", name=title, exact=True)).to_have_attribute(
            "aria-current", "page"
        )
        admin.shot(f"page-{path}")
    # The charts are Bokeh's, drawn by BokehJS served inline (no network).
    page.goto(f"{hub.url}/services/nsml/admin/charts?hours=1")
    expect(page.locator("canvas").first).to_be_visible()
    admin.shot("charts")


def test_a_non_admin_gets_403_on_every_admin_page_form_and_api_route(
    hub: HubProcess, hub_user: Callable[[str], HubUser], admin_token: str
) -> None:
    from playwright.sync_api import expect

    bob = hub_user("browser-bob")
    bob.log_in()
    page = bob.page
    page.goto(f"{hub.url}/hub/home")
    expect(page.get_by_role("link", name="Home")).to_be_visible()
    expect(page.get_by_role("link", name="NSML admin")).to_have_count(0)

    base = f"{hub.url}/services/nsml/admin/"
    for path in ["", *(p for p, _ in PAGES), "users/browser-bob", "no-such-page"]:
        resp = page.goto(base + path)
        assert resp is not None and resp.status == 403, (path, resp and resp.status)
        expect(page.get_by_role("alert")).to_contain_text("is for hub admins; browser-bob")
    bob.shot("403")

    # Forms, even with a valid XSRF token of bob's own session.
    xsrf = next(
        c["value"]
        for c in bob.context.cookies()
        if c["name"] == "_xsrf" and c["path"].startswith("/services/nsml")
    )
    for path in FORMS:
        resp = page.request.post(
            base + path,
            form={"_xsrf": xsrf, "amount": "1000", "reason": "x", "state": "draining"},
            max_redirects=0,
        )
        assert resp.status == 403, (path, resp.status, resp.text()[:300])
    assert node_state(hub, admin_token) == "up"

    # The REST API's admin routes: 403 JSON {"message", "reason": "forbidden"}.
    token = hub.user_token("browser-bob")
    calls = admin_api_calls(hub, token)
    assert len(calls) >= len(ADMIN_API)
    for method, path, body in calls:
        r = (
            hub.nsml(method, path, token, json=body)
            if body is not None
            else hub.nsml(method, path, token)
        )
        assert r.status_code == 403, (method, path, r.status_code, r.text[:300])
        assert r.headers["Content-Type"].startswith("application/json"), (method, path)
        assert r.json()["reason"] == "forbidden", (method, path, r.text)
    assert node_state(hub, admin_token) == "up"


def test_a_form_posted_without_its_xsrf_token_is_refused_and_changes_nothing(
    hub: HubProcess, hub_user: Callable[[str], HubUser], admin_token: str
) -> None:
    from playwright.sync_api import expect

    admin = admin_at_panel(hub, hub_user)
    page = admin.page
    base = f"{hub.url}/services/nsml/admin/"
    page.goto(base + "audit")
    newest = (
        page.get_by_role("table", name="Audit log").get_by_role("row").nth(1).get_by_role("cell")
    ).first.inner_text()

    # The admin's own cookies, as a page of another site would send them: no token, or a
    # wrong one.
    for form in (
        {"state": "draining"},
        {"state": "draining", "_xsrf": "2|forged|token|1"},
    ):
        resp = page.request.post(base + f"nodes/{NODE}/state", form=form, max_redirects=0)
        assert resp.status == 403, (form, resp.status)
        assert "XSRF token is missing or wrong" in resp.text()
    resp = page.request.post(
        base + "users/admin/credits",
        form={"amount": "1000000", "reason": "forged"},
        max_redirects=0,
    )
    assert resp.status == 403
    assert node_state(hub, admin_token) == "up"

    # A form on another origin that posts to the panel: refused the same way.
    page.set_content(
        f'<form method="post" action="{base}nodes/{NODE}/state">'
        '<input type="hidden" name="state" value="draining">'
        '<button type="submit">Win a prize</button></form>'
    )
    page.get_by_role("button", name="Win a prize").click()
    expect(page.get_by_role("alert")).to_contain_text("XSRF token is missing or wrong")
    admin.shot("forged-post-refused")
    assert node_state(hub, admin_token) == "up"

    # Nothing reached the audit log.
    page.goto(base + "audit")
    row = page.get_by_role("table", name="Audit log").get_by_role("row").nth(1)
    expect(row.get_by_role("cell").first).to_have_text(newest)

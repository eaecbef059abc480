"""The credits API through a real hub: a user reads their own credits, an admin grants, a
non-admin gets a JSON 403 on every admin route, and a launch the balance cannot cover is
refused with the balance, the cost per hour and how long it would have run."""

from __future__ import annotations

import secrets

import pytest

from tests.integration.hubproc import HubProcess
from tests.integration.test_hub import assert_json_error

pytestmark = [pytest.mark.hub]


def test_credits_grants_refusals_and_admin_only_routes(hub: HubProcess) -> None:
    name = f"cr{secrets.token_hex(4)}"
    user = hub.user_token(name)
    admin = hub.user_token("admin")

    me = hub.nsml("GET", "me", user)
    assert me.status_code == 200, me.text
    opening = me.json()["credits"]
    own = hub.nsml("GET", f"users/{name}/credits", user)
    assert own.status_code == 200, own.text
    assert own.json()["balance"] == opening
    assert [e["reason"] for e in own.json()["history"]] == ["opening balance"]
    level = hub.nsml("GET", f"users/{name}/level", user)
    assert level.status_code == 200, level.text
    assert (level.json()["level"], level.json()["limits"]["max_gpus"]) == ("user", None)

    for method, path, body in [
        ("POST", f"users/{name}/credits", {"amount": 5, "reason": "self-service"}),
        ("GET", "users/admin/credits", None),
        ("PUT", "credits/policy", {"gpu_hour_milli": 1}),
        ("GET", "levels", None),
        ("PUT", "levels/user", {"max_gpus": 1}),
        ("PUT", f"users/{name}/level", {"level": "admin"}),
        ("GET", "teams", None),
        ("PUT", "teams/x", {"pays": True}),
        ("POST", "teams/x/credits", {"amount": 5, "reason": "x"}),
    ]:
        r = hub.nsml(method, path, user, json=body)
        assert_json_error(r, 403, "forbidden")

    r = hub.nsml(
        "POST", f"users/{name}/credits", admin, json={"amount": 5 - opening, "reason": "test"}
    )
    assert r.status_code == 201, r.text
    assert r.json()["actor"] == "admin"
    assert hub.nsml("GET", "me", user).json()["credits"] == 5
    too_much = hub.nsml(
        "POST", f"users/{name}/credits", admin, json={"amount": -6, "reason": "too much"}
    )
    assert_json_error(too_much, 409, "insufficient_credits")

    policy = hub.nsml("GET", "credits/policy", user).json()
    refused = hub.nsml("POST", "placements", user, json={"holder": "notebook", "gpus": 1})
    body = assert_json_error(refused, 402, "insufficient_credits")
    per_hour = policy["gpu_hour_milli"] / 1000
    assert (
        f"the balance is 5.000 credits and it costs {per_hour:.3f} credits an hour"
        in (body["message"])
    )
    assert "so it would run about" in body["message"]

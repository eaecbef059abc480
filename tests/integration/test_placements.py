"""The scheduler through the API: GPUs given once, queue positions, can-never-fit, release."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_hub import assert_json_error

pytestmark = [pytest.mark.hub, pytest.mark.docker]


def local_model(hub: HubProcess) -> str:
    """The local node's GPU model: other tests may register more nodes, of other models."""
    node = hub.nsml("GET", "nodes/local-test", hub.user_token("admin")).json()
    return str(node["gpus"][0]["model"])


def ask(hub: HubProcess, token: str, holder: str, **body: Any) -> Any:
    body = {
        "holder": holder,
        "cpu": 0.1,
        "memory": "256M",
        "wait_s": 10,
        "gpu_models": [local_model(hub)],
        **body,
    }
    return hub.nsml("POST", "placements", token, json=body)


def test_gpus_are_given_once_then_queued_then_handed_over(hub: HubProcess) -> None:
    alice, bob, carol = (hub.user_token(u) for u in ("pa-alice", "pa-bob", "pa-carol"))
    ra = ask(hub, alice, "nb", gpus=2)
    rb = ask(hub, bob, "nb", gpus=2)
    assert ra.status_code == 201 and rb.status_code == 201, (ra.text, rb.text)
    ga, gb = ra.json()["allocation"], rb.json()["allocation"]
    assert ga["node"] == gb["node"] == "local-test"
    assert len(ga["gpu_indices"]) == 2 and len(gb["gpu_indices"]) == 2
    assert not set(ga["gpu_indices"]) & set(gb["gpu_indices"]), "disjoint GPUs"

    rc = ask(hub, carol, "nb", gpus=1, wait_s=1)
    assert rc.status_code == 202, rc.text
    waiting = rc.json()
    assert waiting["state"] == "waiting" and waiting["position"] == 1
    assert "Insufficient gpu" in waiting["reason"], waiting["reason"]

    # Asking again for the same holder returns the same request.
    again = ask(hub, carol, "nb", gpus=1, wait_s=0)
    assert again.json()["id"] == waiting["id"]

    released = hub.nsml("DELETE", f"placements/{ra.json()['id']}", alice)
    assert released.status_code == 200 and released.json()["state"] == "released"
    assert released.json()["allocation"]["state"] == "released"
    # Releasing twice is fine.
    assert hub.nsml("DELETE", f"placements/{ra.json()['id']}", alice).status_code == 200

    placed = wait_for(
        lambda: (
            (r := hub.nsml("GET", f"placements/{waiting['id']}", carol).json())["state"] == "placed"
            and r
        ),
        timeout=15,
        what="carol placed after alice released",
    )
    assert placed["allocation"]["gpu_indices"][0] in ga["gpu_indices"]
    for token, r in ((bob, rb), (carol, rc)):
        hub.nsml("DELETE", f"placements/{r.json()['id']}", token)


def test_more_gpus_than_any_node_has_can_never_fit(hub: HubProcess) -> None:
    r = ask(hub, hub.user_token("pa-dan"), "big", gpus=99, gpu_models=[])
    body = assert_json_error(r, 422, "infeasible")
    assert "never fit" in body["message"] and "local-test" in body["message"]


def test_a_fraction_shares_a_gpu(hub: HubProcess) -> None:
    token = hub.user_token("pa-erin")
    r1 = ask(hub, token, "half-1", gpus=0.5)
    r2 = ask(hub, token, "half-2", gpus=0.5)
    assert r1.status_code == r2.status_code == 201
    a1, a2 = r1.json()["allocation"], r2.json()["allocation"]
    assert a1["gpu_milli_per_gpu"] == 500
    assert a1["gpu_indices"] == a2["gpu_indices"], "two halves pack onto one GPU"
    for r in (r1, r2):
        hub.nsml("DELETE", f"placements/{r.json()['id']}", token)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        pytest.param({"gpus": 1.5}, "whole number", id="one and a half GPUs"),
        pytest.param({"gpus": -1}, "greater than or equal", id="negative GPUs"),
        pytest.param({"memory": "-5G"}, "memory", id="negative memory"),
        pytest.param({"memory": "lots"}, "memory", id="memory not a size"),
        pytest.param({"holder": "../etc"}, "holder", id="holder with a path"),
        pytest.param({"datasets": ["@v1"]}, "dataset", id="dataset without a name"),
        pytest.param({"colour": "blue"}, "unknown field", id="unknown field"),
    ],
)
def test_bad_requests_are_400_and_nothing_is_allocated(
    hub: HubProcess, body: dict[str, Any], words: str
) -> None:
    token = hub.user_token("pa-frank")
    r = hub.nsml("POST", "placements", token, json={"holder": "x", **body})
    assert words in assert_json_error(r, 400, "bad_request")["message"]
    assert hub.nsml("GET", "placements", token).json()["placements"] == []


def test_only_admins_raise_priority_or_ask_for_others(hub: HubProcess) -> None:
    token = hub.user_token("pa-gina")
    assert_json_error(ask(hub, token, "x", priority=5), 403, "forbidden")
    assert_json_error(ask(hub, token, "x", user="pa-other"), 403, "forbidden")


def test_another_user_cannot_read_or_release_my_placement(hub: HubProcess) -> None:
    owner, other = hub.user_token("pa-hank"), hub.user_token("pa-ivy")
    r = ask(hub, owner, "mine", gpus=0)
    pid = r.json()["id"]
    assert_json_error(hub.nsml("GET", f"placements/{pid}", other), 403, "forbidden")
    assert_json_error(hub.nsml("DELETE", f"placements/{pid}", other), 403, "forbidden")
    assert hub.nsml("GET", f"placements/{pid}", owner).json()["state"] == "placed"
    hub.nsml("DELETE", f"placements/{pid}", owner)


def test_health_says_this_server_leads(hub: HubProcess) -> None:
    assert hub.nsml("GET", "health", None).json()["leader"] is True


def test_a_node_whose_engine_cannot_be_reached_receives_nothing(hub: HubProcess) -> None:
    """An agent that gives no --docker-url registers its GPUs, but no work goes there."""
    admin = hub.user_token("admin")
    hb = {
        "cpu_milli": 64000,
        "memory_mib": 65536,
        "gpu_probe": {"kind": "virtual", "enabled": True},
        "gpus": [
            {
                "index": 0,
                "uuid": "GPU-unreachable-0",
                "model": "Unreachable-GPU",
                "memory_total_mib": 1024,
            }
        ],
    }
    assert hub.nsml("PUT", "nodes/no-engine/heartbeat", admin, json=hb).status_code == 200
    kim = hub.user_token("pa-kim")
    r = ask(hub, kim, "x", gpus=1, gpu_models=["Unreachable-GPU"], wait_s=2)
    try:
        assert r.status_code == 202, r.text
        assert "no-engine" in r.json()["reason"]
    finally:
        hub.nsml("DELETE", f"placements/{r.json()['id']}", kim)
        hub.nsml("PATCH", "nodes/no-engine", admin, json={"state": "down"})


def test_gpu_time_of_notebooks_and_sessions_is_recorded_per_user(hub: HubProcess) -> None:
    import time

    dana, eve = hub.user_token("pu-dana"), hub.user_token("pu-eve")
    nb = ask(hub, dana, "notebook", gpus=1)
    assert nb.status_code == 201, nb.text
    sess = ask(hub, dana, "session/mnist/1", gpus=0.5)
    assert sess.status_code == 201, sess.text
    time.sleep(1.0)
    assert hub.nsml("DELETE", f"placements/{nb.json()['id']}", dana).status_code == 200
    time.sleep(0.5)
    usage = hub.nsml("GET", "usage", dana).json()
    assert usage["user"] == "pu-dana"
    by_holder = {i["holder"]: i for i in usage["items"]}
    notebook, session = by_holder["notebook"], by_holder["session/mnist/1"]
    assert notebook["kind"] == "notebook" and notebook["ended"] is not None
    assert session["kind"] == "session" and session["ended"] is None and session["gpus"] == 0.5
    # 1 GPU for ~1 s (released); half a GPU for ~1.5 s so far (still held).
    assert 0.9 <= notebook["gpu_seconds"] < 5, notebook
    assert 0.6 <= session["gpu_seconds"] < 5, session
    assert usage["gpu_seconds"]["notebook"] == notebook["gpu_seconds"]
    ended = notebook["gpu_seconds"]
    time.sleep(0.3)
    again = hub.nsml("GET", "usage", dana).json()
    assert again["gpu_seconds"]["notebook"] == ended  # a released allocation stops counting
    assert again["gpu_seconds"]["session"] > usage["gpu_seconds"]["session"]
    # `since` cuts the count; a bad date is a 400; another user's usage needs an admin.
    later = hub.nsml("GET", "usage?since=2999-01-01T00:00:00Z", dana).json()
    assert later["items"] == [s for s in later["items"] if s["ended"] is None]
    assert later["gpu_seconds"]["session"] == 0
    assert (
        "ISO 8601"
        in assert_json_error(hub.nsml("GET", "usage?since=yesterday", dana), 400)["message"]
    )
    assert_json_error(hub.nsml("GET", "usage?user=pu-dana", eve), 403, "forbidden")
    admin = hub.nsml("GET", "usage?user=pu-dana", hub.user_token("admin")).json()
    assert {i["holder"] for i in admin["items"]} == {"notebook", "session/mnist/1"}
    hub.nsml("DELETE", f"placements/{sess.json()['id']}", dana)

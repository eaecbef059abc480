"""A refusal reaches the client through the hub's proxy as JSON, even when the service
refuses before it has read the request's body.

The service used to end the connection when it answered a streamed upload before reading
its body (a bad token on ``POST code``, ``PUT .../checkpoints/C``, ``PUT .../blobs/SHA``).
The proxy, still sending the body, got a reset and answered ``503`` with an HTML page
("socket hang up"); a request it sent next on the same pooled connection could fail the same
way. This file talks only HTTP (no project imports), so it also runs against older servers.
"""

from __future__ import annotations

import os

import pytest
import requests

from tests.integration.hubproc import HubProcess

pytestmark = [pytest.mark.hub, pytest.mark.docker]

ROUNDS = int(os.environ.get("NSML_TEST_PROXY_ROUNDS", "25"))
BODY = b"\0" * (8 << 20)
"""Large enough that the proxy is still sending when the service answers."""

REFUSING = [
    ("POST", "code", "bad-token"),
    ("PUT", "sessions/nobody/_/1/checkpoints/c1", None),
    ("PUT", "sessions/nobody/_/1/checkpoints/c1", "bad-token"),
    ("PUT", f"datasets/no-such/uploads/{'0' * 32}/blobs/{'0' * 64}", "bad-token"),
    ("POST", f"datasets/no-such/uploads/{'0' * 32}/pack", None),
]


def problem(r: requests.Response) -> str | None:
    """What is wrong with an answer that should be a JSON error, or None."""
    if r.status_code >= 500:
        return f"{r.status_code} {r.text[:120]!r}"
    if not r.headers.get("Content-Type", "").startswith("application/json"):
        return f"{r.status_code} not JSON: {r.text[:120]!r}"
    try:
        body = r.json()
    except ValueError:
        return f"{r.status_code} unreadable JSON: {r.text[:120]!r}"
    if set(body) != {"message", "reason"}:
        return f"{r.status_code} not an error body: {body!r}"
    return None


def test_refused_uploads_through_the_proxy_always_get_a_json_answer(hub: HubProcess) -> None:
    session = requests.Session()  # one pooled connection, as a client (or the proxy) keeps
    problems: list[str] = []
    answers = 0
    for _ in range(ROUNDS):
        for method, path, token in REFUSING:
            headers = {"Authorization": f"token {token}"} if token else {}
            try:
                r = session.request(
                    method, f"{hub.nsml_api}/{path}", data=BODY, headers=headers, timeout=60
                )
            except requests.ConnectionError as e:
                problems.append(f"{method} {path}: connection error {e}")
                continue
            answers += 1
            if r.status_code not in (401, 403) or problem(r):
                problems.append(f"{method} {path}: {problem(r) or r.status_code}")
            # The next request on the same connection must not meet a closed one.
            after = session.get(f"{hub.nsml_api}/health", timeout=30)
            if after.status_code != 200:
                problems.append(f"GET health after {method} {path}: {after.status_code}")
    assert not problems, f"{len(problems)} bad answers of {answers}:\n" + "\n".join(problems[:20])

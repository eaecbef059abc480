"""A balance that runs out mid-session stops it safely, on the real Docker engine: the
billing pass charges the running session, asks for the stop with reason ``credits``, the
session gets SIGTERM and its save handler runs, and it ends ``stopped``/``credits``; the
balance at the stop is short by at most one billing interval. The user's open event stream
(what the sidebar reads) gets the "credits low" notice."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.hubproc import HubProcess
from tests.integration.test_lab_forwarder import EventReader
from tests.integration.test_sessions import TRAIN_PY, cli_for, logs, wait_state

pytestmark = [pytest.mark.hub, pytest.mark.docker]

INTERVAL_S = 2


def test_running_out_of_credits_stops_the_session_with_its_save_handler(
    hub: HubProcess, tmp_path: Path
) -> None:
    (tmp_path / "train.py").write_text(TRAIN_PY)
    admin = hub.user_token("admin")
    token = hub.user_token("cr-stop")
    before = hub.nsml("GET", "credits/policy", admin).json()
    fast = {"interval_s": INTERVAL_S, "admission_min_hours": 0}
    assert hub.nsml("PUT", "credits/policy", admin, json=fast).status_code == 200
    stream: requests.Response | None = None
    try:
        opening = hub.nsml("GET", "me", token).json()["credits"]
        r = hub.nsml(
            "POST",
            "users/cr-stop/credits",
            admin,
            json={"amount": round(0.1 - opening, 3), "reason": "a few seconds of one GPU"},
        )
        assert r.status_code == 201, r.text
        stream = requests.get(
            f"{hub.nsml_api}/events/stream",
            headers={"Authorization": f"token {token}"},
            stream=True,
            timeout=(30, 60),
        )
        assert stream.status_code == 200, stream.text[:300]
        reader = EventReader(stream)
        reader.until(lambda got: any(e.get("event") == "hello" for e in got))
        nsml = cli_for(hub, token, tmp_path)
        name = nsml(
            "run", "--gpus", "1", "train.py", "--", "--epochs", "100000", "--sleep", "0.05"
        ).stdout.strip()
        st = wait_state(nsml, name, timeout=240)
        out = logs(nsml, name)
        assert (st["state"], st["reason"]) == ("stopped", "credits"), (st, out)
        assert "SIGTERM" in out and f"saved checkpoint {name}/stopped" in out, out
        events = hub.nsml("GET", f"sessions/{name}/events", token).json()["events"]
        stops = [e["message"] for e in events if e["message"].startswith("stopping: out of")]
        assert len(stops) == 1, events
        at = float(re.search(r" at (-?[0-9.]+)\)", stops[0]).group(1))  # type: ignore[union-attr]
        one_interval = before["gpu_hour_milli"] / 1000 * INTERVAL_S / 3600
        assert -one_interval - 0.001 <= at <= 0, (at, one_interval)
        assert any(e["message"].startswith("Credits low") for e in events), events

        def low(got: list[dict[str, Any]]) -> bool:
            return any(
                e.get("event") == "notice" and e["data"]["subject"] == "credits low" for e in got
            )

        (notice,) = [e for e in reader.until(low) if e.get("event") == "notice"]
        assert notice["data"]["message"].startswith("Credits low: your balance is"), notice
    finally:
        if stream is not None:
            stream.close()
        restore = {k: before[k] for k in ("interval_s", "admission_min_hours")}
        hub.nsml("PUT", "credits/policy", admin, json=restore)

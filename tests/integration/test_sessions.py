"""Training sessions end to end: the `nsml` CLI against a real hub, real containers.

One script, `train.py`, reports a loss per step and saves a checkpoint per epoch; the tests
run it as sessions with virtual GPUs and read back what the platform recorded.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_hub import assert_json_error

pytestmark = [pytest.mark.hub, pytest.mark.docker]

NSML = str(Path(sys.executable).parent / "nsml")
FINAL = ("completed", "failed", "oom_killed", "stopped", "lost")

TRAIN_PY = """
import argparse, json, os, sys, time
import nsml

print("first line of user code", flush=True)
print("files", sorted(os.listdir(".")), flush=True)
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, default=0.1)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--sleep", type=float, default=0.0)
args = p.parse_args()
state = {"epoch": 0, "w": 1.0}

def save(folder):
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f)

def load(folder):
    with open(os.path.join(folder, "state.json")) as f:
        state.update(json.load(f))
    print("loaded", json.dumps(state, sort_keys=True), flush=True)

nsml.bind(save=save, load=load)
print("lr", args.lr, "GPUS", os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
first = state["epoch"]
for epoch in range(first, first + args.epochs):
    for i in range(args.steps):
        state["w"] -= args.lr * state["w"]
        nsml.report(step=epoch * args.steps + i, loss=state["w"] ** 2, epoch=epoch)
        time.sleep(args.sleep)
    state["epoch"] = epoch + 1
    nsml.save(epoch)
    print("saved epoch", epoch, flush=True)
print("done", flush=True)
"""

FAIL_PY = """
import nsml
print("about to fail", flush=True)
nsml.report(step=0, loss=1.0)
def inner():
    raise ValueError("boom: the data loader broke")
inner()
"""

OOM_PY = """
print("allocating", flush=True)
blocks = []
for _ in range(64):
    blocks.append(bytearray(16 * 1024 * 1024))
print("survived", flush=True)
"""


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY)
    (folder / "fail.py").write_text(FAIL_PY)
    (folder / "oom.py").write_text(OOM_PY)
    (folder / "big.bin").write_bytes(b"\0" * 2048)
    (folder / ".nsmlignore").write_text("*.bin\n")
    return folder


Cli = Callable[..., subprocess.CompletedProcess[str]]


def cli_for(hub: HubProcess, token: str, cwd: Path) -> Cli:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
    env.update(NSML_API_URL=hub.nsml_api + "/", NSML_TOKEN=token)

    def nsml(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [NSML, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        if check and r.returncode != 0:
            raise AssertionError(f"nsml {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    return nsml


def status(nsml: Cli, name: str) -> dict[str, Any]:
    return dict(json.loads(nsml("status", name, "--json").stdout))


def wait_state(nsml: Cli, name: str, states: tuple[str, ...] = FINAL, timeout: float = 120) -> Any:
    """Wait until session *name* is in one of *states*; on timeout, say where it was."""
    last: dict[str, Any] = {}

    def reached() -> Any:
        last.update(status(nsml, name))
        return last["state"] in states and dict(last)

    try:
        return wait_for(reached, timeout=timeout, interval=0.5, what=f"{name} in {states}")
    except AssertionError as e:
        keys = ("state", "reason", "message", "queue", "node", "exit_code")
        raise AssertionError(f"{e}; last { ({k: last.get(k) for k in keys}) }") from None


def logs(nsml: Cli, name: str) -> str:
    return nsml("logs", name).stdout


def test_run_reports_checkpoints_logs_fork_and_diff(hub: HubProcess, project: Path) -> None:
    token = hub.user_token("se-alice")
    nsml = cli_for(hub, token, project)
    name = nsml(
        "run", "--gpus", "2", "--memory", "512M", "train.py", "--", "--lr", "0.1"
    ).stdout.strip()
    assert name == "se-alice/_/1", name

    listed = json.loads(nsml("ps", "--json").stdout)
    assert [s["name"] for s in listed] == [name]
    assert name in nsml("ps").stdout
    assert nsml("getid").stdout.strip() == name

    # Follow the output until the session ends (the short name works for one's own).
    followed = nsml("logs", "-f", "_/1").stdout
    assert "first line of user code" in followed and "done" in followed, followed
    st = wait_state(nsml, name)
    out = logs(nsml, name)
    assert st["state"] == "completed", (st, out)
    assert st["exit_code"] == 0 and st["reason"] == "completed"
    assert st["node"] == "local-test" and len(st["gpu_ids"]) == 2
    assert st["resources"]["gpus"] == 2 and st["resources"]["memory_mib"] == 512
    assert "first line of user code" in out and "lr 0.1 GPUS 0,1" in out, out
    assert "done" in out and "ended completed" in out

    # Reports: 2 epochs x 5 steps, last values and the per-step series.
    assert st["last_step"] == 9 and st["points"] == 10
    assert set(st["last_metrics"]) == {"loss", "epoch"} and st["last_metrics"]["epoch"] == 1
    series = hub.nsml("GET", f"sessions/{name}/metrics?names=loss", token).json()["series"]
    assert list(series) == ["loss"] and series["loss"]["steps"] == list(range(10))
    losses = series["loss"]["values"]
    assert all(a > b for a, b in itertools.pairwise(losses)), losses
    # Many sessions' metrics in one request (a comparison panel's): the same series.
    many = hub.nsml("GET", f"metrics?sessions={name},{name[:-1]}999&names=loss", token).json()
    assert [m["session"] for m in many["metrics"]] == [name]
    assert many["metrics"][0]["series"] == series
    assert many["errors"] == {f"{name[:-1]}999": f"No session {name[:-1]}999."}

    # A checkpoint per epoch; the ignored file never reached the snapshot.
    saved = json.loads(nsml("model", name, "--json").stdout)
    assert [c["name"] for c in saved] == ["0", "1"] and saved[1]["step"] == 9
    assert ".nsmlignore', 'fail.py', 'oom.py', 'train.py']" in out, "big.bin is ignored"
    assert "completed" in nsml("status", name).stdout

    # Fork from the last checkpoint with another learning rate: the child loads it.
    child = nsml("fork", f"{name}/1", "--", "--lr", "0.01", "--epochs", "1").stdout.strip()
    assert child == "se-alice/_/2"
    cst = wait_state(nsml, child)
    cout = logs(nsml, child)
    assert cst["state"] == "completed", (cst, cout)
    assert cst["parent"] == name and cst["parent_checkpoint"] == "1"
    assert cst["load_from"] == f"{name}/1"
    assert '"epoch": 2' in cout and "loaded" in cout and "lr 0.01" in cout, cout
    assert [c["name"] for c in json.loads(nsml("model", child, "--json").stdout)] == ["2"]

    # diff: arguments and settings as a table of name, A and B.
    table = [line.split() for line in nsml("diff", name, child).stdout.splitlines()]
    assert table[0] == ["NAME", name, child], table
    assert ["--lr", "0.1", "0.01"] in table and ["--epochs", "-", "1"] in table, table
    assert ["load_from", "-", f"{name}/1"] in table, table
    dj = json.loads(nsml("diff", name, child, "--json").stdout)
    assert dj["args"] == {"a": ["--lr", "0.1"], "b": ["--lr", "0.01", "--epochs", "1"]}
    assert dj["code"] == [] and dj["fields"]["load_from"] == {"a": None, "b": f"{name}/1"}

    # Pull the checkpoint back.
    dest = project / "pulled"
    where = Path(nsml("pull", f"{name}/1", str(dest)).stdout.strip())
    assert json.loads((where / "state.json").read_text())["epoch"] == 2

    # Events: queued -> preparing -> running -> completed.
    evs = hub.nsml("GET", f"sessions/{name}/events", token).json()["events"]
    assert [e["state"] for e in evs if e["kind"] == "state"] == [
        "queued",
        "preparing",
        "running",
        "completed",
    ]

    # Removing ended sessions takes their records with them.
    nsml("rm", name, child)
    assert hub.nsml("GET", f"sessions/{name}", token).status_code == 404


def test_a_raising_script_ends_failed_with_its_exit_code_and_traceback(
    hub: HubProcess, project: Path
) -> None:
    token = hub.user_token("se-bob")
    nsml = cli_for(hub, token, project)
    name = nsml("run", "fail.py").stdout.strip()
    st = wait_state(nsml, name)
    out = logs(nsml, name)
    assert st["state"] == "failed" and st["exit_code"] == 1 and st["reason"] == "exit_code"
    assert "ValueError: boom: the data loader broke" in st["message"], st
    assert "Traceback (most recent call last):" in out and "in inner" in out, out
    assert st["last_metrics"] == {"loss": 1.0}
    feed = hub.nsml("GET", "events", token).json()["events"]
    failures = [e for e in feed if e["kind"] == "failure" and e["session"] == name]
    assert failures and failures[0]["state"] == "failed"
    assert "ValueError" in failures[0]["message"]
    # The session token was revoked; the allocation released.
    placements = hub.nsml("GET", "placements", token).json()["placements"]
    assert placements and all(p["state"] == "released" for p in placements), placements


def test_a_script_past_its_memory_limit_ends_oom_killed(hub: HubProcess, project: Path) -> None:
    nsml = cli_for(hub, hub.user_token("se-carol"), project)
    name = nsml("run", "--memory", "128M", "oom.py").stdout.strip()
    st = wait_state(nsml, name)
    assert st["state"] == "oom_killed", (st, logs(nsml, name))
    assert st["exit_code"] == 137 and "128 MiB memory limit" in st["message"]
    assert "survived" not in logs(nsml, name)


def test_stop_sends_sigterm_the_save_handler_runs_then_resume_loads_it(
    hub: HubProcess, project: Path
) -> None:
    token = hub.user_token("se-dave")
    nsml = cli_for(hub, token, project)
    name = nsml(
        "run", "--gpus", "1", "train.py", "--", "--epochs", "1000", "--sleep", "0.05"
    ).stdout.strip()
    running = wait_for(
        lambda: (st := status(nsml, name))["points"] >= 10 and st,
        timeout=120,
        what="a few reports",
    )
    assert [g["index"] for g in running["gpu_use"]] == [int(running["gpu_ids"][0])], running
    assert "utilization_pct" in running["gpu_use"][0]
    assert json.loads(nsml("stop", name, "--json").stdout)["stop_requested"] is True
    st = wait_state(nsml, name)
    out = logs(nsml, name)
    assert st["state"] == "stopped" and st["reason"] == "stopped", (st, out)
    assert "SIGTERM" in out and f"saved checkpoint {name}/stopped" in out, out
    saved = [c["name"] for c in json.loads(nsml("model", name, "--json").stdout)]
    assert saved[-1] == "stopped", saved

    # Resume: the same session runs again from the checkpoint saved at the stop.
    resumed = json.loads(nsml("resume", name, "--json").stdout)
    assert resumed["attempt"] == 2 and resumed["load_from"] == f"{name}/stopped"
    wait_for(lambda: "loaded" in logs(nsml, name), timeout=120, what="the resumed run loads")
    nsml("stop", name, "--wait")
    assert status(nsml, name)["state"] == "stopped"


def test_another_user_cannot_see_stop_fork_or_read_a_private_session(
    hub: HubProcess, project: Path
) -> None:
    owner = hub.user_token("se-erin")
    other = hub.user_token("se-frank")
    nsml = cli_for(hub, owner, project)
    name = nsml("run", "train.py", "--", "--epochs", "1000", "--sleep", "0.1").stdout.strip()
    wait_state(nsml, name, ("running",))
    for method, path, body in (
        ("GET", f"sessions/{name}", None),
        ("POST", f"sessions/{name}/stop", None),
        ("POST", f"sessions/{name}/fork", {}),
        ("GET", f"sessions/{name}/logs", None),
        ("GET", f"sessions/{name}/metrics", None),
        ("GET", f"sessions/{name}/checkpoints", None),
        ("DELETE", f"sessions/{name}", None),
        ("PATCH", f"sessions/{name}", {"memo": "mine now"}),
        ("POST", f"sessions/{name}/exec", {"command": ["id"]}),
        ("GET", f"sessions/diff?a={name}&b={name}", None),
    ):
        r = hub.nsml(method, path, other, json=body)
        assert_json_error(r, 403, "forbidden")
    assert name not in [s["name"] for s in hub.nsml("GET", "sessions", other).json()["sessions"]]
    assert_json_error(hub.nsml("GET", "sessions?all=1", other), 403, "forbidden")
    many = hub.nsml("GET", f"metrics?sessions={name}", other).json()
    assert many == {"metrics": [], "errors": {name: f"Session {name} belongs to another user."}}
    # An admin may.
    assert hub.nsml("GET", f"sessions/{name}", hub.user_token("admin")).status_code == 200

    # A public session can be read and forked, but not stopped, by others.
    assert hub.nsml("PATCH", f"sessions/{name}", owner, json={"visibility": "public"}).ok
    assert hub.nsml("GET", f"sessions/{name}/logs", other).status_code == 200
    assert_json_error(hub.nsml("POST", f"sessions/{name}/stop", other), 403, "forbidden")
    nsml("stop", name, "--wait")


def test_the_session_token_only_reports_saves_and_loads_for_its_session(
    hub: HubProcess, project: Path
) -> None:
    owner = hub.user_token("se-gina")
    nsml = cli_for(hub, owner, project)
    name = nsml("run", "train.py", "--", "--epochs", "1000", "--sleep", "0.1").stdout.strip()
    other = nsml("run", "fail.py").stdout.strip()
    wait_state(nsml, name, ("running",))
    env = dict(
        line.split("=", 1)
        for line in nsml("exec", name, "--", "env").stdout.splitlines()
        if "=" in line
    )
    token = env["NSML_TOKEN"]
    assert token.startswith("nsmls_") and env["NSML_SESSION"] == name
    assert env["NSML_API_URL"].startswith("http://127.0.0.1:")
    api = env["NSML_API_URL"].rstrip("/")

    import requests

    def call(method: str, path: str, **kw: Any) -> requests.Response:
        return requests.request(
            method, f"{api}/{path}", headers={"Authorization": f"token {token}"}, timeout=30, **kw
        )

    ok = call("POST", f"sessions/{name}/metrics", json={"points": [[None, time.time(), {"x": 1}]]})
    assert ok.status_code == 200 and ok.json() == {"accepted": 1, "duplicate": False}, ok.text
    assert_json_error(call("GET", "sessions"), 403, "forbidden")
    assert_json_error(call("GET", f"metrics?sessions={name}"), 403, "forbidden")
    assert_json_error(call("GET", f"sessions/{name}"), 403, "forbidden")
    assert_json_error(call("POST", f"sessions/{name}/stop"), 403, "forbidden")
    assert_json_error(call("GET", f"sessions/{name}/logs"), 403, "forbidden")
    assert_json_error(
        call("POST", f"sessions/{other}/metrics", json={"points": []}), 403, "forbidden"
    )
    assert_json_error(call("PUT", f"sessions/{other}/checkpoints/x", data=b""), 403, "forbidden")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    assert call("PUT", f"sessions/{name}/checkpoints/mine", data=buf.getvalue()).status_code == 201
    assert call("GET", f"sessions/{name}/checkpoints/mine").status_code == 200
    nsml("stop", name, "--wait")
    assert_json_error(
        call("POST", f"sessions/{name}/metrics", json={"points": []}), 401, "unauthenticated"
    )


def test_bad_requests_are_4xx_json_that_say_what_to_do(hub: HubProcess, project: Path) -> None:
    token = hub.user_token("se-hank")
    nsml = cli_for(hub, token, project)
    # Upload the code once through the API.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = TRAIN_PY.encode()
        info = tarfile.TarInfo("train.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    r = hub.nsml("POST", "code", token, data=buf.getvalue())
    assert r.status_code == 201, r.text
    code = r.json()["digest"]
    base = {"code": code, "entry": "train.py"}
    # A snapshot that was never uploaded: 404 that says what to do.
    err = assert_json_error(
        hub.nsml("POST", "sessions", token, json={"code": "0" * 64, "entry": "train.py"}), 404
    )
    assert "upload it first" in err["message"], err
    cases = [
        ({**base, "entry": "missing.py"}, "not in the code snapshot"),
        ({**base, "entry": "../etc/passwd"}, "inside the code snapshot"),
        ({**base, "gpus": 1.5}, "whole number"),
        ({**base, "memory": "lots"}, "memory"),
        ({**base, "datasets": ["bad name!"]}, "bad name!"),
        ({**base, "datasets": ["mnist-x", "mnist-x@1"]}, "asked for twice"),
        ({**base, "surprise": 1}, "unknown field"),
    ]
    for body, words in cases:
        r = hub.nsml("POST", "sessions", token, json=body)
        err = assert_json_error(r, 400)
        assert words in err["message"], (body, err)
    # A dataset the user cannot read (or that does not exist): 404 that says what to do.
    err = assert_json_error(
        hub.nsml("POST", "sessions", token, json={**base, "datasets": ["nobody-has-this"]}), 404
    )
    assert "nobody-has-this" in err["message"] and "nsml dataset ls" in err["message"], err
    assert hub.nsml("GET", "sessions", token).json()["sessions"] == [], "nothing half-created"

    # A snapshot with a link or a path that leaves the folder is refused.
    for member in ("../evil.py", "/abs.py"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(member)
            tar.addfile(info, io.BytesIO(b""))
        assert_json_error(hub.nsml("POST", "code", token, data=buf.getvalue()), 400)
    assert_json_error(hub.nsml("POST", "code", token, data=b"not a tar"), 400)

    # State conflicts.
    name = json.loads(
        nsml("run", "train.py", "--json", "--", "--epochs", "1000", "--sleep", "0.1").stdout
    )["name"]
    wait_state(nsml, name, ("running",))
    assert (
        "stop it first"
        in assert_json_error(hub.nsml("DELETE", f"sessions/{name}", token), 409)["message"]
    )
    assert_json_error(hub.nsml("POST", f"sessions/{name}/resume", token), 409, "conflict")
    err = assert_json_error(
        hub.nsml("POST", f"sessions/{name}/fork", token, json={"checkpoint": "nope"}), 404
    )
    assert "no checkpoint 'nope'" in err["message"]
    assert_json_error(hub.nsml("GET", f"sessions/{name}/logs?offset=x", token), 400)
    assert_json_error(hub.nsml("GET", "sessions?state=sleeping", token), 400)
    assert_json_error(hub.nsml("GET", "sessions/se-hank/_/999", token), 404, "not_found")
    bad = hub.nsml(
        "POST", f"sessions/{name}/metrics", token, json={"points": [[0, 1.0, {"x": "y"}]]}
    )
    assert "not a number" in assert_json_error(bad, 400)["message"]
    nsml("rm", "--force", name)
    r = nsml("status", "nope/1", check=False)
    assert r.returncode == 2 and "No session" in r.stderr
    r = nsml("run", "missing.py", check=False)
    assert r.returncode == 2 and "not a file" in r.stderr

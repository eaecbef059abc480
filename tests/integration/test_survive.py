"""Training outlives the control plane, and checkpoints are what they claim to be: a real hub,
real containers, the NSML service SIGKILLed while sessions report, save and end.

The hub restarts its managed service when it polls it (every 30 s). To make the outage
certain, a test pauses the hub (SIGSTOP) around the kill, so that nothing restarts the
service before the test resumes the hub: sessions meet a dead server for as long as the test
says, then a fresh one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import sqlite3
import tarfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_hub import assert_json_error
from tests.integration.test_sessions import Cli, cli_for, logs, status, wait_state

pytestmark = [pytest.mark.hub, pytest.mark.docker]

TRAIN_PY = """
import json, os, sys, time
import nsml

steps = int(sys.argv[1])
state = {"step": -1}

def save(folder):
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f)

def load(folder):
    with open(os.path.join(folder, "state.json")) as f:
        state.update(json.load(f))

nsml.bind(save=save, load=load)
for step in range(steps):
    state["step"] = step
    nsml.report(step=step, loss=1.0 / (step + 1), diverged=float("nan"), blowup=float("-inf"))
    nsml.save(step)
    print("step", step, flush=True)
    time.sleep(1)
for step in range(steps):
    nsml.load(step)
    assert state["step"] == step, (step, state)
print("loaded every checkpoint", flush=True)
"""

ENDS_PY = """
import os, sys, time
print("ready", flush=True)
# Ends when the test says so (it creates /tmp/go inside the container once the service is
# down), not after a fixed time that a slow machine may spend before the service is killed.
deadline = time.time() + 600
while not os.path.exists("/tmp/go") and time.time() < deadline:
    time.sleep(0.1)
for i in range(20):
    print("line", i, flush=True)
    time.sleep(0.05)
sys.exit(int(sys.argv[1]))
"""

WAIT_PY = """
import time
print("waiting", flush=True)
time.sleep(600)
"""


# The sessions ask for half a CPU: the shared hub's one node has as many CPUs as the machine
# (two on a CI runner), and the second session of a test must not wait for what another
# test's work holds there.


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text(TRAIN_PY)
    (folder / "ends.py").write_text(ENDS_PY)
    (folder / "wait.py").write_text(WAIT_PY)
    return folder


def service_pid(hub: HubProcess) -> int | None:
    """The pid of the hub's ``nsml`` managed service (a child of the hub), if it runs."""
    assert hub.proc is not None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == hub.proc.pid and fields[0] != "Z" and b"nsml_server.app" in cmdline:
            return int(entry.name)
    return None


def service_answers(hub: HubProcess) -> bool:
    try:
        return requests.get(f"{hub.nsml_api}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def service_killed(hub: HubProcess) -> Iterator[int]:
    """SIGKILL the NSML service with the hub paused (it cannot restart it meanwhile); on
    leaving, resume the hub and wait until a new service process answers."""
    assert hub.proc is not None
    old = service_pid(hub)
    assert old is not None, "the nsml service runs"
    os.kill(hub.proc.pid, signal.SIGSTOP)
    try:
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: service_pid(hub) != old, 10, 0.1, "the service to die")
        yield old
    finally:
        # Also when the block failed: the next test needs a service that answers.
        os.kill(hub.proc.pid, signal.SIGCONT)
        wait_for(
            lambda: service_pid(hub) not in (None, old) and service_answers(hub),
            timeout=120,
            interval=0.5,
            what="the hub to restart the nsml service",
        )


def container_of(docker_client: Any, hub: HubProcess, name: str) -> Any:
    """The container of session *name* of this hub (an engine may hold other runs' too)."""
    prefix = hub.env_overrides["NSML_CONTAINER_PREFIX"] + "-"
    found = [
        c
        for c in docker_client.containers.list(
            all=True, filters={"label": f"org.jupyter-nsml.session={name}"}
        )
        if c.name.startswith(prefix)
    ]
    assert len(found) == 1, [(c.name, c.labels) for c in found]
    return found[0]


def test_a_session_that_reports_and_saves_every_second_outlives_a_killed_service(
    hub: HubProcess, project: Path, docker_client: Any
) -> None:
    token = hub.user_token("sv-alice")
    nsml = cli_for(hub, token, project)
    steps = 12
    name = nsml("run", "--cpu", "0.5", "train.py", "--", str(steps)).stdout.strip()
    wait_for(lambda: status(nsml, name)["points"] >= 3, 120, 0.5, "a few reports")
    with service_killed(hub):
        time.sleep(8)  # the session reports and saves into a dead server meanwhile
        c = container_of(docker_client, hub, name)
        c.reload()
        assert c.status == "running", "training goes on while the service is down"
    st = wait_state(nsml, name, timeout=180)
    out = logs(nsml, name)
    assert st["state"] == "completed" and st["exit_code"] == 0, (st, out)

    # Every step's point stored exactly once; the NaN kept as "nan".
    assert st["points"] == steps and st["last_step"] == steps - 1, st
    assert st["last_metrics"]["diverged"] == "nan", st["last_metrics"]
    assert st["last_metrics"]["blowup"] == "-inf", st["last_metrics"]
    series = hub.nsml("GET", f"sessions/{name}/metrics", token).json()["series"]
    assert series["loss"]["steps"] == list(range(steps)), series["loss"]["steps"]
    assert series["diverged"]["values"] == ["nan"] * steps
    assert series["blowup"]["values"] == ["-inf"] * steps
    assert "diverged=nan" in nsml("ps").stdout
    assert "diverged=nan blowup=-inf" in nsml("status", name).stdout

    # Every checkpoint is there, and loads (the script loaded each one back at its end).
    saved = json.loads(nsml("model", name, "--json").stdout)
    assert [c["name"] for c in saved] == [str(i) for i in range(steps)], saved
    assert "loaded every checkpoint" in out, out
    dest = project / "pulled"
    where = Path(nsml("pull", f"{name}/{steps - 1}", str(dest)).stdout.strip())
    assert json.loads((where / "state.json").read_text()) == {"step": steps - 1}

    # The log is whole and says what the SDK waited for.
    for i in range(steps):
        assert f"step {i}\n" in out, (i, out)
    assert "[nsml] the NSML server is unreachable" in out, out
    assert "answered again after" in out, out
    assert "ended completed (exit code 0)" in out
    assert "Traceback" not in out, out


def test_sessions_that_end_while_the_service_is_down_get_their_state_exit_code_and_logs(
    hub: HubProcess, project: Path, docker_client: Any
) -> None:
    token = hub.user_token("sv-bob")
    nsml = cli_for(hub, token, project)
    good = nsml("run", "--cpu", "0.5", "ends.py", "--", "0").stdout.strip()
    bad = nsml("run", "--cpu", "0.5", "ends.py", "--", "3").stdout.strip()
    for name in (good, bad):
        wait_for(lambda name=name: "ready" in logs(nsml, name), 120, 0.3, f"{name} ready")
    with service_killed(hub):
        for name in (good, bad):
            c = container_of(docker_client, hub, name)
            c.reload()
            assert c.status == "running", f"{name} still runs when the service dies"
        for name in (good, bad):
            c = container_of(docker_client, hub, name)
            assert c.exec_run(["touch", "/tmp/go"]).exit_code == 0
        for name in (good, bad):
            c = container_of(docker_client, hub, name)
            assert c.wait(timeout=60)["StatusCode"] in (0, 3)
        resumed_at = datetime.now(UTC).replace(tzinfo=None)
    for name, state, code in ((good, "completed", 0), (bad, "failed", 3)):
        st = wait_state(nsml, name, timeout=120)
        out = logs(nsml, name)
        assert (st["state"], st["exit_code"]) == (state, code), (st, out)
        lines = [ln for ln in out.splitlines() if ln.startswith("line ")]
        assert lines == [f"line {i}" for i in range(20)], out
        assert f"ended {state} (exit code {code})" in out, out
        finished = datetime.fromisoformat(st["finished"].rstrip("Z"))
        assert finished <= resumed_at, "the end is when the container ended, not when seen"
        # Points measured after the end are refused; the session's own token is revoked.
        late = {"steps": [0], "walls": [time.time()], "values": {"x": [1.0]}}
        r = hub.nsml("POST", f"sessions/{name}/metrics", token, json=late)
        assert f"Session {name} has ended ({state})" in assert_json_error(r, 409)["message"]
    with contextlib.suppress(Exception):
        nsml("rm", good, bad)


# ---- checkpoints ------------------------------------------------------------------------------


def tar_of(*members: tarfile.TarInfo | tuple[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def claims(name: str, size: int) -> bytes:
    """An archive whose one member claims *size* bytes it does not hold."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.PAX_FORMAT) + b"\0" * 1024


def many(n: int) -> bytes:
    return b"".join(tarfile.TarInfo(f"f{i}").tobuf() for i in range(n)) + b"\0" * 1024


#: (case, body, status, reason, words of the message); the default limits: 20 GiB and
#: 100,000 members.
MALICIOUS = [
    ("not an archive", b"#!/bin/sh\nrm -rf /\n" * 50, 400, "bad_request", "not a tar archive"),
    ("a path that climbs out", tar_of(("../x", b"e")), 400, "bad_request", "'../x' leaves"),
    ("an absolute path", tar_of(("/abs", b"e")), 400, "bad_request", "'/abs' has an absolute"),
    (
        "a symbolic link to /etc/shadow",
        tar_of(special("s", tarfile.SYMTYPE, "/etc/shadow")),
        400,
        "bad_request",
        "'s' is a symbolic link (to '/etc/shadow')",
    ),
    (
        "a hard link to /etc/shadow",
        tar_of(special("h", tarfile.LNKTYPE, "/etc/shadow")),
        400,
        "bad_request",
        "'h' is a hard link (to '/etc/shadow')",
    ),
    (
        "a device",
        tar_of(special("d", tarfile.BLKTYPE), gz=True),
        400,
        "bad_request",
        "'d' is a device",
    ),
    ("a file that claims 25 GiB", claims("huge.bin", 25 << 30), 413, "too_large", "'huge.bin'"),
    ("100,001 members", b"many", 413, "too_large", "more than 100000 files"),
]


def session_token(nsml: Cli, name: str) -> str:
    env = dict(
        line.split("=", 1)
        for line in nsml("exec", name, "--", "env").stdout.splitlines()
        if "=" in line
    )
    return env["NSML_TOKEN"]


def test_a_malicious_checkpoint_is_refused_at_upload_naming_the_member(
    hub: HubProcess, project: Path
) -> None:
    owner = hub.user_token("sv-carol")
    nsml = cli_for(hub, owner, project)
    name = nsml("run", "--cpu", "0.5", "wait.py").stdout.strip()
    wait_state(nsml, name, ("running",))
    token = session_token(nsml, name)
    url = f"sessions/{name}/checkpoints"
    for case, body, code, reason, words in MALICIOUS:
        body = many(100_001) if body == b"many" else body  # 51 MB: built only here
        err = assert_json_error(hub.nsml("PUT", f"{url}/bad", token, data=body), code, reason)
        assert words in err["message"], (case, err)
    assert json.loads(nsml("model", name, "--json").stdout) == [], "nothing was recorded"
    # A good one goes in, and a retry of it (same name, same bytes) leaves one checkpoint.
    good = tar_of(("w.bin", b"weights"))
    sha = hashlib.sha256(good).hexdigest()
    for _ in range(2):
        r = hub.nsml("PUT", f"{url}/ok", token, data=good, headers={"X-Checkpoint-SHA256": sha})
        assert r.status_code == 201, r.text
    bad_sha = {"X-Checkpoint-SHA256": "0" * 64}
    err = assert_json_error(hub.nsml("PUT", f"{url}/ok2", token, data=good, headers=bad_sha), 400)
    assert "arrived damaged" in err["message"], err
    assert [c["name"] for c in json.loads(nsml("model", name, "--json").stdout)] == ["ok"]
    nsml("stop", name, "--wait")


def test_a_checkpoint_damaged_in_the_store_fails_pull_in_one_line_leaving_nothing(
    hub: HubProcess, project: Path
) -> None:
    owner = hub.user_token("sv-erin")
    nsml = cli_for(hub, owner, project)
    name = nsml("run", "--cpu", "0.5", "wait.py").stdout.strip()
    wait_state(nsml, name, ("running",))
    token = session_token(nsml, name)
    good = tar_of(("state.json", b'{"epoch": 1}'), ("w.bin", os.urandom(4096)))
    for ckpt in ("same-size", "truncated", "evil"):
        r = hub.nsml("PUT", f"sessions/{name}/checkpoints/{ckpt}", token, data=good)
        assert r.status_code == 201, r.text
    nsml("stop", name, "--wait")

    # Behind the server's back: one blob file replaced by bytes of the same size, one cut
    # short, and one checkpoint's record pointed at a link to /etc/shadow.
    blobs = hub.state_dir / "artifacts" / "blobs"
    evil = tar_of(special("shadow", tarfile.SYMTYPE, "/etc/shadow"))
    evil_sha = hashlib.sha256(evil).hexdigest()
    (blobs / evil_sha[:2]).mkdir(exist_ok=True)
    (blobs / evil_sha[:2] / evil_sha[2:]).write_bytes(evil)
    db = sqlite3.connect(hub.state_dir / "nsml.sqlite")
    with db:
        db.execute(
            "UPDATE session_checkpoints SET sha256 = ?, size = ? WHERE name = 'evil' AND "
            "session_id = (SELECT id FROM sessions WHERE name = ?)",
            (evil_sha, len(evil), name),
        )
    db.close()
    sha = hashlib.sha256(good).hexdigest()
    blob = blobs / sha[:2] / sha[2:]
    blob.chmod(0o644)
    blob.write_bytes(good[:1000])  # the store holds the good bytes once: both now point here
    cases = [("truncated", "damaged in the server's store")]
    for ckpt, words in cases:
        dest = project / f"out-{ckpt}"
        dest.mkdir()
        r = nsml("pull", f"{name}/{ckpt}", str(dest), check=False)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
        assert list(dest.iterdir()) == []
    blob.write_bytes(os.urandom(len(good)))  # now the same size, other bytes
    for ckpt, words in (
        ("same-size", "is damaged"),
        ("evil", "'shadow' is a symbolic link (to '/etc/shadow')"),
    ):
        dest = project / f"out-{ckpt}"
        dest.mkdir()
        r = nsml("pull", f"{name}/{ckpt}", str(dest), check=False)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert list(dest.iterdir()) == []
    r = nsml("pull", f"{name}/evil", "/proc/self", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "/proc/self" in r.stderr, r

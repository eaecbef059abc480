"""Sessions mount datasets: read-only, as visible to their owner, with the version they name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_datasets import User, user

pytestmark = [pytest.mark.hub, pytest.mark.docker]

READ_PY = """
import os, nsml
print("paths", sorted(nsml.DATASET_PATHS.items()))
print("content", open(os.path.join(nsml.DATASET_PATH, "a.txt")).read())
try:
    open(os.path.join(nsml.DATASET_PATH, "b.txt"), "w")
except OSError as e:
    print("write refused:", e.strerror)
"""


def finished(u: User, name: str) -> dict[str, object]:
    return dict(
        wait_for(
            lambda: (
                (st := u.json("status", name))["state"]
                in ("completed", "failed", "oom_killed", "stopped", "lost")
                and st
            ),
            timeout=120,
            what=f"{name} ended",
        )
    )


def test_a_session_reads_its_datasets_read_only_and_another_user_needs_them_shared(
    hub: HubProcess,
    work: Path,
) -> None:
    owner, other = user(hub, "sd-owner"), user(hub, "sd-other")
    data = work / "data"
    data.mkdir()
    (data / "a.txt").write_text("version one")
    assert owner.nsml("dataset", "push", "sd-corpus", str(data)).stdout.strip() == "sd-corpus@1"
    (data / "a.txt").write_text("version two")
    assert owner.nsml("dataset", "push", "sd-corpus", str(data)).stdout.strip() == "sd-corpus@2"
    code = work / "code"
    code.mkdir()
    (code / "read.py").write_text(READ_PY)

    def run(u: User, *args: str, check: bool = True) -> str:
        r = u.nsml("run", "--folder", str(code), *args, "read.py", check=check)
        return r.stdout.strip() if check else r.stderr

    # The owner's session mounts the version asked for, read-only.
    name = run(owner, "-d", "sd-corpus@1")
    assert name == "sd-owner/sd-corpus/1"
    st = finished(owner, name)
    out = owner.nsml("logs", name).stdout
    assert st["state"] == "completed", (st, out)
    assert st["datasets"] == ["sd-corpus@1"]
    assert "content version one" in out and "write refused: Read-only file system" in out, out
    assert "('sd-corpus', '/data/sd-corpus')" in out, out
    # 'name' alone means the newest version, recorded as such.
    latest = run(owner, "-d", "sd-corpus")
    assert finished(owner, latest)["datasets"] == ["sd-corpus@2"]
    assert "content version two" in owner.nsml("logs", latest).stdout

    # Another user cannot mount a private dataset: refused up front, nothing queued.
    err = run(other, "-d", "sd-corpus", check=False)
    assert "sd-corpus" in err and "Traceback" not in err, err
    assert json.loads(other.nsml("ps", "--json").stdout) == []
    # ... and can once it is public.
    owner.nsml("dataset", "share", "sd-corpus", "--public")
    theirs = run(other, "-d", "sd-corpus@1")
    assert finished(other, theirs)["state"] == "completed"
    assert "content version one" in other.nsml("logs", theirs).stdout

    # A dataset a live session uses cannot be removed; once it ended, it can.
    (code / "sleep.py").write_text("import time\nprint('up', flush=True)\ntime.sleep(120)\n")
    live = owner.nsml("run", "--folder", str(code), "-d", "sd-corpus@2", "sleep.py").stdout.strip()
    wait_for(lambda: owner.json("status", live)["state"] == "running", timeout=60, what="running")
    r = owner.nsml("dataset", "rm", "sd-corpus@2", check=False)
    assert r.returncode != 0 and "sd-corpus@2" in r.stderr and "use" in r.stderr, r.stderr
    owner.nsml("stop", live, "--wait")
    owner.nsml("rm", name, latest, live)
    other.nsml("rm", theirs)
    owner.nsml("dataset", "rm", "sd-corpus")
    assert "sd-corpus" not in [d["name"] for d in owner.json("dataset", "ls")]

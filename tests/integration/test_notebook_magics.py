"""%nsml in a real IPython kernel inside a spawned notebook server's container.

The kernel is started with jupyter_client inside the container (as the notebook server would
start it), so it has the server's environment (NSML_API_URL, the server's token) and the
image's IPython configuration, which loads the magics without ``%load_ext``.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tarfile
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_sessions import TRAIN_PY
from tests.integration.test_spawner import containers, ready, servers, spawn  # noqa: F401

pytestmark = [pytest.mark.hub, pytest.mark.docker]

# Runs inside the container: starts a kernel, executes the cells given on stdin one by one and
# prints, per cell, its status, its text output, the MIME types it displayed and its error.
DRIVER = r"""
import json, sys
from jupyter_client.manager import start_new_kernel

given = json.load(sys.stdin)
cells, cwd = given["cells"], given["cwd"]
km, kc = start_new_kernel(cwd=cwd)
results = []
try:
    for code in cells:
        out = []
        reply = kc.execute_interactive(code, timeout=180, output_hook=out.append)
        results.append({
            "status": reply["content"]["status"],
            "text": "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream"),
            "mimes": sorted({k for m in out if m["msg_type"] in ("display_data", "execute_result")
                             for k in m["content"]["data"]}),
            "html": "".join(m["content"]["data"].get("text/html", "") for m in out
                            if m["msg_type"] in ("display_data", "execute_result")),
            "error": next((m["content"]["ename"] + ": " + m["content"]["evalue"] for m in out
                           if m["msg_type"] == "error"), None),
        })
        if reply["content"]["status"] != "ok":
            break
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
print("RESULTS " + json.dumps(results))
"""


def put_files(container: Any, folder: str, files: dict[str, str]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size, info.uid, info.gid, info.mode = len(data), 1000, 100, 0o644
            tar.addfile(info, io.BytesIO(data))
    container.exec_run(["mkdir", "-p", f"/home/jovyan/{folder}"], user="1000")
    assert container.put_archive("/home/jovyan", buf.getvalue())


def demultiplex(stream: bytes) -> bytes:
    """The payload of Docker's multiplexed exec stream: frames of an 8-byte header (stream
    id, three zero bytes, a big-endian length) and that many bytes. A long line is cut
    across frames, so the headers must be removed, not skipped line by line."""
    out = []
    at = 0
    while at + 8 <= len(stream):
        size = int.from_bytes(stream[at + 4 : at + 8], "big")
        out.append(stream[at + 8 : at + 8 + size])
        at += 8 + size
    return b"".join(out)


def run_cells(
    container: Any, cells: list[str], cwd: str = "/home/jovyan/proj"
) -> list[dict[str, Any]]:
    """Run *cells* one by one in a new kernel started in *cwd* inside *container*."""
    exec_id = container.client.api.exec_create(
        container.id, ["python", "-c", DRIVER], user="1000", stdin=True, workdir="/home/jovyan"
    )
    sock = container.client.api.exec_start(exec_id, socket=True)
    raw = sock._sock
    # The cells run for minutes without output (they wait for sessions): not the client's
    # 30 s read timeout; a long one of the test's own.
    raw.settimeout(900)
    raw.sendall(json.dumps({"cells": cells, "cwd": cwd}).encode())
    raw.shutdown(1)  # end of stdin
    chunks = []
    while data := raw.recv(65536):
        chunks.append(data)
    raw.close()
    text = demultiplex(b"".join(chunks)).decode(errors="replace")
    line = next((ln for ln in text.splitlines() if "RESULTS " in ln), None)
    assert line is not None, text[-4000:]
    return list(json.loads(line.split("RESULTS ", 1)[1]))


def test_a_kernel_runs_a_session_follows_it_forks_it_and_diffs_them(
    hub: HubProcess,
    servers: list[str],  # noqa: F811
    containers: Callable[[str], Any],  # noqa: F811
) -> None:
    user = "nb-kim"
    servers.append(user)
    r = spawn(hub, user, gpus=0)
    assert r.status_code in (201, 202), r.text
    wait_for(lambda: ready(hub, user), timeout=120, what=f"{user}'s server ready")
    container = containers(user)
    put_files(container, "proj", {"train.py": TRAIN_PY})

    cells = [
        "import pathlib\np = pathlib.Path('data'); p.mkdir(exist_ok=True)\n"
        "(p / 'hello.txt').write_text('hi from the dataset')",
        "%nsml dataset push nbdata data",
        "%nsml run --gpus 2 --cpu 0.5 --memory 512M -d nbdata train.py -- --lr 0.1",
        "from nsml import Client, sessions\nc = Client()\nname = sessions.getid(c)\n"
        "st = sessions.wait(c, name, timeout=150)\nprint(st['state'], st['last_step'])",
        "%nsml ps",
        "%nsml status $name",
        "%nsml logs $name",
        "%nsml fork $name/1 -- --lr 0.01 --epochs 1",
        "child = sessions.getid(c)\nprint(sessions.wait(c, child, timeout=150)['state'])",
        "%nsml logs $child",
        "%nsml diff $name $child",
        "%%nsml run --cpu 0.5 -d nbdata\nimport os, nsml\n"
        "print(open(os.path.join(nsml.DATASET_PATH, 'hello.txt')).read())\n"
        "try:\n    open(os.path.join(nsml.DATASET_PATH, 'new.txt'), 'w')\n"
        "except OSError as e:\n    print('write refused:', e.strerror)",
        "cell = sessions.getid(c)\nprint(sessions.wait(c, cell, timeout=150)['state'])\n"
        "print(sessions.logs(c, cell)['text'])",
        "%nsml gpustat",
        "%nsml bogus",
    ]
    res = run_cells(container, cells)
    assert len(res) == len(cells), res
    (_, push, run, waited, ps, status, logs, fork, child_wait, child_logs, diff, cell_run,
     cell_out, gpustat, bogus) = res  # fmt: skip

    # dataset push from the notebook: NAME@k, with a progress widget.
    assert push["status"] == "ok" and "nbdata@1" in push["text"], push
    assert "application/vnd.jupyter.widget-view+json" in push["mimes"], push

    # run: prints the name, what the code upload took, and shows a live status widget; the
    # kernel is not blocked.
    assert run["status"] == "ok", run
    name, note = run["text"].strip().splitlines()[:2]
    assert name == f"{user}/nbdata/1", run
    assert note.startswith("code: 2 files, ") and note.endswith(" from /home/jovyan/proj"), run
    assert "application/vnd.jupyter.widget-view+json" in run["mimes"], run
    assert waited["text"].split() == ["completed", "9"], waited

    assert name in ps["text"] and "completed" in ps["text"], ps
    assert "loss" in status["html"] and "completed" in status["html"], status
    assert "lr 0.1 GPUS 0,1" in logs["text"] and "done" in logs["text"], logs

    assert fork["status"] == "ok" and fork["text"].strip().splitlines()[0] == f"{user}/nbdata/2"
    assert child_wait["text"].strip() == "completed", child_wait
    assert "loaded" in child_logs["text"] and "lr 0.01" in child_logs["text"], child_logs
    # diff: the arguments as a table of name, A and B (the code is the same).
    table = [line.split() for line in diff["text"].splitlines()]
    assert table[0] == ["NAME", name, f"{user}/nbdata/2"], diff
    assert ["--lr", "0.1", "0.01"] in table and ["--epochs", "-", "1"] in table, diff

    # %%nsml run: the cell is the script; the dataset is mounted read-only at DATASET_PATH.
    assert cell_run["text"].strip().splitlines()[0] == f"{user}/nbdata/3", cell_run
    assert cell_out["text"].startswith("completed"), cell_out
    assert "hi from the dataset" in cell_out["text"], cell_out
    assert "write refused: Read-only file system" in cell_out["text"], cell_out

    # gpustat: the cluster's GPUs (the test hub's node has 4 virtual ones), index 0 included.
    assert gpustat["html"].count("local-test") == 4 and "ALLOCATED" in gpustat["html"], gpustat
    assert "<td style='text-align:left'>0</td>" in gpustat["html"], gpustat
    local_rows = [row for row in gpustat["html"].split("<tr>") if "local-test" in row]
    assert len(local_rows) == 4 and all("(virtual)" in row for row in local_rows), gpustat

    # A mistake is one line (UsageError), not a traceback.
    said = (bogus["error"] or "") + bogus["text"]
    assert bogus["status"] == "error" and "UsageError" in said, bogus
    assert "choose from" in said and "Traceback" not in said, bogus


# Cells that make a home folder look as it does after a while in JupyterLab and keep it busy,
# as a newcomer's is: a kernel writing its history (IPython's SQLite database, whose journal
# file comes and goes with every transaction), tool state with some MB in .local and .cache,
# a virtual environment, and a run folder where files appear, grow and vanish.
BUSY_HOME = r"""
import os, pathlib, sqlite3, subprocess, sys, threading, time
home = pathlib.Path.home()
for rel, mb in ((".local/share/pkgs/wheels.bin", 6), (".cache/pip/http/blob.bin", 6),
                (".cache/matplotlib/fontlist.bin", 1), (".jupyter/lab/workspaces/w.bin", 1)):
    p = home / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(os.urandom(mb << 20))
subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home / "myenv")], check=True)
(home / "train.py").write_text("import os\nprint('ENTRIES', sorted(os.listdir('.')), flush=True)\n")
hm = get_ipython().history_manager
stop = threading.Event()
written = {"history": 0, "runs": 0}

def write_history():
    db = sqlite3.connect(str(hm.hist_file), timeout=10, isolation_level=None)
    line = 1_000_000
    while not stop.is_set():
        line += 1
        db.execute("BEGIN")
        db.execute("INSERT OR IGNORE INTO history VALUES (?, ?, ?, ?)",
                   (hm.session_number, line, "x = 1", "x = 1"))
        db.execute("COMMIT")
        written["history"] += 1
        time.sleep(0.001)
    db.close()

def churn_runs():
    runs = home / "runs"
    runs.mkdir(exist_ok=True)
    (runs / "config.yaml").write_text("lr: 0.1\n")
    n = 0
    while not stop.is_set():
        n += 1
        (runs / f"step-{n}.log").write_text("loss 0.1\n" * 50)
        with open(runs / "train.log", "a") as f:
            f.write(f"step {n}\n")
        old = runs / f"step-{n - 3}.log"
        if old.exists():
            old.unlink()
        written["runs"] += 1
        time.sleep(0.001)

threads = [threading.Thread(target=f, daemon=True) for f in (write_history, churn_runs)]
for t in threads:
    t.start()
time.sleep(0.5)
print("busy", written["history"] > 0, written["runs"] > 0)
"""

RUNS = 20


def test_run_from_a_busy_home_folder_succeeds_every_time_and_takes_only_code(
    hub: HubProcess,
    servers: list[str],  # noqa: F811
    containers: Callable[[str], Any],  # noqa: F811
) -> None:
    user = "nb-newcomer"
    servers.append(user)
    r = spawn(hub, user, gpus=0)
    assert r.status_code in (201, 202), r.text
    wait_for(lambda: ready(hub, user), timeout=120, what=f"{user}'s server ready")
    container = containers(user)

    cells = [
        BUSY_HOME,
        *["%nsml run --gpus 0 --cpu 0.1 --memory 128M train.py"] * RUNS,
        "stop.set()\nfor t in threads: t.join()\nprint('written', written)",
        "from nsml import Client, sessions\nc = Client()\n"
        "first = sessions.wait(c, sessions.full_name(c, '_/1'), timeout=150)\n"
        "print(first['state'])\nprint(sessions.logs(c, first['name'])['text'])",
        # Every session started (left the queue); those still going are stopped.
        "import time\nstarted, deadline = set(), time.monotonic() + 150\n"
        f"while len(started) < {RUNS} and time.monotonic() < deadline:\n"
        "    started |= {s['name'] for s in sessions.ps(c) if s['state'] != 'queued'}\n"
        "    time.sleep(1)\n"
        "print('started', len(started))\n"
        "for s in sessions.ps(c, state='active'):\n    sessions.stop(c, s['name'])",
    ]
    res = run_cells(container, cells, cwd="/home/jovyan")
    assert len(res) == len(cells), res[-1]
    busy, runs, stopped, first, started = res[0], res[1:-3], res[-3], res[-2], res[-1]
    assert busy["status"] == "ok" and busy["text"].split() == ["busy", "True", "True"], busy

    for i, run in enumerate(runs, start=1):
        said = run["text"] + (run["error"] or "")
        assert run["status"] == "ok" and run["error"] is None, (i, run)
        assert "Traceback" not in said, (i, said)
        lines = run["text"].strip().splitlines()
        assert lines[0] == f"{user}/_/{i}", (i, run)
        # Only code: train.py and the run folder (what of it held still), never the
        # dot-folders' 14 MiB or the virtual environment.
        took = re.fullmatch(
            r"code: \d+ files?, [\d.]+ (B|KiB) uploaded from /home/jovyan", lines[1]
        )
        assert took, (i, lines)
        assert "myenv/ (a virtual environment)" in run["text"], (i, run)
    assert stopped["status"] == "ok", stopped

    # What the first session got in its working folder: no dot-folder, no environment. Its
    # log starts with the runner's line and then the program's own output (no warning from
    # the image's tini).
    said = first["text"].splitlines()
    assert said[0] == "completed", first
    assert said[1].startswith(f"[nsml] {user}/_/1 attempt 1 on ") and said[2].startswith("ENTRIES")
    assert "tini" not in first["text"].lower(), first
    entries_line = next(ln for ln in first["text"].splitlines() if ln.startswith("ENTRIES"))
    entries = ast.literal_eval(entries_line.removeprefix("ENTRIES "))
    assert "train.py" in entries and "runs" in entries, entries
    assert not [e for e in entries if e.startswith(".") or e == "myenv"], entries

    assert started["text"].splitlines()[0] == f"started {RUNS}", started

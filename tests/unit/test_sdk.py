"""The training-code SDK: off the platform (stdout, a local folder) and in a session, where a
script talks to a small HTTP server on loopback that records what the SDK sends."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


@dataclass
class Recorder:
    """What the fake API received: metric points and checkpoints, by session path."""

    points: list[list[Any]] = field(default_factory=list)
    batches: int = 0
    checkpoints: dict[str, bytes] = field(default_factory=dict)
    auth: set[str] = field(default_factory=set)
    fail_first: int = 0
    put_fail_first: int = 0
    digests: dict[str, str] = field(default_factory=dict)


@pytest.fixture()
def api() -> Iterator[tuple[str, Recorder]]:
    rec = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_POST(self) -> None:
            body = self._body()
            rec.auth.add(self.headers["Authorization"])
            if rec.fail_first > 0:
                rec.fail_first -= 1
                self.send_response(503)
                self.end_headers()
                return
            assert self.path == "/api/sessions/u/_/1/metrics", self.path
            cols = json.loads(body)
            for i, step in enumerate(cols["steps"]):
                vals = {k: c[i] for k, c in cols["values"].items() if c[i] is not None}
                rec.points.append([step, cols["walls"][i], vals])
            rec.batches += 1
            self._json(200, {"accepted": len(cols["steps"])})

        def do_PUT(self) -> None:
            name = self.path.split("?")[0].rsplit("/", 1)[-1]
            body = self._body()
            if rec.put_fail_first > 0:
                rec.put_fail_first -= 1
                self._json(503, {"message": "restarting", "reason": "unavailable"})
                return
            rec.checkpoints[name] = body
            rec.digests[name] = self.headers.get("X-Checkpoint-SHA256", "")
            self._json(201, {"name": name})

        def do_GET(self) -> None:
            name = self.path.split("?")[0].rsplit("/", 1)[-1]
            if name not in rec.checkpoints:
                self._json(404, {"message": "no", "reason": "not_found"})
                return
            data = rec.checkpoints[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/", rec
    server.shutdown()
    server.server_close()


def run_script(
    tmp_path: Path, source: str, env: dict[str, str], wait: bool = True
) -> subprocess.Popen[str]:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(source))
    full = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
    full.update(env)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        proc.wait(60)
    return proc


def session_env(url: str) -> dict[str, str]:
    return {
        "NSML_SESSION": "u/_/1",
        "NSML_API_URL": url,
        "NSML_TOKEN": "nsmls_1_secret",
        "NSML_DATASET_PATH": "/data/mnist",
        "NSML_DATASET_PATHS": json.dumps({"mnist": "/data/mnist", "cifar": "/data/cifar"}),
    }


def test_off_the_platform_reports_print_and_checkpoints_stay_in_a_local_folder(
    tmp_path: Path,
) -> None:
    proc = run_script(
        tmp_path,
        """
        import os, nsml
        assert not nsml.IS_ON_NSML and nsml.DATASET_PATH is None and nsml.DATASET_PATHS == {}
        state = {"w": 0}
        def save(d): open(os.path.join(d, "w"), "w").write(str(state["w"]))
        def load(d): state["w"] = int(open(os.path.join(d, "w")).read())
        nsml.bind(save=save, load=load)
        for step in range(3):
            state["w"] += 1
            nsml.report(step=step, loss=1.0 / (step + 1))
        print("saved to", nsml.save(2))
        state["w"] = 0
        nsml.load(2)
        print("w", state["w"])
        """,
        {},
    )
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out
    assert "[nsml] step 0: loss=1" in out and "[nsml] step 2: loss=0.333333" in out, out
    assert "saved to nsml_checkpoints/2" in out and "w 3" in out
    assert (tmp_path / "nsml_checkpoints" / "2" / "w").read_text() == "3"


def test_in_a_session_every_report_reaches_the_server_in_batches_by_exit(
    tmp_path: Path, api: tuple[str, Recorder]
) -> None:
    url, rec = api
    rec.fail_first = 1  # the first batch is refused once: it is sent again
    proc = run_script(
        tmp_path,
        """
        import nsml
        assert nsml.IS_ON_NSML and nsml.SESSION_NAME == "u/_/1"
        assert nsml.DATASET_PATH == "/data/mnist" and nsml.DATASET_NAME == "mnist"
        assert nsml.DATASET_PATHS == {"mnist": "/data/mnist", "cifar": "/data/cifar"}
        for i in range(5000):
            nsml.report(loss=float(i), acc=i % 7)
        nsml.report(step=10_000, loss=float("nan"))
        """,
        session_env(url),
    )
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out
    assert len(rec.points) == 5001, (len(rec.points), out)
    steps = [p[0] for p in rec.points]
    assert steps[:5000] == list(range(5000)) and steps[-1] == 10_000
    assert rec.points[1][2] == {"loss": 1.0, "acc": 1.0}
    assert rec.auth == {"token nsmls_1_secret"}


def test_report_refuses_what_is_not_a_number(tmp_path: Path) -> None:
    proc = run_script(
        tmp_path,
        """
        import nsml
        try:
            nsml.report(step=1, loss="high")
        except TypeError as e:
            print("refused:", e)
        """,
        {},
    )
    out = proc.stdout.read() if proc.stdout else ""
    assert "refused: nsml.report: loss='high' is not a number" in out, out


def test_sigterm_saves_a_checkpoint_sends_the_reports_and_exits(
    tmp_path: Path, api: tuple[str, Recorder]
) -> None:
    url, rec = api
    proc = run_script(
        tmp_path,
        """
        import os, time, nsml
        def save(d): open(os.path.join(d, "model.bin"), "wb").write(b"weights")
        nsml.bind(save=save, load=lambda d: None)
        for step in range(100000):
            nsml.report(step=step, loss=1.0)
            if step == 50:
                print("ready", flush=True)
            time.sleep(0.001)
        """,
        session_env(url),
        wait=False,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    out = proc.stdout.read()
    assert "SIGTERM" in out and "saved checkpoint u/_/1/stopped" in out, out
    with tarfile.open(fileobj=io.BytesIO(rec.checkpoints["stopped"])) as tar:
        assert tar.extractfile("model.bin").read() == b"weights"  # type: ignore[union-attr]
    assert len(rec.points) >= 51 and rec.points[-1][0] == len(rec.points) - 1


def test_bind_loads_the_checkpoint_a_fork_starts_from(
    tmp_path: Path, api: tuple[str, Recorder]
) -> None:
    url, rec = api
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"epoch=7"
        info = tarfile.TarInfo("state.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    rec.checkpoints["7"] = buf.getvalue()
    proc = run_script(
        tmp_path,
        """
        import os, nsml
        def load(d): print("loaded", open(os.path.join(d, "state.txt")).read())
        nsml.bind(save=lambda d: None, load=load)
        print("from", nsml.loaded_checkpoint())
        """,
        {**session_env(url), "NSML_LOAD_FROM": "parent/_/3/7"},
    )
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out
    assert "loaded epoch=7" in out and "from parent/_/3/7" in out, out


def test_save_waits_out_a_restarting_server_and_says_so(
    tmp_path: Path, api: tuple[str, Recorder]
) -> None:
    url, rec = api
    rec.put_fail_first = 2  # answered 503 twice, as a proxy does while the service restarts
    proc = run_script(
        tmp_path,
        """
        import os, nsml
        nsml.bind(save=lambda d: open(os.path.join(d, "w"), "w").write("1"), load=print)
        print("saved", nsml.save(3))
        """,
        session_env(url),
    )
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out
    assert "saved u/_/1/3" in out
    assert (
        "[nsml] the NSML server is unreachable (it answered 503); retrying the upload of "
        "checkpoint 3 for up to 10 min" in out
    ), out
    assert "answered again after" in out and "the upload of checkpoint 3 went through" in out
    import hashlib

    assert rec.digests["3"] == hashlib.sha256(rec.checkpoints["3"]).hexdigest()


def test_an_unreachable_server_fails_save_with_one_clear_exception_after_the_timeout(
    tmp_path: Path,
) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = run_script(
        tmp_path,
        """
        import os, nsml
        nsml.bind(save=lambda d: None, load=print)
        nsml.report(step=0, loss=1.0)
        try:
            nsml.save(1)
        except nsml.CheckpointError as e:
            print("refused:", e.reason, "|", e)
        """,
        {**session_env(f"http://127.0.0.1:{port}/api/"), "NSML_RETRY_TIMEOUT": "1"},
    )
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out
    assert "refused: unreachable | nsml.save('1'): the NSML server did not answer for 1 s" in out
    assert "[nsml] 1 report points were not sent (connection refused)" in out, out
    assert "Traceback" not in out


def test_a_damaged_or_malicious_checkpoint_fails_load_with_one_clear_exception(
    tmp_path: Path, api: tuple[str, Recorder]
) -> None:
    url, rec = api
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("shadow")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(info)
    rec.checkpoints["evil"] = evil.getvalue()
    rec.checkpoints["garbage"] = b"not an archive" * 100
    proc = run_script(
        tmp_path,
        """
        import nsml
        nsml.bind(save=lambda d: None, load=lambda d: print("LOADED", d))
        for name in ("evil", "garbage", "missing"):
            try:
                nsml.load(name)
            except nsml.CheckpointError as e:
                print(name, "->", e.reason, "|", e)
        """,
        session_env(url),
    )
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0 and "LOADED" not in out and "Traceback" not in out, out
    assert "evil -> damaged |" in out and "'shadow' is a symbolic link" in out, out
    assert "garbage -> damaged |" in out, out
    assert "missing -> not_found |" in out, out

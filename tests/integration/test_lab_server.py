"""The sidebar's server extension in a plain ``jupyter server`` process (no hub) when the NSML
service is down or is not what answers: the browser always gets JSON, never a 5xx of the
server's own or an HTML page.

The "service" is whatever listens at the server's ``NSML_API_URL``: nothing at all, or a
loopback HTTP server that answers HTML as a proxy does while the service is down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import wait_for
from tests.integration.hubproc import free_port

TOKEN = "lab-test-token"


class HTMLHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html><body>503 Service Unavailable</body></html>"
        self.send_response(503)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def html_service() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), HTMLHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/services/nsml/api/"
    server.shutdown()


def start_server(api_url: str, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
    env.update(NSML_API_URL=api_url, JUPYTERHUB_API_TOKEN="server-token")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--allow-root",
            "--no-browser",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (root / "server.log").read_text()
        try:
            return requests.get(f"{url}/api", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_for(up, timeout=120, what="jupyter server up")
    return proc, url


@pytest.fixture(scope="module", params=["nothing listens", "html answers"])
def server(request: pytest.FixtureRequest, html_service: str) -> Iterator[str]:
    api = (
        f"http://127.0.0.1:{free_port()}/services/nsml/api/"
        if request.param == "nothing listens"
        else html_service
    )
    root = Path(tempfile.mkdtemp(prefix="nsml-lab-server-"))
    proc, url = start_server(api, root)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for f in root.iterdir():
            f.unlink()
        root.rmdir()


AUTH = {"Authorization": f"token {TOKEN}"}


def test_a_service_that_is_down_is_a_502_json_answer(server: str) -> None:
    r = requests.get(f"{server}/nsml/api/sessions", headers=AUTH, timeout=60)
    assert r.status_code == 502, (r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["reason"] == "bad_gateway" and "NSML service" in body["message"]


def test_the_stream_stays_open_and_says_the_service_is_unreachable(server: str) -> None:
    with requests.get(f"{server}/nsml/stream", headers=AUTH, stream=True, timeout=(30, 60)) as r:
        assert r.status_code == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = []
        for line in r.iter_lines(decode_unicode=True):
            lines.append(line)
            if line.startswith("data: ") and '"connected":false' in line:
                break
        assert any("event: status" == x for x in lines), lines
        assert "The NSML service's event stream failed" in lines[-1], lines


def test_without_the_servers_login_nothing_is_forwarded(server: str) -> None:
    r = requests.get(f"{server}/nsml/api/sessions", timeout=60)
    assert r.status_code == 403 and r.headers["Content-Type"].startswith("application/json")
    r = requests.post(
        f"{server}/nsml/api/sessions",
        headers={"Authorization": "token wrong"},
        json={},
        timeout=60,
    )
    assert r.status_code == 403, r.text[:300]

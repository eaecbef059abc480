"""``scripts/docker-engine.sh certs``: the TLS files for engines reached over TCP (openssl only)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "docker-engine.sh"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is missing")


def script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


def openssl(*args: str) -> str:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_certs_make_a_ca_a_client_and_a_server_certificate_that_chain_to_it(
    tmp_path: Path,
) -> None:
    tls = tmp_path / "tls"
    r = script("certs", "--tls-dir", str(tls), "--name", "gpu-07", "--san", "IP:10.0.0.7")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    ca = str(tls / "ca.pem")
    for cert in (tls / "client" / "cert.pem", tls / "gpu-07" / "server-cert.pem"):
        assert openssl("verify", "-CAfile", ca, str(cert)).strip().endswith(": OK")
    server = openssl("x509", "-in", str(tls / "gpu-07" / "server-cert.pem"), "-noout", "-text")
    assert "IP Address:10.0.0.7" in server and "TLS Web Server Authentication" in server
    client = openssl("x509", "-in", str(tls / "client" / "cert.pem"), "-noout", "-text")
    assert "TLS Web Client Authentication" in client
    # What DOCKER_CERT_PATH and the node need: the CA key stays where it was made.
    assert sorted(p.name for p in (tls / "client").iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    assert sorted(p.name for p in (tls / "gpu-07").iterdir()) == [
        "ca.pem",
        "server-cert.pem",
        "server-key.pem",
    ]
    assert (tls / "client" / "key.pem").stat().st_mode & 0o077 == 0
    assert (tls / "gpu-07" / "server-key.pem").stat().st_mode & 0o077 == 0


def test_certs_keep_what_exists_and_another_node_gets_its_own_from_the_same_ca(
    tmp_path: Path,
) -> None:
    tls = tmp_path / "tls"
    assert script("certs", "--tls-dir", str(tls), "--name", "node-b").returncode == 0
    before = {p: p.read_bytes() for p in tls.rglob("*.pem")}
    r = script("certs", "--tls-dir", str(tls), "--name", "node-c")
    assert r.returncode == 0, r.stderr
    assert {p: p.read_bytes() for p in before} == before, "nothing existing was replaced"
    cert = str(tls / "node-c" / "server-cert.pem")
    assert openssl("verify", "-CAfile", str(tls / "ca.pem"), cert).strip().endswith(": OK")
    text = openssl("x509", "-in", cert, "-noout", "-text")
    assert "IP Address:127.0.0.1" in text and "DNS:node-c" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["certs"], "certs needs --tls-dir DIR"),
        (["ensure", "--tls-listen", "2376", "--tls-dir", "/x"], "--tls-listen needs --name"),
        (["ensure", "--name", "n", "--tls-listen", "2376"], "--tls-listen needs --tls-dir"),
        (["ensure", "--name", "n", "--tls-listen", "a:b", "--tls-dir", "/x"], "a port number"),
        (["stop", "--name", "n", "--tls-listen", "2376"], "only valid with ensure"),
        (["status", "--tls-dir", "/x"], "only valid with certs or with ensure"),
    ],
)
def test_bad_tls_arguments_are_refused_with_what_to_do(args: list[str], message: str) -> None:
    r = script(*args)
    assert r.returncode == 1
    assert message in r.stderr, r.stderr

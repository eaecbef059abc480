"""The test bed itself: three nodes up, remote engines only over TLS with the set-up's CA."""

from __future__ import annotations

import ssl
import urllib.parse

import docker
import pytest
import requests

from tests.cluster.testbed import Testbed


def test_three_nodes_report_up_each_with_its_own_engine_gpus_and_the_image(
    testbed: Testbed,
) -> None:
    listed = testbed.hub.nsml("GET", "nodes", testbed.admin_token).json()["nodes"]
    by_name = {n["name"]: n for n in listed}
    assert sorted(by_name) == ["node-a", "node-b", "node-c"]
    for node in by_name.values():
        assert node["state"] == "up", node
        assert len(node["gpus"]) == 4 and {g["model"] for g in node["gpus"]} == {"TB-V100"}
        assert testbed.image in node["images"]
    for name in testbed.remote_nodes:
        assert by_name[name]["docker_url"] == testbed.engines[name].tls_url
        assert by_name[name]["docker_url"].startswith("tcp://127.0.0.1:")
    # Three different engines: each has its own ID.
    ids = {testbed.docker(n).info()["ID"] for n in testbed.nodes}
    assert len(ids) == 3


@pytest.mark.parametrize("node", ["node-b", "node-c"])
def test_a_remote_engine_answers_over_tls_only_to_a_client_with_a_certificate(
    testbed: Testbed, node: str
) -> None:
    url = testbed.engines[node].tls_url
    assert url is not None
    with testbed.tls_client(node) as c:
        assert c.info()["ID"] == testbed.docker(node).info()["ID"]
    https = "https://" + urllib.parse.urlsplit(url).netloc
    ca = str(testbed.cert_path / "ca.pem")
    # No client certificate: the TLS handshake is refused.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{https}/version", verify=ca, timeout=10)
    # Not our CA: the client does not trust the engine either.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{https}/version", verify=True, timeout=10)
    # Plain HTTP is refused.
    r = requests.get(f"http://{urllib.parse.urlsplit(url).netloc}/version", timeout=10)
    assert r.status_code == 400 and "HTTPS" in r.text
    assert isinstance(ssl.OPENSSL_VERSION, str)
    with pytest.raises(docker.errors.DockerException):
        docker.DockerClient(base_url=url, timeout=10).info()

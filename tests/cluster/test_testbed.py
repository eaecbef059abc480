"""The test bed itself: three nodes up, remote engines only over TLS with the set-up's CA."""

from __future__ import annotations

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
    # Three different engines: each has its own data root.
    roots = {testbed.docker(n).info()["DockerRootDir"] for n in testbed.nodes}
    assert len(roots) == 3, roots


@pytest.mark.parametrize("node", ["node-b", "node-c"])
def test_a_remote_engine_answers_over_tls_only_to_a_client_with_a_certificate(
    testbed: Testbed, node: str
) -> None:
    url = testbed.engines[node].tls_url
    assert url is not None
    c = testbed.tls_client(node)
    try:
        assert c.info()["DockerRootDir"] == testbed.docker(node).info()["DockerRootDir"]
    finally:
        c.close()
    https = "https://" + urllib.parse.urlsplit(url).netloc
    ca = str(testbed.cert_path / "ca.pem")
    # No client certificate: refused (in the handshake, or at the first read with TLS 1.3).
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{https}/version", verify=ca, timeout=10)
    # Not our CA: the client does not trust the engine either.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{https}/version", verify=True, timeout=10)
    # Plain HTTP is refused.
    r = requests.get(f"http://{urllib.parse.urlsplit(url).netloc}/version", timeout=10)
    assert r.status_code == 400 and "HTTPS" in r.text
    with pytest.raises(docker.errors.DockerException):
        docker.DockerClient(base_url=url, timeout=10).info()


def test_the_standby_shares_the_database_and_does_not_lead(testbed: Testbed) -> None:
    standby = testbed.standby
    assert standby is not None
    assert standby.health()["leader"] is False
    r = requests.get(
        f"{standby.api}/nodes",
        headers={"Authorization": f"token {testbed.admin_token}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert sorted(n["name"] for n in r.json()["nodes"]) == ["node-a", "node-b", "node-c"]
    leader = testbed.hub.nsml("GET", "health", None).json()
    assert leader["leader"] is True

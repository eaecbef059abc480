"""A newcomer's first hub on a machine without GPUs: virtual GPUs, labelled virtual everywhere.

The embedded default, started as ``scripts/up.sh`` starts it (no ``NSML_VIRTUAL_GPUS``), on a
machine where NVML finds no GPU: one plain line at start says so, the nodes API marks the
GPUs ``virtual``, the spawn form offers them (and shares of them) labelled virtual, and
``nsml nodes`` says they are not real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_scheduler.probe import NVMLProbe
from tests.hub_fixtures import remove_deployment, unique_prefix
from tests.integration.hubproc import HubProcess

pytestmark = [pytest.mark.hub, pytest.mark.docker]


@pytest.fixture(scope="module")
def newcomer_hub(docker_client: Any, singleuser_image: str) -> Iterator[HubProcess]:
    probe = NVMLProbe()
    try:
        if probe.status().enabled:
            pytest.skip("this machine has a GPU: the embedded default reports it, not virtual ones")
    finally:
        probe.close()
    state = Path(tempfile.mkdtemp(prefix="nsml-hub-new-"))
    prefix = unique_prefix("nsmlnew")
    h = HubProcess(
        state,
        env_overrides={
            "NSML_CONTAINER_PREFIX": prefix,
            "NSML_NOTEBOOK_IMAGE": singleuser_image,
            "NSML_VIRTUAL_GPUS": "",  # unset, as on a newcomer's machine
            "NSML_NODE_NAME": "",
        },
    )
    try:
        h.start()
        yield h
    finally:
        h.stop()
        remove_deployment(docker_client, prefix)
        shutil.rmtree(state, ignore_errors=True)


def test_the_start_says_in_one_line_that_the_gpus_are_virtual(newcomer_hub: HubProcess) -> None:
    lines = [line for line in newcomer_hub.log_text().splitlines() if "virtual GPUs" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("jupyter-nsml: no NVIDIA GPU found (")
    assert "starting with 4 virtual GPUs" in lines[0] and "no real GPU" in lines[0]


def test_the_nodes_api_marks_every_gpu_virtual(newcomer_hub: HubProcess) -> None:
    token = newcomer_hub.user_token("newcomer")
    (node,) = newcomer_hub.nsml("GET", "nodes", token).json()["nodes"]
    assert node["gpu_probe"]["kind"] == "virtual" and node["gpu_probe"]["virtual"] is True
    assert [g["virtual"] for g in node["gpus"]] == [True] * 4


def test_the_spawn_form_offers_virtual_gpus_and_shares_of_them(newcomer_hub: HubProcess) -> None:
    page = newcomer_hub.login("newcomer").get(f"{newcomer_hub.url}/hub/spawn", timeout=30)
    assert page.status_code == 200
    html = page.text
    assert "GPUs are virtual: they are scheduled and billed like real ones" in html
    assert '<option value="0.5">0.5 (a share of one GPU, virtual)</option>' in html
    assert '<option value="4">4 (virtual)</option>' in html and '"5"' not in html
    assert "(virtual, up to 4 per node)" in html


def test_nsml_nodes_says_the_gpus_are_not_real(newcomer_hub: HubProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
    env.update(
        NSML_API_URL=newcomer_hub.nsml_api + "/", NSML_TOKEN=newcomer_hub.user_token("newcomer")
    )
    nsml = str(Path(sys.executable).parent / "nsml")
    r = subprocess.run([nsml, "nodes"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "4x NVIDIA Virtual GPU (virtual)" in r.stdout

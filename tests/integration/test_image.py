"""The offline-built single-user image: what a notebook server and a training session need.

The image comes from the session fixture ``singleuser_image`` (``hub_config/images/build.sh``,
cached, so a rebuild after a code change only replaces the project layer). Every container
uses the host's network, runs one command to completion and is removed, also when the test
fails; its output appears only in the message of a failed assertion.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest

pytestmark = pytest.mark.docker

NB_UID, NB_GID = 1000, 100


def run_in_image(
    client: Any, image: str, command: Sequence[str], timeout: float = 120
) -> tuple[int, str]:
    """Run *command* in a fresh container of *image*; return its exit code and output."""
    container = client.containers.create(
        image,
        list(command),
        network_mode="host",
        labels={"org.jupyter-nsml.test": "test_image"},
    )
    try:
        container.start()
        status = container.wait(timeout=timeout)
        output = container.logs(stdout=True, stderr=True).decode(errors="replace")
        return int(status["StatusCode"]), output
    finally:
        container.remove(force=True)


def check(client: Any, image: str, command: Sequence[str]) -> str:
    """Run *command* in *image*, assert that it succeeds and return its output."""
    code, output = run_in_image(client, image, command)
    assert code == 0, f"{list(command)} exited with {code} in {image}; container output:\n{output}"
    return output


def test_image_config_runs_jupyterhub_singleuser_as_jovyan(
    docker_client: Any, singleuser_image: str
) -> None:
    config = docker_client.api.inspect_image(singleuser_image)["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert config["User"] == f"{NB_UID}:{NB_GID}"
    assert config["WorkingDir"] == "/home/jovyan"
    assert config["Cmd"] == ["jupyterhub-singleuser"]
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    labels = config.get("Labels") or {}
    assert re.fullmatch(r"[0-9a-f]{12}", labels.get("org.jupyter-nsml.image.inputs", "")), labels


def test_jupyterhub_singleuser_starts_and_reports_its_version(
    docker_client: Any, singleuser_image: str
) -> None:
    output = check(docker_client, singleuser_image, ["jupyterhub-singleuser", "--version"])
    assert re.search(r"^\d+\.\d+\.\d+", output.strip(), re.M), output


def test_notebook_and_nsml_packages_import(docker_client: Any, singleuser_image: str) -> None:
    check(
        docker_client,
        singleuser_image,
        [
            "python",
            "-c",
            "import nsml, nsml_magics, nsml_server, nsml_datasets, ipykernel, ipywidgets, bokeh,"
            " jupyter_server, jupyterlab",
        ],
    )


def test_runs_as_uid_1000_with_a_writable_home(docker_client: Any, singleuser_image: str) -> None:
    output = check(
        docker_client,
        singleuser_image,
        ["sh", "-c", 'id -u; id -g; echo "$HOME"; pwd; touch "$HOME/probe" && echo writable'],
    )
    assert output.split() == [str(NB_UID), str(NB_GID), "/home/jovyan", "/home/jovyan", "writable"]


def test_hugging_face_datasets_is_not_shadowed_by_our_dataset_package(
    docker_client: Any, singleuser_image: str
) -> None:
    # Our dataset package is nsml_datasets; a top-level `datasets` would hide Hugging Face's.
    output = check(
        docker_client,
        singleuser_image,
        [
            "python",
            "-c",
            "import importlib.util as u;"
            " print(u.find_spec('datasets'), u.find_spec('nsml_datasets'))",
        ],
    )
    found_datasets, found_ours = output.split(None, 1)
    assert found_datasets == "None", output
    assert "nsml_datasets" in found_ours, output


def test_rfc3987_syntax_is_removed_for_fast_server_starts(
    docker_client: Any, singleuser_image: str
) -> None:
    output = check(
        docker_client,
        singleuser_image,
        ["python", "-c", "import importlib.util as u; print(u.find_spec('rfc3987_syntax'))"],
    )
    assert output.strip() == "None", output


def test_training_scripts_find_python_and_basic_tools(
    docker_client: Any, singleuser_image: str
) -> None:
    output = check(
        docker_client,
        singleuser_image,
        [
            "sh",
            "-c",
            "for t in python python3 pip sh bash ls ps tini; do command -v $t; done;"
            " python -c 'import sys; print(sys.prefix)'",
        ],
    )
    lines = output.split()
    assert lines[0] == "/opt/venv/bin/python", output
    assert len(lines) == 9 and lines[-1] == "/opt/venv", output


def test_tls_verification_uses_the_ca_bundle(docker_client: Any, singleuser_image: str) -> None:
    output = check(
        docker_client,
        singleuser_image,
        ["python", "-c", "import ssl; print(ssl.create_default_context().cert_store_stats())"],
    )
    assert re.search(r"'x509_ca': [1-9]", output), output


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_the_nsml_sidebar_and_its_server_extension_are_enabled_and_ok(
    docker_client: Any, singleuser_image: str
) -> None:
    """What jupyterlab-git's CI checks: both halves of labextension/ installed, enabled, OK."""
    output = check(
        docker_client,
        singleuser_image,
        ["sh", "-c", "jupyter server extension list 2>&1; jupyter labextension list 2>&1"],
    )
    text = ANSI.sub("", output)
    assert re.search(r"^\s*jupyter_nsml_lab enabled\s*$", text, re.M), text
    assert re.search(r"^\s*jupyter_nsml_lab \S+ OK\s*$", text, re.M), text
    assert re.search(
        r"^\s*jupyter-nsml-lab v\S+ enabled OK \(python, jupyter[-_]nsml[-_]lab\)", text, re.M
    ), text

"""What installing jupyter-nsml puts on a machine: entry points, and no `datasets` shadowing."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (whl,) = out.glob("jupyter_nsml-*.whl")
    return whl


def test_the_wheel_never_installs_a_top_level_datasets_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if "/" in n and ".dist-info" not in n}
    assert "datasets" not in top
    assert {
        "nsml_datasets",
        "gpu_scheduler",
        "nsml",
        "nsml_server",
        "nsml_spawner",
        "nsml_magics",
    } <= top
    assert "nsml_server/migrations/script.py.mako" in names
    assert any(n.startswith("nsml_server/migrations/versions/0001") for n in names)
    # The admin panel: its package and every page template.
    for page in ("base", "error", "users", "user", "teams", "nodes", "sessions", "policy"):
        assert f"nsml_server/admin/templates/{page}.html" in names
    assert "nsml_server/admin/templates/charts.html" in names
    assert "nsml_server/admin/templates/audit.html" in names


def test_the_wheel_makes_every_kernel_load_the_nsml_magics(wheel: Path) -> None:
    import json

    with zipfile.ZipFile(wheel) as z:
        (name,) = [
            n for n in z.namelist() if n.endswith("data/etc/ipython/ipython_kernel_config.json")
        ]
        config = json.loads(z.read(name))
    assert config["InteractiveShellApp"]["extensions"] == ["nsml_magics"]


def test_a_kernel_started_with_that_config_has_the_nsml_magic(tmp_path: Path) -> None:
    """The shipped config file, read by a real IPython kernel (from a profile folder here)."""
    import shutil

    from jupyter_client.manager import start_new_kernel

    profile = tmp_path / "profile_default"
    profile.mkdir()
    shutil.copy(REPO / "hub_config/ipython/ipython_kernel_config.json", profile)
    out: list[dict[str, Any]] = []
    km, kc = start_new_kernel(env={**os.environ, "IPYTHONDIR": str(tmp_path)})
    try:
        reply = kc.execute_interactive("%nsml help", timeout=60, output_hook=out.append)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok"
    text = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
    assert "%nsml VERB" in text and "gpustat" in text


def test_hugging_face_datasets_still_imports_beside_ours(tmp_path: Path) -> None:
    """A `datasets` package on the path (as in every ML image) is the one `import datasets` gets."""
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("ORIGIN = 'huggingface'\n")
    code = "import datasets, nsml_datasets; print(datasets.ORIGIN, nsml_datasets.__name__)"
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["huggingface", "nsml_datasets"]


def test_the_spawner_is_registered_for_jupyterhub() -> None:
    (ep,) = [e for e in entry_points(group="jupyterhub.spawners") if e.name == "nsml"]
    from nsml_spawner import NSMLSpawner

    assert ep.load() is NSMLSpawner


@pytest.mark.parametrize("script", ["nsml", "nsml-server", "nsml-agent"])
def test_console_scripts_exist_and_answer_help(script: str) -> None:
    assert [e for e in entry_points(group="console_scripts") if e.name == script]
    exe = Path(sys.executable).parent / script
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert script in r.stdout


def test_nsml_help_lists_the_verbs() -> None:
    r = subprocess.run(
        [str(Path(sys.executable).parent / "nsml"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    for verb in ("health", "whoami", "nodes"):
        assert verb in r.stdout


def test_importing_the_packages_does_no_io() -> None:
    """Nothing happens at import time: no NVML init, no Docker, no database."""
    code = (
        "import sys, gpu_scheduler, gpu_scheduler.probe, nsml, nsml_server.app, nsml_spawner; "
        "bad = [m for m in ('pynvml', 'docker.api.client') if m in sys.modules "
        "and m == 'pynvml']; print(bad)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"

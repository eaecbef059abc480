"""What installing jupyter-nsml puts on a machine: entry points, and no `datasets` shadowing."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

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

"""The hub configurations as loaded by jupyterhub: the embedded default and the production example.

Each config is loaded the way ``jupyterhub -f`` loads it (traitlets' Python config loader, with
``load_subconfig``), in a clean environment, and the resulting settings are read back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from traitlets.config.loader import PyFileConfigLoader

from gpu_scheduler.probe import NVMLProbe
from tests.conftest import REPO

HUB_CONFIG = REPO / "hub_config"


def load(name: str, env: pytest.MonkeyPatch, tmp_path: Path, **vars: str) -> Any:
    """Load hub_config/NAME with NSML_STATE_DIR in *tmp_path* and *vars* in the environment."""
    env.setenv("NSML_STATE_DIR", str(tmp_path / "state"))
    for key, value in vars.items():
        env.setenv(key, value)
    return PyFileConfigLoader(name, path=str(HUB_CONFIG)).load_config()


def service_env(config: Any, name: str = "nsml") -> dict[str, str]:
    for svc in config.JupyterHub.services:
        if svc["name"] == name:
            return dict(svc.get("environment") or {})
    raise AssertionError(f"no service {name!r}")


PRODUCTION = {
    "JUPYTERHUB_DB_URL": "postgresql://hub@db.invalid/jupyterhub",
    "NSML_DB_URL": "postgresql+psycopg://nsml@db.invalid/nsml",
}


def nvml_finds_gpus() -> bool:
    probe = NVMLProbe()
    try:
        return probe.status().enabled
    finally:
        probe.close()


# ---- homes -----------------------------------------------------------------------------------


def test_the_embedded_default_gives_every_user_a_home_volume_on_the_node(
    nsml_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = load("jupyterhub_config.py", nsml_env, tmp_path)
    assert "home_volume" not in config.NSMLSpawner  # the spawner's default: PREFIX-home-USER
    from types import SimpleNamespace

    from nsml_spawner import NSMLSpawner

    spawner = NSMLSpawner(config=config, user=SimpleNamespace(name="alice", url="/user/alice/"))
    home = spawner._home_of_user()
    assert home is not None
    assert (home.source, home.target, home.kind) == ("nsml-nb-home-alice", "/home/jovyan", "volume")


def test_the_production_example_puts_homes_on_the_shared_filesystem(
    nsml_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load(
        "production.py", nsml_env, tmp_path, NSML_SHARED_HOMES="/fake/nfs/homes/", **PRODUCTION
    )
    assert config.NSMLSpawner.home_volume == "/fake/nfs/homes/{username}"
    from types import SimpleNamespace

    from nsml_spawner import NSMLSpawner

    def home_of(name: str) -> Any:
        user = SimpleNamespace(name=name, url=f"/user/{name}/")
        return NSMLSpawner(config=config, user=user)._home_of_user()

    home = home_of("bob.smith")
    assert home.source == "/fake/nfs/homes/bob-2esmith"
    assert (home.kind, home.node_local, home.target) == ("path", False, "/home/jovyan")
    # An escaped user name never leaves the homes folder.
    assert home_of("../../etc").source == "/fake/nfs/homes/-2e-2e-2f-2e-2e-2fetc"
    assert config.NSMLSpawner.allow_gpu_sharing is False


def test_the_production_example_never_invents_gpus(
    nsml_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load("production.py", nsml_env, tmp_path, **PRODUCTION)
    env = service_env(config)
    assert "NSML_VIRTUAL_GPUS" not in env
    assert "--no-local-node" in service_command(config)
    assert "virtual GPUs" not in capsys.readouterr().err


def service_command(config: Any) -> list[str]:
    for svc in config.JupyterHub.services:
        if svc["name"] == "nsml":
            return list(svc["command"])
    raise AssertionError("no nsml service")


# ---- virtual GPUs in the embedded default -----------------------------------------------------


def test_the_embedded_default_without_a_gpu_starts_with_virtual_gpus_and_says_so(
    nsml_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load("jupyterhub_config.py", nsml_env, tmp_path)
    err = capsys.readouterr().err
    if nvml_finds_gpus():
        assert "NSML_VIRTUAL_GPUS" not in service_env(config)
        assert "virtual GPUs" not in err
        return
    assert service_env(config)["NSML_VIRTUAL_GPUS"] == "4"
    lines = [line for line in err.splitlines() if "virtual GPUs" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("jupyter-nsml: no NVIDIA GPU found (")
    assert "starting with 4 virtual GPUs" in lines[0] and "no real GPU" in lines[0]
    assert "NVML probe disabled" not in err  # one plain line, not the probe's log


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        pytest.param({"NSML_VIRTUAL_GPUS": "2"}, "2", id="an explicit count is kept"),
        pytest.param({"NSML_VIRTUAL_GPUS": "0"}, "0", id="an explicit zero is kept"),
        pytest.param({"NSML_VIRTUAL_GPUS_IF_NONE": "0"}, None, id="no fallback asked"),
    ],
)
def test_an_explicit_gpu_setting_wins_over_the_fallback(
    nsml_env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    variables: dict[str, str],
    expected: str | None,
) -> None:
    config = load("jupyterhub_config.py", nsml_env, tmp_path, **variables)
    assert service_env(config).get("NSML_VIRTUAL_GPUS") == expected
    assert "starting with" not in capsys.readouterr().err


def test_a_bad_fallback_count_stops_the_hub_with_one_line(
    nsml_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as e:
        load("jupyterhub_config.py", nsml_env, tmp_path, NSML_VIRTUAL_GPUS_IF_NONE="lots")
    assert str(e.value).startswith("jupyter-nsml: NSML_VIRTUAL_GPUS_IF_NONE='lots' is not a GPU")


# ---- allowed images and GPU shares ------------------------------------------------------------


def test_the_spawner_and_the_nsml_server_share_the_allowed_images(
    nsml_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = load("jupyterhub_config.py", nsml_env, tmp_path)
    assert list(config.NSMLSpawner.allowed_images) == ["jupyter-nsml/singleuser:latest"]
    assert service_env(config)["NSML_ALLOWED_IMAGES"] == "jupyter-nsml/singleuser:latest"
    config = load(
        "jupyterhub_config.py", nsml_env, tmp_path, NSML_ALLOWED_IMAGES="jupyter-nsml/*,x/y:1"
    )
    assert list(config.NSMLSpawner.allowed_images) == ["jupyter-nsml/*", "x/y:1"]
    assert service_env(config)["NSML_ALLOWED_IMAGES"] == "jupyter-nsml/*,x/y:1"


def test_the_embedded_default_offers_gpu_shares(
    nsml_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = load("jupyterhub_config.py", nsml_env, tmp_path)
    assert config.NSMLSpawner.allow_gpu_sharing is True

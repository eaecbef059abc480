"""Where the nsml client finds the API and its token."""

from __future__ import annotations

import pytest

from nsml.config import ConfigError, resolve

HUB_SERVICE = {"url": "http://127.0.0.1:8090", "prefix": "/services/nsml/"}


def fake_fetch(url: str, token: str) -> dict[str, object]:
    assert url == "http://127.0.0.1:8081/hub/api/services/nsml"
    assert token == "hubtok"
    return HUB_SERVICE


@pytest.mark.parametrize(
    ("env", "api_url", "token"),
    [
        pytest.param(
            {"NSML_API_URL": "http://h/services/nsml/api/", "NSML_TOKEN": "t"},
            "http://h/services/nsml/api/",
            "t",
            id="explicit variables win",
        ),
        pytest.param(
            {"NSML_API_URL": "http://h/api", "NSML_TOKEN": "t", "JUPYTERHUB_API_TOKEN": "hubtok"},
            "http://h/api",
            "t",
            id="NSML_TOKEN before the hub token",
        ),
        pytest.param(
            {"NSML_API_URL": "http://h/api", "JUPYTERHUB_API_TOKEN": "hubtok"},
            "http://h/api",
            "hubtok",
            id="hub token inside a notebook server",
        ),
        pytest.param(
            {
                "JUPYTERHUB_PUBLIC_HUB_URL": "https://lab.example.org/hub/",
                "JUPYTERHUB_API_TOKEN": "hubtok",
            },
            "https://lab.example.org/services/nsml/api/",
            "hubtok",
            id="public hub URL gives the service URL",
        ),
        pytest.param(
            {
                "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
                "JUPYTERHUB_API_TOKEN": "hubtok",
            },
            "http://127.0.0.1:8090/services/nsml/api/",
            "hubtok",
            id="the hub API says where the service is",
        ),
    ],
)
def test_resolution_order(env: dict[str, str], api_url: str, token: str) -> None:
    cfg = resolve(env, fetch=fake_fetch)
    assert (cfg.api_url, cfg.token) == (api_url, token)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        pytest.param({}, "Set NSML_API_URL", id="nothing set"),
        pytest.param({"NSML_API_URL": "http://h/api"}, "No token", id="no token"),
        pytest.param(
            {
                "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
                "JUPYTERHUB_API_TOKEN": "hubtok",
            },
            "Set NSML_API_URL",
            id="hub does not know the service",
        ),
    ],
)
def test_missing_configuration_says_what_to_set(env: dict[str, str], match: str) -> None:
    def failing_fetch(url: str, token: str) -> dict[str, object]:
        raise OSError("404")

    with pytest.raises(ConfigError, match=match):
        resolve(env, fetch=failing_fetch)

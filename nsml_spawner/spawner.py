"""``NSMLSpawner(DockerSpawner)``: a user's notebook server in a container of the NSML image.

Containers use the host's network (no private-range address; the engine runs with
``--bridge=none``), so each server listens on a free port of the node chosen at start and the
hub reaches it at ``127.0.0.1:PORT``.
"""

from __future__ import annotations

import os
from typing import Any

from docker.errors import APIError, ImageNotFound
from dockerspawner import DockerSpawner
from jupyterhub.spawner import SpawnException  # type: ignore[attr-defined]
from jupyterhub.utils import random_port
from traitlets import Unicode, default

DEFAULT_IMAGE = "jupyter-nsml/singleuser:latest"


class NSMLSpawner(DockerSpawner):
    """Spawns notebook servers in containers of the jupyter-nsml single-user image."""

    @default("image")
    def _default_image(self) -> str:
        return os.environ.get("NSML_NOTEBOOK_IMAGE", DEFAULT_IMAGE)

    @default("network_name")
    def _default_network_name(self) -> str:
        return "host"

    @default("use_internal_ip")
    def _default_use_internal_ip(self) -> bool:
        return True

    @default("pull_policy")
    def _default_pull_policy(self) -> str:
        return "never"

    @default("remove")
    def _default_remove(self) -> bool:
        return True

    nsml_api_url = Unicode(
        help="""URL of the NSML API as seen from inside a notebook container, given to the
        `nsml` client as NSML_API_URL. Default: $NSML_API_URL_FOR_SERVERS, set by the hub config
        to the service's own address (containers share the host's network).""",
    ).tag(config=True)

    @default("nsml_api_url")
    def _default_nsml_api_url(self) -> str:
        return os.environ.get("NSML_API_URL_FOR_SERVERS", "")

    def get_env(self) -> dict[str, Any]:
        env: dict[str, Any] = super().get_env()
        if self.nsml_api_url:
            env["NSML_API_URL"] = self.nsml_api_url
        return env

    async def start(self) -> tuple[str, int]:  # type: ignore[override]
        # Host networking: every server needs its own port on the node. The container is
        # always created afresh (remove=True), so a new port is always safe.
        self.port = random_port()
        try:
            ip_port: tuple[str, int] = await super().start()
        except ImageNotFound as e:
            raise SpawnException(
                f"The notebook image {self.image!r} is not on this node's Docker engine. "
                "An admin can build it with hub_config/images/build.sh.",
            ) from e
        except APIError as e:
            if "could not select device driver" in str(e):
                raise SpawnException(
                    "This node's Docker engine cannot give containers GPUs (no NVIDIA runtime). "
                    "Ask for 0 GPUs, or ask an admin to install the NVIDIA container toolkit.",
                ) from e
            raise
        return ip_port

    async def get_ip_and_port(self) -> tuple[str, int]:  # type: ignore[override]
        return "127.0.0.1", int(self.port)

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self.port:
            state["port"] = self.port
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if state.get("port"):
            self.port = int(state["port"])

    def clear_state(self) -> None:
        super().clear_state()
        self.port = 0

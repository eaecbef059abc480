"""The notebook container spec, the engine choice, exit reasons and the queue loop of NSMLSpawner.

Pure functions, compared as whole dicts (like kubespawner's ``make_pod`` tests): what the
container gets is exactly what is written here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nsml_spawner.client import (
    Infeasible,
    NSMLClient,
    NSMLUnavailable,
    QueueTimeout,
    asks_the_same,
    wait_for_placement,
)
from nsml_spawner.options import NotebookOptions
from nsml_spawner.spec import (
    Allocation,
    ContainerSettings,
    Engine,
    LastExit,
    MountsNotReady,
    NodeUnreachable,
    PinnedTLSConfig,
    dataset_mounts,
    describe_exit,
    engine_url_for,
    holder_for,
    notebook_container,
    server_host,
    tls_files,
)

MIB = 1024 * 1024
IMAGE = "jupyter-nsml/singleuser:latest"
BASE_ENV = {"JUPYTERHUB_API_TOKEN": "tok", "JUPYTER_IMAGE_SPEC": IMAGE}
LABELS = {"nsml.kind": "notebook", "nsml.user": "alice"}


def options(**kw: Any) -> NotebookOptions:
    values: dict[str, Any] = {
        "gpus": 2.0,
        "gpu_model": None,
        "image": IMAGE,
        "datasets": (),
        "cpu": 1.0,
        "memory_mib": 2048,
    }
    values.update(kw)
    return NotebookOptions(**values)


def allocation(**kw: Any) -> Allocation:
    values: dict[str, Any] = {
        "placement_id": 7,
        "allocation_id": 5,
        "node": "node-a",
        "gpu_indices": (2, 3),
        "gpu_uuids": ("GPU-aaa", "GPU-bbb"),
        "gpu_milli_per_gpu": 1000,
        "cpu_milli": 1500,
        "memory_mib": 2048,
    }
    values.update(kw)
    return Allocation(**values)


def settings(**kw: Any) -> ContainerSettings:
    values: dict[str, Any] = {
        "name": "nsml-nb-alice",
        "command": ["jupyterhub-singleuser", "--port=8888"],
        "base_env": BASE_ENV,
        "nsml_api_url": "http://127.0.0.1:8090/services/nsml/api/",
        "api_token": "tok",
        "labels": LABELS,
    }
    values.update(kw)
    return ContainerSettings(**values)


def env(**overrides: str) -> dict[str, str]:
    out = {
        **BASE_ENV,
        "NSML_NODE": "node-a",
        "NSML_PLACEMENT_ID": "7",
        "NSML_GPU_MILLI": "1000",
        "NSML_DATASETS": "",
        "NSML_API_URL": "http://127.0.0.1:8090/services/nsml/api/",
        "NSML_TOKEN": "tok",
        "TINI_SUBREAPER": "1",
        "NVIDIA_VISIBLE_DEVICES": "2,3",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    out.update(overrides)
    return out


def create(**env_overrides: str) -> dict[str, Any]:
    return {
        "image": IMAGE,
        "command": ["jupyterhub-singleuser", "--port=8888"],
        "name": "nsml-nb-alice",
        "environment": env(**env_overrides),
        "labels": LABELS,
        "detach": True,
    }


HOST = {
    "network_mode": "host",
    "init": True,
    "mounts": [],
    "mem_limit": 2048 * MIB,
    "memswap_limit": 2048 * MIB,
    "nano_cpus": 1_500_000_000,
}


def gpu_request(*ids: str) -> dict[str, Any]:
    return {
        "Driver": "",
        "Count": 0,
        "DeviceIDs": list(ids),
        "Capabilities": [["gpu"]],
        "Options": {},
    }


# ---- the container ------------------------------------------------------------------------


def test_two_gpus_on_an_engine_without_the_nvidia_runtime_are_passed_as_env_only() -> None:
    args = notebook_container(options(), allocation(), Engine("node-a", None), settings())
    assert args.create == create()
    assert args.host_config == HOST


def test_an_engine_with_the_nvidia_runtime_also_gets_device_requests_for_those_gpus() -> None:
    args = notebook_container(options(), allocation(), Engine("node-a", None, True), settings())
    assert args.create == create()
    assert args.host_config == {**HOST, "device_requests": [gpu_request("2", "3")]}


def test_gpus_named_by_uuid_keep_their_uuids_inside_the_container() -> None:
    args = notebook_container(
        options(), allocation(), Engine("node-a", None, True), settings(visible_devices="uuid")
    )
    assert args.create == create(
        NVIDIA_VISIBLE_DEVICES="GPU-aaa,GPU-bbb", CUDA_VISIBLE_DEVICES="GPU-aaa,GPU-bbb"
    )
    assert args.host_config == {**HOST, "device_requests": [gpu_request("GPU-aaa", "GPU-bbb")]}


def test_a_cpu_only_server_sees_no_gpu_even_if_the_image_says_all() -> None:
    alloc = allocation(gpu_indices=(), gpu_uuids=(), gpu_milli_per_gpu=0)
    base = {**BASE_ENV, "NVIDIA_VISIBLE_DEVICES": "all"}
    args = notebook_container(
        options(gpus=0.0), alloc, Engine("node-a", None, True), settings(base_env=base)
    )
    assert args.create == create(
        NVIDIA_VISIBLE_DEVICES="void", CUDA_VISIBLE_DEVICES="", NSML_GPU_MILLI="0"
    )
    assert args.host_config == HOST


def test_a_quarter_of_a_shared_gpu_names_that_gpu_and_its_share() -> None:
    alloc = allocation(gpu_indices=(1,), gpu_uuids=("GPU-bbb",), gpu_milli_per_gpu=250)
    args = notebook_container(options(gpus=0.25), alloc, Engine("node-a", None), settings())
    assert args.create == create(
        NVIDIA_VISIBLE_DEVICES="1", CUDA_VISIBLE_DEVICES="0", NSML_GPU_MILLI="250"
    )


def test_limits_are_the_allocation_not_the_request() -> None:
    alloc = allocation(cpu_milli=250, memory_mib=256)
    args = notebook_container(
        options(cpu=0.25, memory_mib=256), alloc, Engine("a", None), settings()
    )
    assert args.host_config == {
        **HOST,
        "mem_limit": 256 * MIB,
        "memswap_limit": 256 * MIB,
        "nano_cpus": 250_000_000,
    }


def test_datasets_reach_the_container_by_name_when_none_is_mounted() -> None:
    opts = options(datasets=("mnist@latest", "imagenet@2"))
    args = notebook_container(opts, allocation(), Engine("node-a", None), settings())
    assert args.create == create(NSML_DATASETS="mnist@latest,imagenet@2")
    assert args.host_config["mounts"] == []


READY = [
    {
        "ref": "mnist@3",
        "state": "ready",
        "host_path": "/var/nsml/cache/entries/mnist@3/data",
        "container_path": "/data/mnist",
    },
    {
        "ref": "imagenet@2",
        "state": "ready",
        "host_path": "/var/nsml/cache/entries/imagenet@2/data",
        "container_path": "/data/imagenet",
    },
]


def test_ready_datasets_are_mounted_read_only_under_data() -> None:
    opts = options(datasets=("mnist@latest", "imagenet@2"))
    mounts = dataset_mounts(READY)
    args = notebook_container(
        opts,
        allocation(),
        Engine("node-a", None),
        settings(),
        mounts=mounts,
        dataset_refs=("mnist@3", "imagenet@2"),
    )
    assert args.create == create(NSML_DATASETS="mnist@3,imagenet@2")
    assert args.host_config["mounts"] == [
        {
            "Target": "/data/imagenet",
            "Source": "/var/nsml/cache/entries/imagenet@2/data",
            "Type": "bind",
            "ReadOnly": True,
        },
        {
            "Target": "/data/mnist",
            "Source": "/var/nsml/cache/entries/mnist@3/data",
            "Type": "bind",
            "ReadOnly": True,
        },
    ]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        pytest.param({"state": "preparing"}, "not ready", id="still preparing"),
        pytest.param({"host_path": None}, "not ready", id="no host path"),
        pytest.param({"host_path": "relative/path"}, "refusing", id="relative host path"),
        pytest.param({"container_path": "/home/jovyan"}, "refusing", id="outside /data"),
        pytest.param({"container_path": "/data/.."}, "refusing", id="dot-dot target"),
        pytest.param({"container_path": "/data/imagenet"}, "refusing", id="same target twice"),
    ],
)
def test_a_mount_answer_that_is_not_ready_or_not_under_data_is_refused(
    change: dict[str, Any], words: str
) -> None:
    answer = [{**READY[0], **change}, READY[1]]
    with pytest.raises(MountsNotReady, match=words):
        dataset_mounts(answer)


def test_without_an_api_url_or_token_the_nsml_variables_are_left_out() -> None:
    args = notebook_container(
        options(), allocation(), Engine("node-a", None), settings(nsml_api_url="", api_token="")
    )
    expected = env()
    del expected["NSML_API_URL"], expected["NSML_TOKEN"]
    assert args.create["environment"] == expected


def test_the_gpu_variables_win_over_same_named_hub_variables() -> None:
    base = {**BASE_ENV, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    args = notebook_container(options(), allocation(), Engine("a", None), settings(base_env=base))
    assert args.create["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert args.create["environment"]["NVIDIA_VISIBLE_DEVICES"] == "2,3"


def test_volumes_from_the_hub_config_become_binds() -> None:
    binds = {"/srv/shared": {"bind": "/home/jovyan/shared", "mode": "ro"}}
    args = notebook_container(options(), allocation(), Engine("a", None), settings(binds=binds))
    assert args.host_config == {**HOST, "binds": binds}


def test_an_invalid_container_name_is_refused_with_the_valid_form() -> None:
    with pytest.raises(ValueError, match="1-128 characters"):
        notebook_container(options(), allocation(), Engine("a", None), settings(name="-bad name"))


# ---- allocations, holders, engines ---------------------------------------------------------

PLACED = {
    "id": 7,
    "state": "placed",
    "allocation": {
        "id": 5,
        "node": "node-a",
        "gpu_indices": [2, 3],
        "gpu_uuids": ["GPU-aaa", "GPU-bbb"],
        "gpu_milli_per_gpu": 1000,
        "cpu_milli": 1500,
        "memory_mib": 2048,
        "state": "active",
    },
}


def test_an_allocation_from_the_api_survives_the_spawner_state() -> None:
    alloc = Allocation.from_placement(PLACED)
    assert alloc == allocation()
    assert alloc.to_state() == {
        "placement_id": 7,
        "allocation_id": 5,
        "node": "node-a",
        "gpu_indices": [2, 3],
        "gpu_uuids": ["GPU-aaa", "GPU-bbb"],
        "gpu_milli_per_gpu": 1000,
        "cpu_milli": 1500,
        "memory_mib": 2048,
    }
    assert Allocation.from_state(alloc.to_state()) == alloc


@pytest.mark.parametrize(
    ("alloc", "words"),
    [
        pytest.param(allocation(), "GPUs 2,3", id="two whole GPUs"),
        pytest.param(allocation(gpu_indices=(1,)), "GPU 1", id="one GPU"),
        pytest.param(
            allocation(gpu_indices=(1,), gpu_milli_per_gpu=500), "0.5 of GPU 1", id="half"
        ),
        pytest.param(allocation(gpu_indices=()), "no GPU", id="none"),
    ],
)
def test_gpu_words(alloc: Allocation, words: str) -> None:
    assert alloc.gpu_words() == words


@pytest.mark.parametrize(
    ("server", "holder"),
    [
        pytest.param("", "notebook", id="default server"),
        pytest.param("gpu-box", "notebook:gpu-box", id="named server"),
        pytest.param("a b/c", "notebook:a_20b_2Fc", id="characters the API refuses"),
    ],
)
def test_the_placement_holder_of_a_server(server: str, holder: str) -> None:
    assert holder_for(server) == holder


@pytest.mark.parametrize(
    ("node", "advertised", "overrides", "url"),
    [
        pytest.param("local-test", "unix:///var/run/docker.sock", {}, None, id="local node"),
        pytest.param("node-b", "tcp://10.0.0.2:2376", {}, "tcp://10.0.0.2:2376", id="remote"),
        pytest.param(
            "node-b",
            "tcp://10.0.0.2:2376",
            {"node-b": "tcp://gw:2376"},
            "tcp://gw:2376",
            id="the admin's override wins",
        ),
        pytest.param(
            "local-test", None, {"local-test": "tcp://x:1"}, "tcp://x:1", id="override local"
        ),
    ],
)
def test_which_engine_runs_a_node_s_containers(
    node: str, advertised: str | None, overrides: dict[str, str], url: str | None
) -> None:
    assert engine_url_for(node, advertised, local_node="local-test", overrides=overrides) == url


def test_a_remote_node_without_an_engine_url_is_unreachable_and_says_how_to_fix_it() -> None:
    with pytest.raises(NodeUnreachable, match="--docker-url tcp://HOST:2376"):
        engine_url_for("node-b", None, local_node="local-test", overrides={})


@pytest.mark.parametrize(
    ("url", "host"),
    [
        (None, "127.0.0.1"),
        ("unix:///var/run/docker.sock", "127.0.0.1"),
        ("tcp://10.0.0.2:2376", "10.0.0.2"),
        ("https://node-b.example:2376", "node-b.example"),
    ],
)
def test_the_proxy_reaches_a_server_on_its_node_s_host(url: str | None, host: str) -> None:
    assert server_host(url) == host


def test_tls_files_follow_docker_cert_path_names() -> None:
    assert tls_files("/etc/nsml/docker-tls") == {
        "client_cert": ("/etc/nsml/docker-tls/cert.pem", "/etc/nsml/docker-tls/key.pem"),
        "ca_cert": "/etc/nsml/docker-tls/ca.pem",
        "verify": True,
    }


def test_the_engine_ca_wins_over_a_ca_bundle_named_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import requests

    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    session = requests.Session()
    PinnedTLSConfig(**tls_files(str(tmp_path))).configure_client(session)
    assert session.verify == str(tmp_path / "ca.pem")
    # requests would otherwise replace the session's CA with $REQUESTS_CA_BUNDLE per request.
    assert session.trust_env is False
    settings = session.merge_environment_settings("https://127.0.0.1:2376", {}, None, None, None)
    assert settings["verify"] == str(tmp_path / "ca.pem")
    # Without a CA to pin, the environment keeps its say.
    plain = requests.Session()
    PinnedTLSConfig(verify=False).configure_client(plain)
    assert plain.trust_env is True


# ---- why a container ended -----------------------------------------------------------------


def test_an_oom_kill_says_out_of_memory_with_the_limit_and_what_to_ask_for() -> None:
    state = {
        "Running": False,
        "OOMKilled": True,
        "ExitCode": 137,
        "Error": "",
        "FinishedAt": "2026-01-02T03:04:05.6Z",
    }
    assert describe_exit(state, 256) == LastExit(
        reason="oom_killed",
        exit_code=137,
        message=(
            "Out of memory: your notebook server used more than its 256M memory limit and was "
            "stopped by the container engine (exit code 137). Start it again with more memory "
            "(e.g. memory=512M), or use less in your kernels."
        ),
        finished_at="2026-01-02T03:04:05.6Z",
    )


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        pytest.param(
            {"ExitCode": 0, "FinishedAt": "0001-01-01T00:00:00Z"},
            LastExit("exited", 0, "Your notebook server stopped (exit code 0)."),
            id="ended by itself",
        ),
        pytest.param(
            {"ExitCode": 127, "Error": "exec: not found"},
            LastExit(
                "error", 127, "Your notebook server could not run: exec: not found (exit code 127)."
            ),
            id="engine error",
        ),
    ],
)
def test_other_exits(state: dict[str, Any], expected: LastExit) -> None:
    assert describe_exit(state, 0) == expected
    assert LastExit.from_state(expected.to_state()) == expected


# ---- the queue loop ------------------------------------------------------------------------

BODY = {
    "holder": "notebook",
    "user": "alice",
    "gpus": 1.0,
    "gpu_models": [],
    "cpu": 1.0,
    "memory": 2048,
}
REQUEST = {"gpu_milli": 1000, "gpu_models": [], "cpu_milli": 1000, "memory_mib": 2048}


class FakeAPI(NSMLClient):
    """Answers from a script; each ask advances a fake clock by its ``wait_s``."""

    def __init__(self, answers: list[dict[str, Any] | Exception]) -> None:
        super().__init__("http://nsml.invalid/api/", "token")
        self.answers = answers
        self.clock = 0.0
        self.asked: list[float] = []
        self.released: list[int] = []

    async def place(self, body: Any, wait_s: float) -> tuple[int, dict[str, Any]]:
        self.asked.append(wait_s)
        self.clock += wait_s
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return 200, answer

    async def release(self, pid: int, *, retries: int | None = None) -> dict[str, Any] | None:
        self.released.append(pid)
        return {"id": pid, "state": "released"}


def waiting(position: int, request: dict[str, Any] = REQUEST) -> dict[str, Any]:
    return {
        "id": 3,
        "state": "waiting",
        "position": position,
        "reason": "Insufficient gpu: requested 1, free 0 on local-test",
        "request": request,
    }


def run_wait(api: FakeAPI, timeout_s: float = 25) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    seen: list[tuple[int, float]] = []

    async def no_sleep(_s: float) -> None:
        return None

    async def go() -> dict[str, Any]:
        return await wait_for_placement(
            api,
            BODY,
            timeout_s=timeout_s,
            poll_s=10,
            on_wait=lambda out, waited: seen.append((out["position"], waited)),
            now=lambda: api.clock,
            sleep=no_sleep,
        )

    return asyncio.run(go()), seen


def test_a_queued_request_is_asked_again_until_placed_and_reports_each_position() -> None:
    placed = {**PLACED, "request": REQUEST}
    api = FakeAPI([waiting(2), waiting(1), placed])
    out, seen = run_wait(api)
    assert out == placed
    assert seen == [(2, 10.0), (1, 20.0)]
    assert api.asked == [10, 10, 5]


def test_still_waiting_at_the_deadline_is_a_queue_timeout_with_the_last_answer() -> None:
    api = FakeAPI([waiting(2), waiting(1), waiting(1)])
    with pytest.raises(QueueTimeout) as e:
        run_wait(api)
    assert e.value.last["position"] == 1 and e.value.waited_s == 25
    assert api.released == [], "the caller decides to cancel"


def test_can_never_fit_is_raised_at_once() -> None:
    api = FakeAPI([Infeasible(422, "can never fit", "infeasible")])
    with pytest.raises(Infeasible):
        run_wait(api)
    assert api.asked == [10]


def test_a_left_over_request_for_other_resources_is_released_and_asked_anew() -> None:
    stale = {**PLACED, "request": {**REQUEST, "gpu_milli": 4000}}
    placed = {**PLACED, "id": 8, "request": REQUEST}
    api = FakeAPI([stale, placed])
    out, _ = run_wait(api)
    assert out["id"] == 8 and api.released == [7]


@pytest.mark.parametrize(
    ("request_", "same"),
    [
        (REQUEST, True),
        ({**REQUEST, "memory_mib": 1024}, False),
        ({**REQUEST, "gpu_models": ["A100"]}, False),
        ({**REQUEST, "cpu_milli": 500}, False),
    ],
)
def test_asks_the_same(request_: dict[str, Any], same: bool) -> None:
    assert asks_the_same(request_, BODY) is same


# ---- the NSML API client over real HTTP (loopback) ---------------------------------------


def serve_and_call(
    answers: list[tuple[int, dict[str, Any]]], call: Callable[[NSMLClient], Awaitable[Any]]
) -> tuple[Any, list[str]]:
    """Serve *answers* in order on a loopback port; run *call* against it; return its result
    (or the exception it raised) and the requests seen."""
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets
    from tornado.web import Application, RequestHandler

    seen: list[str] = []

    class Scripted(RequestHandler):
        def _answer(self) -> None:
            seen.append(f"{self.request.method} {self.request.path}")
            status, body = answers.pop(0) if answers else (500, {"message": "no more"})
            self.set_status(status)
            self.finish(json.dumps(body))

        get = post = delete = _answer  # type: ignore[assignment]

    async def go() -> Any:
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(Application([(r"/api/.*", Scripted)]))
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        client = NSMLClient(f"http://127.0.0.1:{port}/api/", "tok", backoff_s=0.001, retries=3)
        try:
            return await call(client)
        except Exception as e:
            return e
        finally:
            client.close()
            server.stop()

    return asyncio.run(go()), seen


def test_a_release_is_retried_while_the_api_is_briefly_unavailable() -> None:
    out, seen = serve_and_call(
        [(503, {}), (502, {}), (200, {"id": 4, "state": "released"})],
        lambda c: c.release(4),
    )
    assert out == {"id": 4, "state": "released"}
    assert seen == ["DELETE /api/placements/4"] * 3


def test_a_release_gives_up_after_its_retries_with_nsml_unavailable() -> None:
    out, seen = serve_and_call([(503, {})] * 10, lambda c: c.release(4, retries=2))
    assert isinstance(out, NSMLUnavailable) and out.status == 503
    assert len(seen) == 3


def test_releasing_an_unknown_placement_is_fine() -> None:
    out, _ = serve_and_call(
        [(404, {"message": "No placement 4.", "reason": "not_found"})], lambda c: c.release(4)
    )
    assert out is None


def test_can_never_fit_is_infeasible_with_the_api_message_and_is_not_retried() -> None:
    body = {"message": "can never fit: requested 99 GPUs", "reason": "infeasible"}
    out, seen = serve_and_call([(422, body)], lambda c: c.place({"holder": "x"}, wait_s=1))
    assert isinstance(out, Infeasible)
    assert (out.message, out.reason) == (body["message"], "infeasible")
    assert seen == ["POST /api/placements"]


def test_no_server_at_all_is_unavailable() -> None:
    async def go() -> Any:
        client = NSMLClient("http://127.0.0.1:9/api/", "tok", backoff_s=0.001, retries=1)
        try:
            return await client.nodes()
        except NSMLUnavailable as e:
            return e
        finally:
            client.close()

    out = asyncio.run(go())
    assert isinstance(out, NSMLUnavailable) and "did not answer" in out.message


def test_a_remote_engine_over_tcp_uses_the_client_certificate(tmp_path: Path) -> None:
    from nsml_server.backends.docker import remote_tls

    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    tls = remote_tls("tcp://10.0.0.5:2376", str(tmp_path))
    assert tls.cert == (str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    assert tls.ca_cert == str(tmp_path / "ca.pem") and tls.verify is True
    assert remote_tls("unix:///var/run/docker.sock", str(tmp_path)) is None
    assert remote_tls("tcp://10.0.0.5:2376", None) is None

"""DockerBackend against the real engine, with a tiny image built from the host's static busybox.

No registry can be reached, so the session builds ``nsml-test/busybox:latest`` from
``/bin/busybox`` (Debian's ``busybox-static``) with ``docker import``. Every container a test
creates carries a per-test label and is removed afterwards; its logs are printed only when the
test failed. The builder and retry tests at the end need no engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import struct
import tarfile
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import docker.errors
import pytest
import requests.exceptions
import requests.models
from docker.types import DeviceRequest
from docker.types import Mount as DockerMount

from nsml_server.backends import (
    BackendError,
    DockerBackend,
    GPURuntimeMissing,
    ImageNotFound,
    Mount,
    NameConflict,
    RunNotFound,
    RunSpec,
    RunState,
    container_args,
)
from nsml_server.backends.docker import parse_docker_time
from tests.conftest import service_missing

T = TypeVar("T")
IMAGE = "nsml-test/busybox:latest"
BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh cat dd echo env false grep head id kill ls mkdir printf ps rm sleep tail touch true wc"
).split()
MiB = 1024 * 1024


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (PT_INTERP)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    endian = "<" if data[5] == 1 else ">"
    phoff = struct.unpack_from(endian + "Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x36)
    return all(
        struct.unpack_from(endian + "I", data, phoff + i * phentsize)[0] != 3  # PT_INTERP
        for i in range(phnum)
    )


def _image_tar(busybox: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("tmp", 0o1777), ("etc", 0o755)):
            d = tarfile.TarInfo(name)
            d.type, d.mode = tarfile.DIRTYPE, mode
            tar.addfile(d)
        exe = tarfile.TarInfo("bin/busybox")
        exe.size, exe.mode = len(busybox), 0o755
        tar.addfile(exe, io.BytesIO(busybox))
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return buf.getvalue()


@pytest.fixture(scope="session")
def busybox_image(docker_client: Any) -> str:
    """``nsml-test/busybox:latest``, imported unless an identical one is already there."""
    if not BUSYBOX.exists():
        service_missing(
            "docker",
            f"{BUSYBOX} is missing; the test image is built from it: "
            "apt-get install -y busybox-static",
        )
    if not _is_static_elf(BUSYBOX):
        service_missing(
            "docker",
            f"{BUSYBOX} is dynamically linked and cannot run in an empty image: "
            "apt-get install -y busybox-static",
        )
    binary = BUSYBOX.read_bytes()
    digest = hashlib.sha256(binary + " ".join(APPLETS).encode()).hexdigest()[:16]
    try:
        labels = docker_client.api.inspect_image(IMAGE)["Config"].get("Labels") or {}
        if labels.get("nsml.test.busybox") == digest:
            return IMAGE
    except docker.errors.ImageNotFound:
        pass
    repository, tag = IMAGE.rsplit(":", 1)
    docker_client.api.import_image_from_data(
        _image_tar(binary),
        repository=repository,
        tag=tag,
        changes=["ENV PATH=/bin", 'CMD ["/bin/sh"]', f"LABEL nsml.test.busybox={digest}"],
    )
    return IMAGE


@pytest.fixture()
def labels(request: pytest.FixtureRequest, docker_client: Any) -> Iterator[dict[str, str]]:
    """A label unique to this test; its containers are removed after it, logs shown on failure."""
    value = uuid.uuid4().hex[:12]
    failed_before = request.session.testsfailed
    yield {"nsml-test": value}
    containers = docker_client.containers.list(all=True, filters={"label": f"nsml-test={value}"})
    if request.session.testsfailed > failed_before:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            for c in containers:
                text = c.logs().decode("utf-8", "replace")
                print(f"\n----- logs of container {c.name} ({c.status}) -----\n{text}")
    for c in containers:
        c.remove(force=True, v=True)


@pytest.fixture()
def backend(docker_client: Any, busybox_image: str) -> Iterator[DockerBackend]:
    b = DockerBackend(timeout_s=60)
    yield b
    run(b.close())


def make_spec(labels: dict[str, str], *command: str, **kwargs: Any) -> RunSpec:
    kwargs.setdefault("image", IMAGE)
    name = f"nsml-test-{labels['nsml-test']}-{kwargs.pop('suffix', 'run')}"
    return RunSpec(name=name, command=list(command), labels=dict(labels), **kwargs)


async def wait_for_log(backend: DockerBackend, handle: str, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in await backend.logs(handle):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the logs after {timeout}s")
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Against the engine

docker_test = pytest.mark.docker


@docker_test
def test_run_logs_exit_code(backend: DockerBackend, labels: dict[str, str]) -> None:
    async def go() -> None:
        assert await backend.ping()
        h = await backend.start(make_spec(labels, "sh", "-c", "echo hello; echo oops >&2; exit 3"))
        st = await backend.wait(h, timeout_s=30)
        assert (st.state, st.exit_code, st.oom_killed) == (RunState.EXITED, 3, False)
        assert st.started_at and st.finished_at and st.started_at <= st.finished_at
        out = await backend.logs(h)
        assert "hello" in out and "oops" in out
        assert (await backend.logs(h, tail=1)).strip() in ("hello", "oops")

    run(go())


@docker_test
def test_gpu_env_host_network_and_no_device_requests(
    backend: DockerBackend, labels: dict[str, str], docker_client: Any
) -> None:
    async def go() -> None:
        assert await backend.has_nvidia_runtime() is False, "this engine has no nvidia runtime"
        spec = make_spec(
            labels,
            "env",
            gpu_ids=["1", "3"],
            env={"NVIDIA_VISIBLE_DEVICES": "all", "NSML_SESSION": "alice/mnist/1"},
        )
        h = await backend.start(spec)
        await backend.wait(h, timeout_s=30)
        env = dict(
            line.split("=", 1) for line in (await backend.logs(h)).splitlines() if "=" in line
        )
        assert env["NVIDIA_VISIBLE_DEVICES"] == "1,3", "the run cannot widen its GPUs"
        assert env["CUDA_VISIBLE_DEVICES"] == "0,1", "CUDA numbers a container's GPUs from 0"
        assert env["NSML_SESSION"] == "alice/mnist/1"
        info = docker_client.api.inspect_container(h)
        assert not info["HostConfig"].get("DeviceRequests")
        assert info["HostConfig"]["NetworkMode"] == "host"
        assert list(info["NetworkSettings"]["Networks"]) == ["host"]
        assert info["NetworkSettings"]["Networks"]["host"]["IPAddress"] == ""
        assert info["HostConfig"]["Init"] is True

    run(go())


@docker_test
def test_memory_limit_oom_kill(
    backend: DockerBackend, labels: dict[str, str], docker_client: Any
) -> None:
    async def go() -> None:
        spec = make_spec(
            labels,
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=200M",
            "count=1",
            mem_limit_bytes=64 * MiB,
            cpu_limit=0.5,
        )
        h = await backend.start(spec)
        st = await backend.wait(h, timeout_s=60)
        assert (st.state, st.exit_code, st.oom_killed) == (RunState.EXITED, 137, True)
        host = docker_client.api.inspect_container(h)["HostConfig"]
        assert (host["Memory"], host["MemorySwap"], host["NanoCpus"]) == (
            64 * MiB,
            64 * MiB,
            500_000_000,
        )

    run(go())


@docker_test
def test_copies_reach_the_container_without_a_mount_and_writes_stay_inside(
    backend: DockerBackend, labels: dict[str, str], tmp_path: Path
) -> None:
    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "train.py").write_text("print('hi')\n")
    (code / "pkg" / "run.sh").write_text("echo from-sh\n")
    (code / "pkg" / "run.sh").chmod(0o755)
    script = (
        "cat /work/train.py; /work/pkg/run.sh; echo more >> /work/train.py; echo w=$?; "
        "touch /work/new; echo n=$?; stat -c %a /work /work/train.py /work/pkg/run.sh; "
        "grep -c ' /work ' /proc/mounts; true"
    )

    async def go() -> None:
        spec = make_spec(
            labels,
            "sh",
            "-c",
            script,
            copies=[Mount(str(code), "/work", read_only=False)],
            suffix="copies",
        )
        h = await backend.start(spec)
        assert (await backend.wait(h, timeout_s=30)).exit_code == 0, await backend.logs(h)
        out = await backend.logs(h)
        assert "print('hi')" in out and "from-sh" in out, out
        assert "w=0" in out and "n=0" in out, out
        # Writable by whatever user the image runs as; executables stay executable.
        assert out.split()[-4:-1] == ["777", "666", "777"], out
        assert out.split()[-1] == "0", out  # not a mount: a remote engine gets it the same way
        assert (code / "train.py").read_text() == "print('hi')\n"  # the source is untouched
        assert not (code / "new").exists()

    asyncio.run(go())


@docker_test
def test_read_only_mount_refuses_writes(
    backend: DockerBackend, labels: dict[str, str], tmp_path: Path
) -> None:
    ro, rw = tmp_path / "dataset", tmp_path / "out"
    ro.mkdir()
    rw.mkdir()
    (ro / "train.csv").write_text("x,y\n")
    script = "cat /data/train.csv; touch /data/new 2>&1; echo ro=$?; touch /out/ok; echo rw=$?"

    async def go() -> None:
        spec = make_spec(
            labels,
            "sh",
            "-c",
            script,
            mounts=[
                Mount(str(ro), "/data", read_only=True),
                Mount(str(rw), "/out", read_only=False),
            ],
        )
        h = await backend.start(spec)
        assert (await backend.wait(h, timeout_s=30)).exit_code == 0
        out = await backend.logs(h)
        assert "x,y" in out and "Read-only file system" in out and "ro=1" in out
        assert "rw=0" in out
        assert not (ro / "new").exists() and (rw / "ok").exists()

    run(go())


@docker_test
def test_stop_with_grace_runs_the_term_trap(backend: DockerBackend, labels: dict[str, str]) -> None:
    script = "trap 'echo got TERM; exit 0' TERM; echo ready; while true; do sleep 0.1; done"

    async def go() -> None:
        h = await backend.start(make_spec(labels, "sh", "-c", script))
        await wait_for_log(backend, h, "ready")
        assert (await backend.status(h)).state is RunState.RUNNING
        t0 = time.monotonic()
        await backend.stop(h, grace_s=10)
        assert time.monotonic() - t0 < 8
        st = await backend.status(h)
        assert (st.state, st.exit_code) == (RunState.EXITED, 0)
        assert "got TERM" in await backend.logs(h)

    run(go())


@docker_test
def test_stop_kills_after_grace(backend: DockerBackend, labels: dict[str, str]) -> None:
    script = "trap '' TERM; echo ready; while true; do sleep 0.1; done"

    async def go() -> None:
        h = await backend.start(make_spec(labels, "sh", "-c", script))
        await wait_for_log(backend, h, "ready")
        t0 = time.monotonic()
        await backend.stop(h, grace_s=1)
        assert time.monotonic() - t0 >= 1
        st = await backend.status(h)
        assert (st.state, st.exit_code) == (RunState.EXITED, 137)

    run(go())


@docker_test
def test_remove_is_idempotent(backend: DockerBackend, labels: dict[str, str]) -> None:
    async def go() -> None:
        h = await backend.start(make_spec(labels, "sleep", "60"))
        await backend.remove(h)
        await backend.remove(h)
        await backend.stop(h, grace_s=1)
        assert (await backend.status(h)).state is RunState.MISSING
        with pytest.raises(RunNotFound):
            await backend.logs(h)

    run(go())


@docker_test
def test_missing_image_is_a_clear_error(backend: DockerBackend, labels: dict[str, str]) -> None:
    async def go() -> None:
        with pytest.raises(ImageNotFound) as err:
            await backend.start(make_spec(labels, "true", image="nsml-test/absent:1"))
        message = err.value.message
        assert "'nsml-test/absent:1' is not on the Docker engine" in message
        assert "never pulled" in message and "build.sh --image nsml-test/absent:1" in message
        assert IMAGE in message, "the images that are present are listed"
        assert err.value.reason == "image_not_found"
        assert await backend.list(labels) == []

    run(go())


@docker_test
def test_gpu_start_failure_names_the_missing_runtime(
    docker_client: Any, busybox_image: str, labels: dict[str, str]
) -> None:
    async def go() -> None:
        forced = DockerBackend(nvidia_runtime=True)  # as if the engine claimed the runtime
        try:
            with pytest.raises(GPURuntimeMissing) as err:
                await forced.start(make_spec(labels, "true", gpu_ids=["0"]))
            assert "lacks the NVIDIA runtime" in err.value.message
            assert "could not select device driver" in err.value.message
            assert await forced.list(labels) == [], "the half-started container is removed"
        finally:
            await forced.close()

    run(go())


@docker_test
def test_list_finds_runs_by_labels_after_a_restart(
    backend: DockerBackend, labels: dict[str, str]
) -> None:
    async def go() -> None:
        a = await backend.start(make_spec(labels, "sleep", "60", suffix="a"))
        session = {**labels, "nsml.session": "alice/mnist/2"}
        b = await backend.start(make_spec(session, "true", suffix="b"))
        again = DockerBackend()  # a restarted server
        try:
            assert sorted(await again.list(labels)) == sorted([a, b])
            assert await again.list(session) == [b]
            assert await again.list({"nsml-test": "nobody"}) == []
            assert (await again.status(a)).state is RunState.RUNNING
        finally:
            await again.close()
        with pytest.raises(NameConflict):
            await backend.start(make_spec(labels, "true", suffix="a"))

    run(go())


@docker_test
def test_describe_after_ping(backend: DockerBackend) -> None:
    assert run(backend.ping())
    info = backend.describe()
    assert info["kind"] == "docker" and info["isolation"] is True
    assert info["has_nvidia_runtime"] is False and info["endpoint"]


# ---------------------------------------------------------------------------------------------
# Pure parts: no engine needed


def test_container_args_without_nvidia_runtime() -> None:
    spec = RunSpec(
        name="alice-mnist-3",
        image="jupyter-nsml/session:latest",
        command=["python", "main.py", "--lr", "0.1"],
        env={"NSML_SESSION": "alice/mnist/3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
        workdir="/code",
        mounts=[Mount("/srv/datasets/mnist@3", "/data/mnist")],
        gpu_ids=["2", "5"],
        cpu_limit=1.5,
        mem_limit_bytes=2 * 1024 * MiB,
        labels={"nsml.session": "alice/mnist/3"},
    )
    args = container_args(spec, nvidia_runtime=False)
    assert args.create == {
        "image": "jupyter-nsml/session:latest",
        "command": ["python", "main.py", "--lr", "0.1"],
        "name": "alice-mnist-3",
        "environment": {
            "NSML_SESSION": "alice/mnist/3",
            "TINI_SUBREAPER": "1",
            "CUDA_VISIBLE_DEVICES": "0,1",
            "NVIDIA_VISIBLE_DEVICES": "2,5",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        },
        "labels": {"nsml.session": "alice/mnist/3"},
        "detach": True,
        "working_dir": "/code",
    }
    assert args.host_config == {
        "network_mode": "host",
        "init": True,
        "mounts": [
            DockerMount(
                target="/data/mnist", source="/srv/datasets/mnist@3", type="bind", read_only=True
            )
        ],
        "mem_limit": 2 * 1024 * MiB,
        "memswap_limit": 2 * 1024 * MiB,
        "nano_cpus": 1_500_000_000,
    }
    with_runtime = container_args(spec, nvidia_runtime=True)
    assert with_runtime.host_config["device_requests"] == [
        DeviceRequest(device_ids=["2", "5"], capabilities=[["gpu"]])
    ]


def test_container_args_cpu_only_run() -> None:
    spec = RunSpec(name="nb-bob", image="i", command=["jupyterhub-singleuser"])
    args = container_args(spec, nvidia_runtime=True)
    assert "device_requests" not in args.host_config
    assert args.create["environment"] == {
        "TINI_SUBREAPER": "1",
        "NVIDIA_VISIBLE_DEVICES": "void",
        "CUDA_VISIBLE_DEVICES": "",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    uuid_spec = RunSpec(name="u", image="i", command=["x"], gpu_ids=["GPU-aaaa", "GPU-bbbb"])
    env = container_args(uuid_spec, nvidia_runtime=False).create["environment"]
    assert env["CUDA_VISIBLE_DEVICES"] == env["NVIDIA_VISIBLE_DEVICES"] == "GPU-aaaa,GPU-bbbb"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "bad name"}, "run name 'bad name' is invalid"),
        ({"command": []}, "empty command"),
        ({"cpu_limit": 0}, "cpu_limit 0 must be > 0"),
        ({"mem_limit_bytes": 1024}, "at least 4 MiB"),
        ({"gpu_ids": ["first"]}, "GPU id 'first' is invalid"),
    ],
)
def test_run_spec_rejects_bad_values(kwargs: dict[str, Any], fragment: str) -> None:
    base: dict[str, Any] = {"name": "ok", "image": "i", "command": ["true"]}
    with pytest.raises(ValueError, match=fragment):
        RunSpec(**{**base, **kwargs})
    with pytest.raises(ValueError, match="absolute path"):
        Mount("data", "/data")


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2024-05-01T12:34:56.123456789Z", "2024-05-01T12:34:56.123456+00:00"),
        ("2024-05-01T12:34:56Z", "2024-05-01T12:34:56+00:00"),
        ("2024-05-01T12:34:56.5+02:00", "2024-05-01T12:34:56.500000+02:00"),
        ("0001-01-01T00:00:00Z", None),
        ("", None),
    ],
)
def test_parse_docker_time(text: str, iso: str | None) -> None:
    parsed = parse_docker_time(text)
    assert (parsed.isoformat() if parsed else None) == iso


class _Flaky:
    """Fails with the given errors, then returns "ok"; counts the calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, api: Any) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def _offline_backend() -> DockerBackend:
    b = DockerBackend("unix:///nonexistent.sock", retries=3, backoff_s=0.001, rng=random.Random(1))
    b._client = SimpleNamespace(api=None, close=lambda: None)  # type: ignore[assignment]
    return b


def _api_error(status: int) -> docker.errors.APIError:
    response = requests.models.Response()
    response.status_code, response.reason = status, "engine says no"
    response.url = "http+docker://localhost/v1.41/containers/json"
    return docker.errors.APIError("engine says no", response=response)


@pytest.mark.parametrize(
    ("errors", "idempotent", "calls", "succeeds"),
    [
        ([requests.exceptions.ConnectionError("refused")] * 2, True, 3, True),
        ([requests.exceptions.ReadTimeout("slow")] * 3, True, 4, True),
        ([requests.exceptions.ConnectionError("refused")] * 4, True, 4, False),
        ([_api_error(503)], True, 2, True),
        ([_api_error(500)], True, 1, False),
        ([_api_error(404)], True, 1, False),
        ([requests.exceptions.ConnectionError("refused")], False, 1, False),
    ],
    ids=[
        "connection refused twice, then fine",
        "timeouts are retried",
        "gives up after the retries",
        "503 is transient",
        "500 is a refusal, not retried",
        "404 is not retried",
        "creating calls are never retried",
    ],
)
def test_call_retries_only_transient_errors_of_idempotent_calls(
    errors: list[Exception], idempotent: bool, calls: int, succeeds: bool
) -> None:
    backend = _offline_backend()
    flaky = _Flaky(*errors)

    async def go() -> str:
        return await backend._call("test", flaky, idempotent=idempotent)

    if succeeds:
        assert run(go()) == "ok"
    else:
        with pytest.raises(Exception):  # noqa: B017 - the original error propagates
            run(go())
    assert flaky.calls == calls
    run(backend.close())


def test_an_engine_that_does_not_answer_is_a_backend_error(tmp_path: Path) -> None:
    backend = DockerBackend(f"unix://{tmp_path}/absent.sock", retries=1, backoff_s=0.001)

    async def go() -> None:
        assert await backend.ping() is False
        with pytest.raises(BackendError) as err:
            await backend.status("abc")
        assert err.value.reason == "engine_unavailable"
        assert "does not answer" in err.value.message and "absent.sock" in err.value.message
        await backend.close()

    run(go())


@docker_test
def test_the_local_engine_streams_logs_while_docker_cert_path_names_remote_engines_certificates(
    busybox_image: str,
    labels: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The production layout: the server's own engine on its socket, DOCKER_CERT_PATH for the
    # remote nodes' engines (docs/operators-guide.md).
    certs = tmp_path / "client"
    certs.mkdir()
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (certs / name).write_text("")
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
    monkeypatch.setenv("DOCKER_CERT_PATH", str(certs))
    backend = DockerBackend(timeout_s=60)
    dest = tmp_path / "run.log"

    async def go() -> int:
        handle = await backend.start(make_spec(labels, "sh", "-c", "echo streamed-line"))
        copied = await asyncio.wait_for(backend.copy_logs(handle, dest), 60)
        await backend.close()
        return copied

    assert run(go()) > 0
    assert "streamed-line" in dest.read_text()

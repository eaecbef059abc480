"""The GPU probe interface: NVML (against FakeNVML), the virtual inventory, and the fake itself."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from gpu_scheduler import fake_nvml
from gpu_scheduler.fake_nvml import FakeGPU, FakeNVML
from gpu_scheduler.probe import (
    DEFAULT_VIRTUAL_GPU_MEMORY_MIB,
    DEFAULT_VIRTUAL_GPU_MODEL,
    GPUProbe,
    NVMLProbe,
    VirtualProbe,
    parse_memory_mib,
    parse_nvlink_pairs,
    probe_from_env,
)

# ---------------------------------------------------------------------------------------------
# NVMLProbe against FakeNVML: what a node reports


@dataclass
class NodeCase:
    name: str
    nvml: FakeNVML
    peers: dict[int, tuple[int, ...]]
    pcie_groups: dict[int, int | None]
    utilization: dict[int, int | None] = field(default_factory=dict)
    indices: tuple[int, ...] | None = None  # GPUs expected in the result; None = all
    warning: str | None = None  # a fragment expected in status().warnings


PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7)]
NODE_CASES = [
    NodeCase(
        name="healthy 8-GPU node: NVLink pairs, two GPUs per PCIe switch",
        nvml=FakeNVML(8, nvlink_pairs=PAIRS, pcie_switches=PAIRS),
        peers={0: (1,), 1: (0,), 2: (3,), 3: (2,), 4: (5,), 5: (4,), 6: (7,), 7: (6,)},
        pcie_groups={0: 0, 1: 0, 2: 2, 3: 2, 4: 4, 5: 4, 6: 6, 7: 6},
    ),
    NodeCase(
        name="NVSwitch fabric: every GPU is every other GPU's NVLink peer",
        nvml=FakeNVML(8, nvswitch=True, pcie_switches=[(0, 1, 2, 3), (4, 5, 6, 7)]),
        peers={i: tuple(j for j in range(8) if j != i) for i in range(8)},
        pcie_groups={0: 0, 1: 0, 2: 0, 3: 0, 4: 4, 5: 4, 6: 4, 7: 4},
    ),
    NodeCase(
        name="PCIe-only GPUs: no NVLink peers, groups by switch, loners alone",
        nvml=FakeNVML(4, model="NVIDIA L4", memory_total_mib=23034, pcie_switches=[(1, 2)]),
        peers={i: () for i in range(4)},
        pcie_groups={0: 0, 1: 1, 2: 1, 3: 3},
    ),
    NodeCase(
        name="single GPU: its own PCIe group, no peers",
        nvml=FakeNVML(1),
        peers={0: ()},
        pcie_groups={0: 0},
    ),
    NodeCase(
        name="utilization NotSupported on gpu3: None there, the probe keeps working",
        nvml=FakeNVML(8, nvlink_pairs=PAIRS, unsupported={"nvmlDeviceGetUtilizationRates": {3}}),
        peers={0: (1,), 1: (0,), 2: (3,), 3: (2,), 4: (5,), 5: (4,), 6: (7,), 7: (6,)},
        pcie_groups={i: i for i in range(8)},
        utilization={3: None, 0: 0},
        warning="gpu3: utilization not available (Not Supported)",
    ),
    NodeCase(
        name="topology NotSupported: PCIe groups unknown (None)",
        nvml=FakeNVML(
            2, unsupported={"nvmlDeviceGetTopologyCommonAncestor": {0, 1}}, nvlink_pairs=[(0, 1)]
        ),
        peers={0: (1,), 1: (0,)},
        pcie_groups={0: None, 1: None},
        warning="PCIe topology",
    ),
    NodeCase(
        name="NVLink queries NotSupported on gpu1: its links are not read, gpu0 still sees it",
        nvml=FakeNVML(2, nvlink_pairs=[(0, 1)], unsupported={"nvmlDeviceGetNvLinkState": {1}}),
        peers={0: (1,), 1: (0,)},
        pcie_groups={0: 0, 1: 1},
    ),
    NodeCase(
        name="a lost GPU is left out with a warning; the others are reported",
        nvml=FakeNVML(4, lost={2}),
        peers={0: (), 1: (), 3: ()},
        pcie_groups={0: 0, 1: 1, 3: 3},
        indices=(0, 1, 3),
        warning="gpu2 left out",
    ),
]


@pytest.mark.parametrize("case", NODE_CASES, ids=lambda c: c.name)
def test_nvml_probe_reports_the_node(case: NodeCase) -> None:
    probe = NVMLProbe(nvml=case.nvml)
    gpus = probe.gpus()
    expected = case.indices if case.indices is not None else tuple(range(len(case.nvml.gpus)))
    assert tuple(g.index for g in gpus) == expected
    assert {g.index: g.nvlink_peers for g in gpus} == case.peers
    assert {g.index: g.pcie_group for g in gpus} == case.pcie_groups
    for index, util in case.utilization.items():
        assert gpus[expected.index(index)].utilization_pct == util
    for g in gpus:
        fake = case.nvml.gpus[g.index]
        assert (g.uuid, g.model, g.memory_total_mib) == (
            fake.uuid,
            fake.name,
            fake.memory_total_mib,
        )
    status = probe.status()
    assert status.enabled and status.kind == "nvml" and status.reason is None
    assert status.driver_version == "550.54.15"
    if case.warning:
        assert any(case.warning in w for w in status.warnings), status.warnings
    else:
        assert status.warnings == ()
    probe.close()
    assert case.nvml.init_count == 0


@dataclass
class DisabledCase:
    name: str
    nvml: FakeNVML | None  # None: pynvml itself cannot be imported
    reason: str


DISABLED_CASES = [
    DisabledCase(
        "driver library missing (NVMLError_LibraryNotFound)",
        FakeNVML(init_error="library_not_found"),
        "libnvidia-ml.so.1) was not found",
    ),
    DisabledCase(
        "driver installed but not loaded",
        FakeNVML(init_error="driver_not_loaded"),
        "installed but not loaded",
    ),
    DisabledCase(
        "no permission on the driver", FakeNVML(init_error="no_permission"), "no permission"
    ),
    DisabledCase("any other NVML error at init", FakeNVML(init_error="unknown"), "Unknown Error"),
    DisabledCase("NVML works but there is no GPU", FakeNVML(0), "found no GPU"),
    DisabledCase("nvidia-ml-py not installed", None, "nvidia-ml-py package is not installed"),
]


@pytest.mark.parametrize("case", DISABLED_CASES, ids=lambda c: c.name)
def test_nvml_probe_disabled_says_why(case: DisabledCase, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.nvml is None:
        monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    probe = NVMLProbe(nvml=case.nvml)
    status = probe.status()
    assert not status.enabled
    assert status.kind == "none"
    assert status.reason is not None and case.reason in status.reason, status.reason
    assert probe.gpus() == []
    assert probe.enabled is False
    if case.nvml is not None:
        assert case.nvml.init_count == 0, "a failed start must not leave NVML initialised"
        assert case.nvml.calls.count("nvmlInit") == 1, "the failure is recorded, not retried"


def test_nvml_probe_is_lazy() -> None:
    fake = FakeNVML(2)
    probe = NVMLProbe(nvml=fake)
    assert fake.calls == [], "constructing the probe must not touch NVML"
    probe.status()
    assert fake.calls[0] == "nvmlInit"


def test_importing_the_probe_does_not_import_pynvml() -> None:
    code = "import sys, gpu_scheduler.probe; assert 'pynvml' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_static_facts_are_cached_and_live_facts_reread() -> None:
    fake = FakeNVML(2, nvlink_pairs=[(0, 1)])
    probe = NVMLProbe(nvml=fake)
    probe.gpus()
    fake.calls.clear()
    fake.gpus[1].utilization_pct = 87
    fake.gpus[1].memory_used_mib = 4096
    second = probe.gpus()
    assert (second[1].utilization_pct, second[1].memory_used_mib) == (87, 4096)
    topology = {c for c in fake.calls if "NvLink" in c or "Topology" in c or "UUID" in c}
    assert topology == set(), "NVLink, topology and identity are read once"


def test_close_shuts_nvml_down_and_the_next_call_starts_again() -> None:
    fake = FakeNVML(1)
    with NVMLProbe(nvml=fake) as probe:
        assert len(probe.gpus()) == 1
        assert fake.init_count == 1
    assert fake.init_count == 0
    assert len(probe.gpus()) == 1
    assert fake.init_count == 1
    probe.close()


def test_probe_reports_the_fakes_heterogeneous_gpus() -> None:
    fake = FakeNVML(
        [
            FakeGPU(name="NVIDIA H100 80GB HBM3", memory_total_mib=81559, memory_used_mib=512),
            FakeGPU(name="NVIDIA L4", memory_total_mib=23034, utilization_pct=35),
        ]
    )
    gpus = NVMLProbe(nvml=fake).gpus()
    assert [(g.model, g.memory_total_mib, g.memory_used_mib, g.utilization_pct) for g in gpus] == [
        ("NVIDIA H100 80GB HBM3", 81559, 512, 0),
        ("NVIDIA L4", 23034, 0, 35),
    ]


def test_real_pynvml_on_this_machine_works_or_says_why() -> None:
    with NVMLProbe() as probe:
        status = probe.status()
        if status.enabled:
            assert status.kind == "nvml" and probe.gpus()
        else:
            assert status.kind == "none" and status.reason, status


# ---------------------------------------------------------------------------------------------
# FakeNVML must not drift from pynvml


def _fake_public_names() -> list[str]:
    return sorted(n for n in vars(FakeNVML) if n.startswith(("nvml", "NVML")))


def test_fake_exposes_a_useful_interface() -> None:
    names = _fake_public_names()
    assert "nvmlDeviceGetTopologyCommonAncestor" in names and "NVMLError_NotSupported" in names


@pytest.mark.parametrize("name", _fake_public_names())
def test_fake_name_matches_real_pynvml(name: str) -> None:
    pynvml = pytest.importorskip("pynvml")
    assert hasattr(pynvml, name), f"pynvml has no {name}: FakeNVML invents it"
    fake_attr = getattr(FakeNVML, name)
    real_attr = getattr(pynvml, name)
    if isinstance(fake_attr, type) and issubclass(fake_attr, fake_nvml.NVMLError):
        assert issubclass(real_attr, pynvml.NVMLError)
        assert real_attr(fake_attr.code).value == fake_attr().value
        assert str(real_attr(fake_attr.code)) == str(fake_attr())
    elif callable(fake_attr):
        fake_params = list(inspect.signature(getattr(FakeNVML(0), name)).parameters.values())
        real_params = list(inspect.signature(real_attr).parameters.values())
        assert [p.name for p in fake_params] == [p.name for p in real_params]
        assert [p.default is inspect.Parameter.empty for p in fake_params] == [
            p.default is inspect.Parameter.empty for p in real_params
        ], "required/optional parameters differ"
    else:
        assert fake_attr == real_attr, f"{name}: fake {fake_attr!r} != pynvml {real_attr!r}"


def test_fake_error_maps_codes_to_subclasses_like_pynvml() -> None:
    err = fake_nvml.NVMLError(fake_nvml.NVML_ERROR_NOT_SUPPORTED)
    assert isinstance(err, fake_nvml.NVMLError_NotSupported)
    assert err.value == 3 and str(err) == "Not Supported"
    assert fake_nvml.NVMLError(12345).value == 12345


class _Recorder:
    """Wraps a module-like object and records every attribute the probe reads from it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.used: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        self.used.add(name)
        return getattr(self._inner, name)


@pytest.mark.parametrize(
    "fake",
    [
        FakeNVML(8, nvlink_pairs=PAIRS, pcie_switches=PAIRS),
        FakeNVML(8, nvswitch=True, lost={7}, unsupported={"nvmlDeviceGetUtilizationRates": {1}}),
        FakeNVML(init_error="library_not_found"),
        FakeNVML(init_error="driver_not_loaded"),
        FakeNVML(init_error="no_permission"),
        FakeNVML(init_error="unknown"),
        FakeNVML(0),
    ],
    ids=["pairs", "nvswitch", "no-library", "not-loaded", "no-permission", "unknown", "no-gpu"],
)
def test_probe_uses_only_names_that_exist_in_real_pynvml(fake: FakeNVML) -> None:
    pynvml = pytest.importorskip("pynvml")
    recorder = _Recorder(fake)
    probe = NVMLProbe(nvml=recorder)
    probe.gpus()
    probe.status()
    probe.close()
    assert recorder.used, "the probe read nothing"
    missing = sorted(n for n in recorder.used if not hasattr(pynvml, n))
    assert missing == []


# ---------------------------------------------------------------------------------------------
# VirtualProbe and probe_from_env


@pytest.mark.parametrize(
    ("env", "count", "model", "memory", "peers"),
    [
        ({"NSML_VIRTUAL_GPUS": "4"}, 4, DEFAULT_VIRTUAL_GPU_MODEL, 16384, {}),
        ({"NSML_VIRTUAL_GPUS": "0"}, 0, DEFAULT_VIRTUAL_GPU_MODEL, 16384, {}),
        (
            {
                "NSML_VIRTUAL_GPUS": " 4 ",
                "NSML_VIRTUAL_GPU_MODEL": "NVIDIA A100-SXM4-40GB",
                "NSML_VIRTUAL_GPU_MEMORY": "40G",
                "NSML_VIRTUAL_NVLINK": "0-1,2-3",
            },
            4,
            "NVIDIA A100-SXM4-40GB",
            40960,
            {0: (1,), 1: (0,), 2: (3,), 3: (2,)},
        ),
        (
            {"NSML_VIRTUAL_GPUS": "3", "NSML_VIRTUAL_NVLINK": "0-1, 1-2, 1-0"},
            3,
            DEFAULT_VIRTUAL_GPU_MODEL,
            16384,
            {0: (1,), 1: (0, 2), 2: (1,)},
        ),
        ({"NSML_VIRTUAL_GPUS": "1", "NSML_VIRTUAL_GPU_MEMORY": "8192M"}, 1, None, 8192, {}),
    ],
    ids=["four-defaults", "zero-gpus", "full-config", "nvlink-chain-deduplicated", "mib"],
)
def test_virtual_probe_from_env(
    env: dict[str, str], count: int, model: str | None, memory: int, peers: dict[int, tuple[int]]
) -> None:
    probe = probe_from_env(env, node_name="node-a")
    assert isinstance(probe, VirtualProbe)
    gpus = probe.gpus()
    assert [g.index for g in gpus] == list(range(count))
    assert all(g.memory_total_mib == memory and g.memory_used_mib == 0 for g in gpus)
    if model is not None:
        assert all(g.model == model for g in gpus)
    assert {g.index: g.nvlink_peers for g in gpus if g.nvlink_peers} == peers
    assert all(g.utilization_pct is None and g.pcie_group is None for g in gpus)
    assert probe.status().enabled and probe.status().kind == "virtual"


def test_virtual_uuids_are_stable_unique_and_gpu_shaped() -> None:
    a1 = VirtualProbe(8, node_name="node-a").gpus()
    a2 = VirtualProbe(8, node_name="node-a").gpus()
    b = VirtualProbe(8, node_name="node-b").gpus()
    assert [g.uuid for g in a1] == [g.uuid for g in a2]
    assert len({g.uuid for g in a1 + b}) == 16
    shape = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
    assert all(shape.match(g.uuid) for g in a1)


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("16G", 16384),
        ("16g", 16384),
        ("16GiB", 16384),
        ("16GB", 16384),
        ("16384M", 16384),
        ("16384", 16384),
        ("1.5G", 1536),
        ("1T", 1024 * 1024),
        ("2097152K", 2048),
        (" 24 G ", 24576),
    ],
)
def test_parse_memory_accepts(text: str, mib: int) -> None:
    assert parse_memory_mib(text) == mib


@pytest.mark.parametrize("text", ["16X", "-1G", "G", "sixteen", "0M", "512K", "16 G B i"])
def test_parse_memory_rejects_with_value_and_form(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_memory_mib(text)
    assert repr(text) in str(err.value) and '"16G"' in str(err.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0-4", "GPU index 4 is out of range for 4 GPU(s) (valid: 0..3)"),
        ("1-1", "links a GPU to itself"),
        ("0", "is not a pair"),
        ("a-b", "is not a pair"),
        ("0-1-2", "is not a pair"),
        ("0:1", "is not a pair"),
    ],
)
def test_parse_nvlink_rejects_with_value_and_form(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_nvlink_pairs(text, 4)
    message = str(err.value)
    assert fragment in message and repr(text) in message and '"0-1,2-3"' in message


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"NSML_VIRTUAL_GPUS": "four"}, "NSML_VIRTUAL_GPUS='four' is not a GPU count"),
        ({"NSML_VIRTUAL_GPUS": "-1"}, "NSML_VIRTUAL_GPUS='-1'"),
        ({"NSML_VIRTUAL_GPUS": "1.5"}, "expected a whole number"),
        ({"NSML_VIRTUAL_GPUS": "99999"}, "0..1024"),
        ({"NSML_VIRTUAL_GPUS": "2", "NSML_VIRTUAL_GPU_MEMORY": "lots"}, "'lots'"),
        ({"NSML_VIRTUAL_GPUS": "2", "NSML_VIRTUAL_NVLINK": "0-2"}, "NSML_VIRTUAL_NVLINK='0-2'"),
    ],
)
def test_bad_virtual_env_is_a_value_error_naming_the_value(
    env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        probe_from_env(env, node_name="node-a")


def test_probe_from_env_picks_nvml_when_virtual_is_unset(nsml_env: pytest.MonkeyPatch) -> None:
    assert isinstance(probe_from_env({}), NVMLProbe)
    assert isinstance(probe_from_env({"NSML_VIRTUAL_GPUS": "  "}), NVMLProbe)
    assert isinstance(probe_from_env(), NVMLProbe)
    nsml_env.setenv("NSML_VIRTUAL_GPUS", "2")
    probe = probe_from_env(node_name="node-a")
    assert isinstance(probe, VirtualProbe) and len(probe.gpus()) == 2


def test_virtual_probe_constructor_validates() -> None:
    with pytest.raises(ValueError, match="out of range"):
        VirtualProbe(-1)
    with pytest.raises(ValueError, match="NVLink pair 0-5 is invalid for 2"):
        VirtualProbe(2, nvlink_pairs=[(0, 5)])
    probe: GPUProbe = VirtualProbe(1, memory_mib=DEFAULT_VIRTUAL_GPU_MEMORY_MIB)
    with probe:
        assert probe.gpus()[0].memory_total_mib == 16384


def test_nsml_gpu_probe_plugs_in_a_factory_of_another_kind() -> None:
    import json

    env = {
        "NSML_GPU_PROBE": "tests.gpu_program:probe",
        "NSML_VIRTUAL_GPUS": "8",  # the plugged-in probe wins
        "NSML_TEST_GPU_PROGRAM": json.dumps(
            {"gpus": 2, "model": "PROG-GPU", "utilization": {"1": [5, 60, 95]}}
        ),
    }
    probe = probe_from_env(env, node_name="node-a")
    assert isinstance(probe, NVMLProbe)
    seen = [[g.utilization_pct for g in probe.gpus()] for _ in range(4)]
    assert [s[1] for s in seen] == [5, 60, 95, 95] and {g.model for g in probe.gpus()} == {
        "PROG-GPU"
    }


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("tests.gpu_program", "write it as package.module:factory"),
        (":probe", "write it as package.module:factory"),
        ("no_such_module_xyz:probe", "No module named 'no_such_module_xyz'"),
        ("tests.gpu_program:nothing", "has no attribute 'nothing'"),
        ("tests.gpu_program:PROGRAM_ENV", "PROGRAM_ENV is not callable"),
    ],
)
def test_a_bad_nsml_gpu_probe_is_a_value_error_naming_it(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)) as e:
        probe_from_env({"NSML_GPU_PROBE": spec}, node_name="node-a")
    assert f"NSML_GPU_PROBE={spec!r}" in str(e.value)

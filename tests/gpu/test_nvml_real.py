"""NVMLProbe against the real driver: runs where a GPU is lent, skips with the reason elsewhere."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpu_scheduler.probe import GPUInfo, NVMLProbe
from tests.conftest import service_missing

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def probe() -> Iterator[NVMLProbe]:
    """The real NVML probe; skips (or fails when ``gpu`` is required) if NVML is disabled."""
    nvml_probe = NVMLProbe()
    status = nvml_probe.status()
    if not status.enabled:
        service_missing("gpu", f"NVML does not initialise: {status.reason}")
    yield nvml_probe
    nvml_probe.close()


@pytest.fixture(scope="module")
def gpus(probe: NVMLProbe) -> list[GPUInfo]:
    return probe.gpus()


def test_status_names_the_driver(probe: NVMLProbe) -> None:
    status = probe.status()
    assert status.enabled and status.kind == "nvml"
    assert status.driver_version and status.driver_version[0].isdigit()


def test_at_least_one_gpu_with_unique_uuids(gpus: list[GPUInfo]) -> None:
    assert len(gpus) > 0
    assert [g.index for g in gpus] == sorted(g.index for g in gpus)
    assert len({g.uuid for g in gpus}) == len(gpus)
    assert all(g.uuid.startswith(("GPU-", "MIG-")) for g in gpus)
    assert all(g.model for g in gpus)


def test_memory_is_reported(gpus: list[GPUInfo]) -> None:
    for g in gpus:
        assert g.memory_total_mib > 0
        assert 0 <= g.memory_used_mib <= g.memory_total_mib
        assert g.utilization_pct is None or 0 <= g.utilization_pct <= 100


def test_nvlink_and_topology_are_consistent(gpus: list[GPUInfo]) -> None:
    indices = {g.index for g in gpus}
    peers = {g.index: set(g.nvlink_peers) for g in gpus}
    for g in gpus:
        assert g.index not in g.nvlink_peers
        assert set(g.nvlink_peers) <= indices
        for p in g.nvlink_peers:
            assert g.index in peers[p], "NVLink peers must be symmetric"
        assert g.pcie_group is None or g.pcie_group in indices


def test_rereading_is_stable_and_close_reopens(probe: NVMLProbe, gpus: list[GPUInfo]) -> None:
    again = probe.gpus()
    assert [(g.uuid, g.nvlink_peers, g.pcie_group) for g in again] == [
        (g.uuid, g.nvlink_peers, g.pcie_group) for g in gpus
    ]
    probe.close()
    assert [g.uuid for g in probe.gpus()] == [g.uuid for g in gpus]

"""A fake of the ``pynvml`` module for tests on machines without an NVIDIA GPU.

:class:`FakeNVML` implements the functions, exceptions and constants that
:class:`gpu_scheduler.probe.NVMLProbe` calls, with the names, signatures, error codes and return
shapes of ``nvidia-ml-py``; ``tests/unit/test_probe.py`` checks every public name here against
the real module so that the two cannot drift apart. Pass an instance where the module would go::

    probe = NVMLProbe(nvml=FakeNVML(gpus=8, nvlink_pairs=[(0, 1), (2, 3)]))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

__all__ = [
    "FakeGPU",
    "FakeHandle",
    "FakeMemory",
    "FakeNVML",
    "FakePciInfo",
    "FakeUtilization",
    "InitError",
    "NVMLError",
]

# Constants, with the values of nvidia-ml-py.
NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1
NVML_NVLINK_MAX_LINKS = 36
NVML_NVLINK_DEVICE_TYPE_GPU = 0x00
NVML_NVLINK_DEVICE_TYPE_SWITCH = 0x02
NVML_NVLINK_DEVICE_TYPE_UNKNOWN = 0xFF
NVML_TOPOLOGY_INTERNAL = 0
NVML_TOPOLOGY_SINGLE = 10
NVML_TOPOLOGY_MULTIPLE = 20
NVML_TOPOLOGY_HOSTBRIDGE = 30
NVML_TOPOLOGY_NODE = 40
NVML_TOPOLOGY_SYSTEM = 50

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

# The class and field names below are pynvml's (NVMLError_NotSupported, busId, ...).

_ERROR_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Base of the NVML errors; ``NVMLError(code)`` gives the subclass for *code*, as in pynvml.

    Attributes:
        value: the NVML return code.
    """

    code: ClassVar[int] = NVML_ERROR_UNKNOWN
    _by_code: ClassVar[dict[int, type[NVMLError]]] = {}
    value: int

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        NVMLError._by_code[cls.code] = cls

    def __new__(cls, value: int | None = None) -> NVMLError:
        target: type[NVMLError] = cls
        if cls is NVMLError and value is not None:
            target = NVMLError._by_code.get(value, NVMLError)
        obj = Exception.__new__(target)
        obj.value = target.code if value is None or target is not NVMLError else value
        return obj

    def __init__(self, value: int | None = None) -> None:
        super().__init__(self.value)

    def __str__(self) -> str:
        return _ERROR_STRINGS.get(self.value, f"NVML Error with code {self.value}")


class NVMLError_Uninitialized(NVMLError):
    code = NVML_ERROR_UNINITIALIZED


class NVMLError_InvalidArgument(NVMLError):
    code = NVML_ERROR_INVALID_ARGUMENT


class NVMLError_NotSupported(NVMLError):
    code = NVML_ERROR_NOT_SUPPORTED


class NVMLError_NoPermission(NVMLError):
    code = NVML_ERROR_NO_PERMISSION


class NVMLError_NotFound(NVMLError):
    code = NVML_ERROR_NOT_FOUND


class NVMLError_DriverNotLoaded(NVMLError):
    code = NVML_ERROR_DRIVER_NOT_LOADED


class NVMLError_LibraryNotFound(NVMLError):
    code = NVML_ERROR_LIBRARY_NOT_FOUND


class NVMLError_FunctionNotFound(NVMLError):
    code = NVML_ERROR_FUNCTION_NOT_FOUND


class NVMLError_GpuIsLost(NVMLError):
    code = NVML_ERROR_GPU_IS_LOST


class NVMLError_Unknown(NVMLError):
    code = NVML_ERROR_UNKNOWN


InitError = Literal["library_not_found", "driver_not_loaded", "no_permission", "unknown"]

_INIT_ERRORS: dict[str, type[NVMLError]] = {
    "library_not_found": NVMLError_LibraryNotFound,
    "driver_not_loaded": NVMLError_DriverNotLoaded,
    "no_permission": NVMLError_NoPermission,
    "unknown": NVMLError_Unknown,
}


@dataclass
class FakeGPU:
    """One fake GPU; change the fields between calls to simulate load."""

    name: str = "NVIDIA A100-SXM4-80GB"
    memory_total_mib: int = 81920
    memory_used_mib: int = 0
    utilization_pct: int = 0
    uuid: str = ""


@dataclass(frozen=True)
class FakeHandle:
    """What ``nvmlDeviceGetHandleByIndex`` returns (an opaque pointer in pynvml)."""

    index: int


@dataclass(frozen=True)
class FakeMemory:
    """``c_nvmlMemory_t``: sizes in bytes."""

    total: int
    free: int
    used: int


@dataclass(frozen=True)
class FakeUtilization:
    """``c_nvmlUtilization_t``: percentages."""

    gpu: int
    memory: int


@dataclass(frozen=True)
class FakePciInfo:
    """``nvmlPciInfo_t``: ``busId`` is bytes, as ctypes char arrays are."""

    busId: bytes
    busIdLegacy: bytes
    domain: int
    bus: int
    device: int
    pciDeviceId: int
    pciSubSystemId: int


def _pci(domain: int, bus: int) -> FakePciInfo:
    return FakePciInfo(
        busId=f"{domain:08X}:{bus:02X}:00.0".encode(),
        busIdLegacy=f"{domain:04X}:{bus:02X}:00.0".encode(),
        domain=domain,
        bus=bus,
        device=0,
        pciDeviceId=0x20B510DE,
        pciSubSystemId=0x157710DE,
    )


_MIB = 1024 * 1024
_SWITCH_DOMAIN = 0x10
_NVSWITCHES = 4


class FakeNVML:
    """A configurable stand-in for the ``pynvml`` module.

    Args:
        gpus: how many identical GPUs (built from *model* and *memory_total_mib*), or the GPUs.
        model: product name of generated GPUs.
        memory_total_mib: memory of generated GPUs, in MiB.
        nvlink_pairs: GPU index pairs joined by NVLink (*links_per_pair* links each).
        links_per_pair: NVLinks between the two GPUs of a pair.
        nvlink_links: NVLinks per GPU; links past the last one give InvalidArgument.
        nvswitch: every link of every GPU goes to an NVSwitch (DGX-style fabric).
        pcie_switches: groups of GPU indices that share a PCIe switch; other pairs meet at the
            host bridge.
        init_error: make ``nvmlInit`` fail as on a machine without driver library, with the
            driver not loaded, without permission, or with an unknown error.
        unsupported: function name -> GPU indices for which it raises NotSupported.
        lost: GPU indices whose queries raise GpuIsLost (the handle still resolves).
        driver_version: what ``nvmlSystemGetDriverVersion`` returns.

    No GPU at all has NVLink (queries raise NotSupported) unless *nvlink_pairs* or *nvswitch*
    is given. ``calls`` records the name of every function called.
    """

    NVML_FEATURE_DISABLED = NVML_FEATURE_DISABLED
    NVML_FEATURE_ENABLED = NVML_FEATURE_ENABLED
    NVML_NVLINK_MAX_LINKS = NVML_NVLINK_MAX_LINKS
    NVML_NVLINK_DEVICE_TYPE_GPU = NVML_NVLINK_DEVICE_TYPE_GPU
    NVML_NVLINK_DEVICE_TYPE_SWITCH = NVML_NVLINK_DEVICE_TYPE_SWITCH
    NVML_NVLINK_DEVICE_TYPE_UNKNOWN = NVML_NVLINK_DEVICE_TYPE_UNKNOWN
    NVML_TOPOLOGY_INTERNAL = NVML_TOPOLOGY_INTERNAL
    NVML_TOPOLOGY_SINGLE = NVML_TOPOLOGY_SINGLE
    NVML_TOPOLOGY_MULTIPLE = NVML_TOPOLOGY_MULTIPLE
    NVML_TOPOLOGY_HOSTBRIDGE = NVML_TOPOLOGY_HOSTBRIDGE
    NVML_TOPOLOGY_NODE = NVML_TOPOLOGY_NODE
    NVML_TOPOLOGY_SYSTEM = NVML_TOPOLOGY_SYSTEM
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_FUNCTION_NOT_FOUND = NVML_ERROR_FUNCTION_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NoPermission = NVMLError_NoPermission
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_Unknown = NVMLError_Unknown

    def __init__(
        self,
        gpus: int | Sequence[FakeGPU] = 8,
        *,
        model: str = "NVIDIA A100-SXM4-80GB",
        memory_total_mib: int = 81920,
        nvlink_pairs: Iterable[tuple[int, int]] = (),
        links_per_pair: int = 2,
        nvlink_links: int = 12,
        nvswitch: bool = False,
        pcie_switches: Iterable[Iterable[int]] = (),
        init_error: InitError | None = None,
        unsupported: Mapping[str, Iterable[int]] | None = None,
        lost: Iterable[int] = (),
        driver_version: str = "550.54.15",
    ) -> None:
        if isinstance(gpus, int):
            gpus = [FakeGPU(name=model, memory_total_mib=memory_total_mib) for _ in range(gpus)]
        self.gpus: list[FakeGPU] = list(gpus)
        for i, gpu in enumerate(self.gpus):
            if not gpu.uuid:
                gpu.uuid = f"GPU-fa4e0000-0000-4000-8000-{i:012x}"
        self.init_error = init_error
        self.unsupported = {name: set(ids) for name, ids in (unsupported or {}).items()}
        self.lost = set(lost)
        self.driver_version = driver_version
        self.calls: list[str] = []
        self.init_count = 0
        self._programs: dict[int, tuple[list[int], list[int]]] = {}
        self._samples: dict[int, int] = {}
        self._pci = [_pci(i // 240, 0x10 + i % 240) for i in range(len(self.gpus))]
        self._switch_of: dict[int, int] = {}
        for group_id, group in enumerate(pcie_switches):
            for i in group:
                self._switch_of[i] = group_id
        self._has_nvlink = nvswitch or bool(nvlink_pairs)
        # links[i][k]: the PCI info and device type at the far end of GPU i's link k, or None.
        self._links: list[list[tuple[FakePciInfo, int] | None]] = [
            [] for _ in range(len(self.gpus))
        ]
        if nvswitch:
            for i in range(len(self.gpus)):
                self._links[i] = [
                    (_pci(_SWITCH_DOMAIN, k % _NVSWITCHES), NVML_NVLINK_DEVICE_TYPE_SWITCH)
                    for k in range(nvlink_links)
                ]
        else:
            for a, b in nvlink_pairs:
                for _ in range(links_per_pair):
                    self._links[a].append((self._pci[b], NVML_NVLINK_DEVICE_TYPE_GPU))
                    self._links[b].append((self._pci[a], NVML_NVLINK_DEVICE_TYPE_GPU))
            for links in self._links:
                links.extend([None] * max(0, nvlink_links - len(links)))

    def program(
        self,
        index: int,
        utilization_pct: Iterable[int] = (),
        memory_used_mib: Iterable[int] = (),
    ) -> None:
        """Program GPU *index*'s load as curves, one value per sample: the k-th read of its
        utilisation (``nvmlDeviceGetUtilizationRates``) gives ``utilization_pct[k]``, and its
        memory in use (``nvmlDeviceGetMemoryInfo``) reads ``memory_used_mib[k]`` until then
        (a probe reads memory, then utilisation, per sample); past the end the last values
        stay (the GPU's fields hold them)."""
        self._programs[index] = (list(utilization_pct), list(memory_used_mib))
        self._samples[index] = 0

    def _programmed(self, index: int, utilisation_read: bool) -> None:
        """Set GPU *index*'s fields from its programmed curves, if any; a utilisation read
        ends the sample."""
        program = self._programs.get(index)
        if program is None:
            return
        k = self._samples[index]
        util, mem = program
        gpu = self.gpus[index]
        if mem:
            gpu.memory_used_mib = mem[min(k, len(mem) - 1)]
        if utilisation_read:
            if util:
                gpu.utilization_pct = util[min(k, len(util) - 1)]
            self._samples[index] = k + 1

    # -- helpers -----------------------------------------------------------------------------

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.init_count == 0:
            raise NVMLError_Uninitialized()

    def _gpu(self, name: str, handle: object) -> int:
        """Check *handle*, then the failure modes configured for *name*; return the index."""
        self._enter(name)
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        if handle.index in self.lost:
            raise NVMLError_GpuIsLost()
        if handle.index in self.unsupported.get(name, ()):
            raise NVMLError_NotSupported()
        return handle.index

    # -- the pynvml functions ----------------------------------------------------------------

    def nvmlInit(self) -> None:
        """Initialise, or raise the configured *init_error*."""
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise _INIT_ERRORS[self.init_error]()
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        """Undo one ``nvmlInit``."""
        self._enter("nvmlShutdown")
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        """The configured driver version."""
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        """Number of GPUs."""
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        """A handle for GPU *index*."""
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        return FakeHandle(index)

    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        """The index of *handle*."""
        return self._gpu("nvmlDeviceGetIndex", handle)

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        """The GPU's UUID."""
        return self.gpus[self._gpu("nvmlDeviceGetUUID", handle)].uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        """The GPU's product name."""
        return self.gpus[self._gpu("nvmlDeviceGetName", handle)].name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> FakeMemory:
        """Memory sizes in bytes."""
        index = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        self._programmed(index, utilisation_read=False)
        gpu = self.gpus[index]
        total, used = gpu.memory_total_mib * _MIB, gpu.memory_used_mib * _MIB
        return FakeMemory(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> FakeUtilization:
        """Utilization percentages."""
        index = self._gpu("nvmlDeviceGetUtilizationRates", handle)
        self._programmed(index, utilisation_read=True)
        gpu = self.gpus[index]
        return FakeUtilization(gpu=gpu.utilization_pct, memory=gpu.utilization_pct)

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> FakePciInfo:
        """The GPU's PCI address."""
        return self._pci[self._gpu("nvmlDeviceGetPciInfo", handle)]

    def _link(self, name: str, device: FakeHandle, link: int) -> tuple[FakePciInfo, int] | None:
        index = self._gpu(name, device)
        if not self._has_nvlink:
            raise NVMLError_NotSupported()
        if not 0 <= link < len(self._links[index]):
            raise NVMLError_InvalidArgument()
        return self._links[index][link]

    def nvmlDeviceGetNvLinkState(self, device: FakeHandle, link: int) -> int:
        """``NVML_FEATURE_ENABLED`` when *link* is active."""
        far = self._link("nvmlDeviceGetNvLinkState", device, link)
        return NVML_FEATURE_DISABLED if far is None else NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, device: FakeHandle, link: int) -> FakePciInfo:
        """PCI address of the far end of an active *link*."""
        far = self._link("nvmlDeviceGetNvLinkRemotePciInfo", device, link)
        if far is None:
            raise NVMLError_NotSupported()
        return far[0]

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: FakeHandle, link: int) -> int:
        """``NVML_NVLINK_DEVICE_TYPE_*`` of the far end of an active *link*."""
        far = self._link("nvmlDeviceGetNvLinkRemoteDeviceType", handle, link)
        return NVML_NVLINK_DEVICE_TYPE_UNKNOWN if far is None else far[1]

    def nvmlDeviceGetTopologyCommonAncestor(self, device1: FakeHandle, device2: FakeHandle) -> int:
        """``NVML_TOPOLOGY_*`` level where the two GPUs' PCIe paths meet."""
        a = self._gpu("nvmlDeviceGetTopologyCommonAncestor", device1)
        b = self._gpu("nvmlDeviceGetTopologyCommonAncestor", device2)
        if a == b:
            return NVML_TOPOLOGY_INTERNAL
        switch_a, switch_b = self._switch_of.get(a), self._switch_of.get(b)
        if switch_a is not None and switch_a == switch_b:
            return NVML_TOPOLOGY_SINGLE
        return NVML_TOPOLOGY_HOSTBRIDGE

"""The one GPU probe interface of a node: what GPUs it has, and whether that is known.

Three implementations share :class:`GPUProbe`:

* :class:`NVMLProbe` reads the real GPUs through NVML (``nvidia-ml-py``, imported as
  ``pynvml``). Nothing happens at import time: the first call initialises NVML, and when that
  fails the probe stays *disabled* and records why, as a sentence for the admin panel
  (modelled on dask ``distributed/diagnostics/nvml.py``).
* :class:`VirtualProbe` reports a configured inventory so that the platform runs, schedules
  and bills on machines without GPUs (``NSML_VIRTUAL_GPUS`` and friends).
* Tests pass :class:`gpu_scheduler.fake_nvml.FakeNVML` to :class:`NVMLProbe` in place of the
  ``pynvml`` module.

Probes are synchronous and may block (NVML calls go to the driver); the node agent calls them
from an executor.
"""

from __future__ import annotations

import abc
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, cast

__all__ = [
    "DEFAULT_VIRTUAL_GPU_MEMORY_MIB",
    "DEFAULT_VIRTUAL_GPU_MODEL",
    "GPUInfo",
    "GPUProbe",
    "NVMLProbe",
    "ProbeKind",
    "ProbeStatus",
    "VirtualProbe",
    "embedded_virtual_gpus",
    "parse_memory_mib",
    "parse_nvlink_pairs",
    "probe_from_env",
]

log = logging.getLogger(__name__)

ProbeKind = Literal["nvml", "virtual", "none"]

DEFAULT_VIRTUAL_GPU_MODEL = "NVIDIA Virtual GPU"
DEFAULT_VIRTUAL_GPU_MEMORY_MIB = 16 * 1024
MAX_VIRTUAL_GPUS = 1024

_MIB = 1024 * 1024
# Topology levels from NVML's nvmlGpuTopologyLevel_t, used when the NVML module lacks them.
_TOPOLOGY_MULTIPLE_DEFAULT = 20
_NVLINK_MAX_LINKS_DEFAULT = 18
_NVLINK_DEVICE_TYPE_SWITCH_DEFAULT = 2


@dataclass(frozen=True, slots=True)
class GPUInfo:
    """One GPU of a node, as a probe saw it.

    Attributes:
        index: NVML index (PCI bus order; the index ``NVIDIA_VISIBLE_DEVICES`` uses).
        uuid: stable identifier, e.g. ``GPU-2c1f...``.
        model: product name, e.g. ``NVIDIA A100-SXM4-80GB``.
        memory_total_mib: total framebuffer memory in MiB.
        memory_used_mib: memory in use when probed, in MiB.
        utilization_pct: GPU utilization over the driver's last sample period, in percent;
            None when the GPU does not report it.
        nvlink_peers: indices of GPUs reachable over an active NVLink (directly or through an
            NVSwitch), sorted.
        pcie_group: an id shared by GPUs under the same PCIe switch (common ancestor at or below
            a PCIe switch); the smallest GPU index of the group. None when the topology could
            not be read.
    """

    index: int
    uuid: str
    model: str
    memory_total_mib: int
    memory_used_mib: int
    utilization_pct: int | None = None
    nvlink_peers: tuple[int, ...] = ()
    pcie_group: int | None = None


@dataclass(frozen=True, slots=True)
class ProbeStatus:
    """Whether a probe works, and if not, why.

    Attributes:
        enabled: True when the probe can report GPUs (a virtual inventory of zero GPUs is
            enabled: it is what was configured).
        kind: ``"nvml"``, ``"virtual"``, or ``"none"`` when NVML is disabled.
        reason: a sentence for operators saying why the probe is disabled; None when enabled.
        driver_version: the NVIDIA driver version, when known.
        warnings: problems that did not disable the probe (a GPU left out, a query that
            failed), from the last read.
    """

    enabled: bool
    kind: ProbeKind
    reason: str | None = None
    driver_version: str | None = None
    warnings: tuple[str, ...] = ()


class GPUProbe(abc.ABC):
    """The interface every GPU probe implements. Usable as a context manager."""

    @abc.abstractmethod
    def gpus(self) -> list[GPUInfo]:
        """Return the node's GPUs, in index order; an empty list when the probe is disabled."""

    @abc.abstractmethod
    def status(self) -> ProbeStatus:
        """Return whether the probe works and, if not, why."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the probe holds (NVML handles); a later call starts afresh."""

    def __enter__(self) -> GPUProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# NVML


@dataclass(frozen=True, slots=True)
class _StaticInfo:
    """What does not change while NVML stays initialised: read once, then cached."""

    uuid: str
    model: str
    memory_total_mib: int
    nvlink_peers: tuple[int, ...]
    pcie_group: int | None


def _text(value: object) -> str:
    """Decode what NVML returns for strings (``str`` in recent pynvml, ``bytes`` in older)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


_BUS_ID = re.compile(r"^(?:([0-9a-fA-F]+):)?([0-9a-fA-F]+):([0-9a-fA-F]+)(?:\.[0-9a-fA-F]+)?$")


def _bus_key(pci: Any) -> tuple[int, int, int] | None:
    """A comparable (domain, bus, device) key from an NVML PCI info structure.

    Parses ``busId`` (``00000000:07:00.0`` or the legacy ``0000:07:00.0``) and falls back to
    the numeric fields; None when neither is readable.
    """
    bus_id = getattr(pci, "busId", None)
    if bus_id:
        m = _BUS_ID.match(_text(bus_id).strip().rstrip("\x00"))
        if m:
            return (int(m.group(1) or "0", 16), int(m.group(2), 16), int(m.group(3), 16))
    try:
        return (int(pci.domain), int(pci.bus), int(pci.device))
    except (AttributeError, TypeError, ValueError):
        return None


class NVMLProbe(GPUProbe):
    """GPUs read through NVML, initialised lazily, disabled with a reason when NVML fails.

    Args:
        nvml: the NVML module to use; None imports ``pynvml`` on first use. Tests pass a
            :class:`gpu_scheduler.fake_nvml.FakeNVML`.
        logger: where to log; defaults to this module's logger.

    Identity, model, total memory, NVLink peers and PCIe groups are read once and cached until
    :meth:`close`; memory in use and utilization are read on every :meth:`gpus` call. Optional
    queries (utilization, NVLink, topology, driver version) that fail leave None or an empty
    value and add a warning; a GPU whose identity or memory cannot be read is left out with a
    warning. The probe is thread-safe.
    """

    def __init__(self, nvml: Any = None, *, logger: logging.Logger | None = None) -> None:
        self._nvml_arg = nvml
        self._nvml: Any = None
        self._log = logger or log
        self._lock = threading.RLock()
        self._started = False  # initialisation attempted (successfully or not)
        self._initialised = False  # nvmlInit succeeded and needs an nvmlShutdown
        self._reason: str | None = None
        self._driver_version: str | None = None
        self._count = 0
        self._static: dict[int, _StaticInfo] | None = None
        self._warnings: tuple[str, ...] = ()
        self._logged: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def _start(self) -> None:
        """Initialise NVML once; on failure record why and stay disabled."""
        if self._started:
            return
        self._started = True
        nvml = self._nvml_arg
        if nvml is None:
            try:
                import pynvml

                nvml = pynvml
            except ImportError as e:
                self._disable(
                    f"the nvidia-ml-py package is not installed ({e}); "
                    "install it with `pip install nvidia-ml-py`"
                )
                return
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError_LibraryNotFound:
            self._disable(
                "the NVML library (libnvidia-ml.so.1) was not found: "
                "no NVIDIA driver is installed on this machine"
            )
            return
        except nvml.NVMLError_DriverNotLoaded:
            self._disable(
                "the NVIDIA driver is installed but not loaded "
                "(NVML: Driver Not Loaded); load the kernel module or reboot the node"
            )
            return
        except nvml.NVMLError_NoPermission:
            self._disable("no permission to talk to the NVIDIA driver (NVML: No Permission)")
            return
        except nvml.NVMLError as e:
            self._disable(f"NVML failed to initialise: {e}")
            return
        except OSError as e:
            self._disable(f"NVML failed to initialise: {e}")
            return
        self._initialised = True
        try:
            self._driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError as e:
            self._log.debug("NVML: driver version not readable: %s", e)
        try:
            self._count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as e:
            self._disable(f"NVML could not count the GPUs: {e}")
            self._shutdown()
            return
        if self._count == 0:
            self._disable("NVML works but found no GPU on this machine")
            self._shutdown()
            return
        self._log.info(
            "NVML probe enabled: %d GPU(s), driver %s", self._count, self._driver_version
        )

    def _disable(self, reason: str) -> None:
        self._reason = reason
        self._log.warning("NVML probe disabled: %s", reason)

    def _shutdown(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as e:
                self._log.debug("NVML: shutdown failed: %s", e)

    def close(self) -> None:
        """Shut NVML down; the next call initialises it again."""
        with self._lock:
            self._shutdown()
            self._started = False
            self._reason = None
            self._driver_version = None
            self._count = 0
            self._static = None
            self._warnings = ()

    # -- reading -----------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when NVML initialised and found GPUs (initialises NVML on first use)."""
        with self._lock:
            self._start()
            return self._initialised

    def status(self) -> ProbeStatus:
        """Return whether NVML works; initialises it on first use."""
        with self._lock:
            self._start()
            if not self._initialised:
                return ProbeStatus(
                    enabled=False,
                    kind="none",
                    reason=self._reason,
                    driver_version=self._driver_version,
                )
            return ProbeStatus(
                enabled=True,
                kind="nvml",
                driver_version=self._driver_version,
                warnings=self._warnings,
            )

    def gpus(self) -> list[GPUInfo]:
        """Read every GPU; static facts come from the cache after the first read."""
        with self._lock:
            self._start()
            if not self._initialised:
                return []
            warnings: list[str] = []
            handles = self._handles(warnings)
            if self._static is None:
                self._static = self._read_static(handles, warnings)
            result: list[GPUInfo] = []
            for index, handle in handles.items():
                info = self._static.get(index)
                if info is None:
                    continue
                gpu = self._read_dynamic(index, handle, info, warnings)
                if gpu is not None:
                    result.append(gpu)
            self._warnings = tuple(warnings)
            return result

    def _warn(self, warnings: list[str], message: str) -> None:
        """Record a warning; log it once at WARNING level, later repeats at DEBUG."""
        warnings.append(message)
        if message in self._logged:
            self._log.debug("NVML: %s", message)
        else:
            self._logged.add(message)
            self._log.warning("NVML: %s", message)

    def _handles(self, warnings: list[str]) -> dict[int, Any]:
        nvml = self._nvml
        handles: dict[int, Any] = {}
        for index in range(self._count):
            try:
                handles[index] = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as e:
                self._warn(warnings, f"gpu{index} left out: no handle ({e})")
        return handles

    def _read_static(
        self, handles: Mapping[int, Any], warnings: list[str]
    ) -> dict[int, _StaticInfo]:
        nvml = self._nvml
        identity: dict[int, tuple[str, str, int]] = {}
        for index, handle in handles.items():
            try:
                uuid_ = _text(nvml.nvmlDeviceGetUUID(handle))
                model = _text(nvml.nvmlDeviceGetName(handle))
                total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // _MIB
            except nvml.NVMLError as e:
                self._warn(warnings, f"gpu{index} left out: identity or memory unreadable ({e})")
                continue
            identity[index] = (uuid_, model, total)
        usable = {i: h for i, h in handles.items() if i in identity}
        peers = self._nvlink_peers(usable, warnings)
        groups = self._pcie_groups(usable, warnings)
        return {
            index: _StaticInfo(
                uuid=uuid_,
                model=model,
                memory_total_mib=total,
                nvlink_peers=tuple(sorted(peers.get(index, ()))),
                pcie_group=groups.get(index),
            )
            for index, (uuid_, model, total) in identity.items()
        }

    def _read_dynamic(
        self, index: int, handle: Any, info: _StaticInfo, warnings: list[str]
    ) -> GPUInfo | None:
        nvml = self._nvml
        try:
            used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used) // _MIB
        except nvml.NVMLError as e:
            self._warn(warnings, f"gpu{index} left out: memory unreadable ({e})")
            return None
        utilization: int | None
        try:
            utilization = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError as e:
            self._warn(warnings, f"gpu{index}: utilization not available ({e})")
            utilization = None
        return GPUInfo(
            index=index,
            uuid=info.uuid,
            model=info.model,
            memory_total_mib=info.memory_total_mib,
            memory_used_mib=used,
            utilization_pct=utilization,
            nvlink_peers=info.nvlink_peers,
            pcie_group=info.pcie_group,
        )

    def _nvlink_peers(self, handles: Mapping[int, Any], warnings: list[str]) -> dict[int, set[int]]:
        """Map each GPU to the GPUs it reaches over active NVLinks.

        A link whose remote end is another GPU's PCI address connects the two; a link to an
        NVSwitch puts the GPU on the switch fabric, and all GPUs on the fabric are peers.
        """
        nvml = self._nvml
        max_links = int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", _NVLINK_MAX_LINKS_DEFAULT))
        enabled = getattr(nvml, "NVML_FEATURE_ENABLED", 1)
        switch_type = getattr(
            nvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", _NVLINK_DEVICE_TYPE_SWITCH_DEFAULT
        )
        by_bus: dict[tuple[int, int, int], int] = {}
        for index, handle in handles.items():
            try:
                key = _bus_key(nvml.nvmlDeviceGetPciInfo(handle))
            except nvml.NVMLError as e:
                self._warn(warnings, f"gpu{index}: PCI address not available ({e})")
                continue
            if key is not None:
                by_bus[key] = index
        peers: dict[int, set[int]] = {index: set() for index in handles}
        on_switch: set[int] = set()
        for index, handle in handles.items():
            for link in range(max_links):
                try:
                    active = nvml.nvmlDeviceGetNvLinkState(handle, link)
                except (nvml.NVMLError_NotSupported, nvml.NVMLError_InvalidArgument):
                    break  # no NVLink on this GPU, or past its last link
                except nvml.NVMLError as e:
                    self._log.debug("NVML: gpu%d link %d state unreadable: %s", index, link, e)
                    continue
                if active != enabled:
                    continue
                try:
                    remote = _bus_key(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link))
                except nvml.NVMLError as e:
                    self._log.debug("NVML: gpu%d link %d remote unreadable: %s", index, link, e)
                    continue
                peer = by_bus.get(remote) if remote is not None else None
                if peer is not None:
                    if peer != index:
                        peers[index].add(peer)
                        peers[peer].add(index)
                    continue
                if self._remote_is_switch(handle, link, switch_type):
                    on_switch.add(index)
        for index in on_switch:
            peers[index].update(on_switch - {index})
        return peers

    def _remote_is_switch(self, handle: Any, link: int, switch_type: object) -> bool:
        nvml = self._nvml
        query = getattr(nvml, "nvmlDeviceGetNvLinkRemoteDeviceType", None)
        if query is None:
            return False
        try:
            return bool(query(handle, link) == switch_type)
        except nvml.NVMLError:
            return False

    def _pcie_groups(self, handles: Mapping[int, Any], warnings: list[str]) -> dict[int, int]:
        """Group GPUs whose common ancestor is at or below a PCIe switch (union-find)."""
        nvml = self._nvml
        threshold = getattr(nvml, "NVML_TOPOLOGY_MULTIPLE", _TOPOLOGY_MULTIPLE_DEFAULT)
        indices = sorted(handles)
        parent = {i: i for i in indices}

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        known = set(indices) if len(indices) == 1 else set()
        failures = 0
        last_error: object = None
        for pos, a in enumerate(indices):
            for b in indices[pos + 1 :]:
                try:
                    level = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b])
                except nvml.NVMLError as e:
                    failures += 1
                    last_error = e
                    continue
                known.update((a, b))
                if level <= threshold:
                    ra, rb = find(a), find(b)
                    parent[max(ra, rb)] = min(ra, rb)
        if failures:
            self._warn(
                warnings,
                f"PCIe topology: {failures} GPU pair(s) unreadable ({last_error})",
            )
        return {i: find(i) for i in indices if i in known}


# ---------------------------------------------------------------------------------------------
# Virtual inventory

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_MEMORY_FORM = 'a size like "16G", "16GiB", "16384M" or "16384" (MiB); units K, M, G, T are binary'
_NVLINK_FORM = 'comma-separated pairs of GPU indices like "0-1,2-3"'


def parse_memory_mib(value: str, variable: str = "NSML_VIRTUAL_GPU_MEMORY") -> int:
    """Parse a memory size (``16G``, ``16384M``, ``16GiB``; a bare number is MiB) into MiB.

    Raises:
        ValueError: naming *variable*, the bad value and the accepted form.
    """
    m = _MEMORY.match(value)
    if not m:
        raise ValueError(f"{variable}={value!r} is not a memory size; expected {_MEMORY_FORM}")
    number = float(m.group(1))
    factor = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}[m.group(2).lower()]
    mib = int(number * factor)
    if mib < 1:
        raise ValueError(f"{variable}={value!r} is less than 1 MiB; expected {_MEMORY_FORM}")
    return mib


def parse_nvlink_pairs(
    value: str, count: int, variable: str = "NSML_VIRTUAL_NVLINK"
) -> tuple[tuple[int, int], ...]:
    """Parse ``"0-1,2-3"`` into index pairs, each index below *count*.

    Raises:
        ValueError: naming *variable*, the bad value and the accepted form.
    """
    pairs: list[tuple[int, int]] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        ends = part.split("-")
        if len(ends) != 2 or not all(e.strip().isdigit() for e in ends):
            raise ValueError(
                f"{variable}={value!r}: {part!r} is not a pair of GPU indices; "
                f"expected {_NVLINK_FORM}"
            )
        a, b = (int(e) for e in ends)
        for i in (a, b):
            if i >= count:
                raise ValueError(
                    f"{variable}={value!r}: GPU index {i} is out of range for {count} GPU(s) "
                    f"(valid: 0..{count - 1}); expected {_NVLINK_FORM}"
                )
        if a == b:
            raise ValueError(
                f"{variable}={value!r}: {part!r} links a GPU to itself; expected {_NVLINK_FORM}"
            )
        pairs.append((min(a, b), max(a, b)))
    return tuple(sorted(set(pairs)))


def _virtual_uuid(node_name: str, index: int) -> str:
    """A stable GPU UUID derived from the node name and index (``GPU-`` + UUID5)."""
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{index}.gpu.{node_name}.nsml.virtual')}"


class VirtualProbe(GPUProbe):
    """A configured inventory of GPUs that do not exist, so the platform runs without GPUs.

    Args:
        count: number of GPUs (0 is a valid, GPU-less node).
        model: the model name reported for every GPU.
        memory_mib: total memory per GPU in MiB.
        nvlink_pairs: pairs of GPU indices joined by NVLink.
        node_name: the node's name; UUIDs are derived from it and the index, so they stay the
            same across restarts.

    Memory in use is reported as 0 and utilization as None; PCIe groups are None (unknown).
    """

    def __init__(
        self,
        count: int,
        *,
        model: str = DEFAULT_VIRTUAL_GPU_MODEL,
        memory_mib: int = DEFAULT_VIRTUAL_GPU_MEMORY_MIB,
        nvlink_pairs: Iterable[tuple[int, int]] = (),
        node_name: str = "localhost",
    ) -> None:
        if not 0 <= count <= MAX_VIRTUAL_GPUS:
            raise ValueError(
                f"virtual GPU count {count!r} is out of range; expected 0..{MAX_VIRTUAL_GPUS}"
            )
        if memory_mib < 1:
            raise ValueError(f"virtual GPU memory {memory_mib!r} MiB must be at least 1 MiB")
        if not model.strip():
            raise ValueError("virtual GPU model must not be empty; e.g. 'NVIDIA Virtual GPU'")
        peers: dict[int, set[int]] = {i: set() for i in range(count)}
        for a, b in nvlink_pairs:
            if not (0 <= a < count and 0 <= b < count) or a == b:
                raise ValueError(
                    f"NVLink pair {a}-{b} is invalid for {count} virtual GPU(s); "
                    f"expected two different indices in 0..{count - 1}"
                )
            peers[a].add(b)
            peers[b].add(a)
        self.node_name = node_name
        self._gpus = [
            GPUInfo(
                index=i,
                uuid=_virtual_uuid(node_name, i),
                model=model,
                memory_total_mib=memory_mib,
                memory_used_mib=0,
                utilization_pct=None,
                nvlink_peers=tuple(sorted(peers[i])),
                pcie_group=None,
            )
            for i in range(count)
        ]

    @classmethod
    def from_env(cls, env: Mapping[str, str], node_name: str = "localhost") -> VirtualProbe:
        """Build from ``NSML_VIRTUAL_GPUS`` (required), ``NSML_VIRTUAL_GPU_MODEL``,
        ``NSML_VIRTUAL_GPU_MEMORY`` and ``NSML_VIRTUAL_NVLINK``.

        Raises:
            ValueError: naming the variable, the bad value and the accepted form.
        """
        raw = env.get("NSML_VIRTUAL_GPUS", "").strip()
        if not raw.isdigit() or int(raw) > MAX_VIRTUAL_GPUS:
            raise ValueError(
                f"NSML_VIRTUAL_GPUS={raw!r} is not a GPU count; "
                f"expected a whole number 0..{MAX_VIRTUAL_GPUS}, e.g. NSML_VIRTUAL_GPUS=4"
            )
        count = int(raw)
        model = env.get("NSML_VIRTUAL_GPU_MODEL", "").strip() or DEFAULT_VIRTUAL_GPU_MODEL
        memory_raw = env.get("NSML_VIRTUAL_GPU_MEMORY", "").strip()
        memory = parse_memory_mib(memory_raw) if memory_raw else DEFAULT_VIRTUAL_GPU_MEMORY_MIB
        pairs = parse_nvlink_pairs(env.get("NSML_VIRTUAL_NVLINK", ""), count)
        return cls(count, model=model, memory_mib=memory, nvlink_pairs=pairs, node_name=node_name)

    def gpus(self) -> list[GPUInfo]:
        """Return the configured GPUs."""
        return list(self._gpus)

    def status(self) -> ProbeStatus:
        """Always enabled: the inventory is what was configured."""
        return ProbeStatus(enabled=True, kind="virtual")

    def close(self) -> None:
        """Nothing to release."""


def embedded_virtual_gpus(
    env: Mapping[str, str], nvml: Callable[[], ProbeStatus]
) -> tuple[str | None, str | None]:
    """Whether the embedded default starts with virtual GPUs, and the line that says so.

    The embedded default (``hub_config/jupyterhub_config.py``) is where people try the
    platform, often on a machine without a GPU; there it starts with
    ``NSML_VIRTUAL_GPUS_IF_NONE`` virtual GPUs (the config's default: 4) when
    ``NSML_VIRTUAL_GPUS`` is unset and NVML finds no GPU. ``NSML_VIRTUAL_GPUS_IF_NONE=0``
    (the production example sets it) never invents GPUs.

    Args:
        env: the hub's environment.
        nvml: reads the NVML probe's status (called only when the answer depends on it).

    Returns:
        ``(count, line)``: the value to give ``NSML_VIRTUAL_GPUS`` (None: leave it as it is)
        and one plain sentence for the start-up output (None: nothing to say).

    Raises:
        ValueError: ``NSML_VIRTUAL_GPUS_IF_NONE`` is not a GPU count.
    """
    if env.get("NSML_VIRTUAL_GPUS", "").strip():
        return None, None
    raw = env.get("NSML_VIRTUAL_GPUS_IF_NONE", "0").strip() or "0"
    if not raw.isdigit() or int(raw) > MAX_VIRTUAL_GPUS:
        raise ValueError(
            f"NSML_VIRTUAL_GPUS_IF_NONE={raw!r} is not a GPU count; expected a whole number "
            f"0..{MAX_VIRTUAL_GPUS}, e.g. 4 (0: never start with virtual GPUs)"
        )
    count = int(raw)
    if count == 0:
        return None, None
    status = nvml()
    if status.enabled:
        return None, None
    why = status.reason or "NVML found no GPU"
    return str(count), (
        f"jupyter-nsml: no NVIDIA GPU found ({why}); starting with {count} virtual GPUs so that "
        "GPU scheduling can be tried. They are labelled virtual; containers get no real GPU. "
        "Set NSML_VIRTUAL_GPUS=0 for none."
    )


def probe_from_env(env: Mapping[str, str] | None = None, node_name: str | None = None) -> GPUProbe:
    """Choose the node's probe: the factory named by ``NSML_GPU_PROBE`` when set; virtual
    when ``NSML_VIRTUAL_GPUS`` is set (``0`` included); otherwise NVML (initialised lazily,
    on first use).

    ``NSML_GPU_PROBE=package.module:factory`` plugs in a probe of another kind (another
    vendor's GPUs; a programmed :class:`gpu_scheduler.fake_nvml.FakeNVML` in tests): the
    factory is called as ``factory(env, node_name)`` and returns a :class:`GPUProbe`.

    Args:
        env: the environment to read; None reads ``os.environ``. An empty or blank value
            counts as unset.
        node_name: the node's name for virtual UUIDs; None uses the host name.

    Raises:
        ValueError: when a ``NSML_VIRTUAL_*`` variable holds a bad value, or
            ``NSML_GPU_PROBE`` names no importable factory.
    """
    if env is None:
        env = os.environ
    factory = env.get("NSML_GPU_PROBE", "").strip()
    if factory:
        return _probe_factory(factory)(env, node_name or socket.gethostname())
    if env.get("NSML_VIRTUAL_GPUS", "").strip():
        return VirtualProbe.from_env(env, node_name=node_name or socket.gethostname())
    return NVMLProbe()


def _probe_factory(spec: str) -> Callable[[Mapping[str, str], str], GPUProbe]:
    """The callable that ``NSML_GPU_PROBE`` (``package.module:factory``) names."""
    import importlib

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"NSML_GPU_PROBE={spec!r}: write it as package.module:factory")
    try:
        found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"NSML_GPU_PROBE={spec!r}: {e}") from None
    if not callable(found):
        raise ValueError(f"NSML_GPU_PROBE={spec!r}: {attr} is not callable")
    return cast(Callable[[Mapping[str, str], str], GPUProbe], found)

"""A node whose GPUs follow programmed curves: a :class:`~gpu_scheduler.fake_nvml.FakeNVML`
behind the real :class:`~gpu_scheduler.probe.NVMLProbe`, plugged into ``nsml-agent`` or
``nsml-server`` with ``NSML_GPU_PROBE=tests.gpu_program:probe``.

``NSML_TEST_GPU_PROGRAM`` holds the program as JSON: ``{"gpus": 2, "model": "...",
"utilization": {"0": [10, 20, ...]}, "memory": {"0": [100, ...]}}``; the k-th sample of a
GPU reads the k-th value (see :meth:`FakeNVML.program`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from gpu_scheduler.fake_nvml import FakeNVML
from gpu_scheduler.probe import NVMLProbe

PROGRAM_ENV = "NSML_TEST_GPU_PROGRAM"


def probe(env: Mapping[str, str], node_name: str) -> NVMLProbe:
    """The programmed node's probe (*node_name* is not needed: FakeNVML names its GPUs)."""
    spec = json.loads(env[PROGRAM_ENV])
    nvml = FakeNVML(int(spec["gpus"]), model=str(spec.get("model", "NVIDIA A100-SXM4-80GB")))
    memory = spec.get("memory", {})
    for index, curve in spec.get("utilization", {}).items():
        nvml.program(int(index), curve, memory.get(index, ()))
    return NVMLProbe(nvml)

"""GPU placement for NSML: a pure policy, a pure queue step and a trace simulator.

The server builds a :class:`ClusterSnapshot` from its nodes and allocations, then asks
:func:`place` for one request or :func:`schedule` for a whole queue step. Nothing in this
package reads a clock, touches a database or draws random numbers on its own.
"""

from .fgd import PodShape, RecentMix, TypicalMix
from .model import (
    GPU_MILLI,
    ClusterSnapshot,
    Code,
    DatasetRef,
    GpuSnapshot,
    NodeSnapshot,
    NodeState,
    Placement,
    PlacementRequest,
    PlacementResult,
    Reason,
)
from .policy import (
    DEFAULT_WEIGHTS,
    PlacementPolicy,
    Strategy,
    Weights,
    choose_gpus,
    explain,
    node_reasons,
    place,
)
from .queue import (
    NO_LIMITS,
    AdmissionHook,
    QueuedJob,
    QueuePlan,
    Reservation,
    Start,
    UserLimits,
    UserUsage,
    Waiting,
    queue_order,
    schedule,
)

__all__ = [
    "DEFAULT_WEIGHTS",
    "GPU_MILLI",
    "NO_LIMITS",
    "AdmissionHook",
    "ClusterSnapshot",
    "Code",
    "DatasetRef",
    "GpuSnapshot",
    "NodeSnapshot",
    "NodeState",
    "Placement",
    "PlacementPolicy",
    "PlacementRequest",
    "PlacementResult",
    "PodShape",
    "QueuePlan",
    "QueuedJob",
    "Reason",
    "RecentMix",
    "Reservation",
    "Start",
    "Strategy",
    "TypicalMix",
    "UserLimits",
    "UserUsage",
    "Waiting",
    "Weights",
    "choose_gpus",
    "explain",
    "node_reasons",
    "place",
    "queue_order",
    "schedule",
]

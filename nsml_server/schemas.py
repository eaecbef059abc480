"""Request and response bodies of the REST API (pydantic), also the source of the OpenAPI document.

Every request body is validated here before any domain code sees it; a validation failure is
a 400 whose message names each offending field.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

NodeState = Literal["up", "draining", "down"]
Visibility = Literal["private", "team", "public"]
DATASET_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*\Z")

INT32_MAX = 2**31 - 1
"""Largest value the database's INTEGER columns hold."""
INT64_MAX = 2**63 - 1
"""Largest value the database's BIGINT columns hold."""

NODE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DATASET_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@([1-9][0-9]{0,8}|latest))?$"
MEMORY_PATTERN = r"^\s*[0-9]{1,15}(\.[0-9]{1,6})?\s*([kKmMgGtT]([iI]?[bB])?)?\s*$"
BLAKE3_PATTERN = r"^[0-9a-f]{64}$"


def _check_gpus(value: float) -> float:
    if 0 < value < 0.001 or (value > 1 and value != int(value)):
        raise ValueError(
            f"gpus={value} is not valid: ask for 0, a share of one GPU from 0.001 to 1 "
            "(e.g. 0.5), or a whole number of GPUs (e.g. 2)"
        )
    return value


Gpus = Annotated[
    float,
    Field(
        ge=0,
        le=256,
        description="0 (CPU only), a share of one GPU from 0.001 to 1 (e.g. 0.25), or a whole "
        "number of GPUs on one node",
        json_schema_extra={"anyOf": [{"minimum": 0.001, "maximum": 1}, {"multipleOf": 1}]},
    ),
    AfterValidator(_check_gpus),
]
"""A GPU ask; the rule is in the schema (``anyOf``) and checked by the validator."""


def memory_schema_fix(schema: dict[str, object]) -> None:
    """Give the string and integer forms of a memory ask their rules in the schema."""
    for alt in schema.get("anyOf", []):  # type: ignore[attr-defined]
        if alt.get("type") == "string":
            alt["pattern"] = MEMORY_PATTERN
        elif alt.get("type") == "integer":
            alt.update(minimum=0, maximum=2**50)


_MEMORY_RE = re.compile(MEMORY_PATTERN)


def check_memory(value: str | int | None) -> str | int | None:
    """Refuse a memory ask the schema does not allow (the same rule as the schema's)."""
    if value is None:
        return None
    if isinstance(value, int):
        if not 0 <= value <= 2**50:
            raise ValueError(f"memory={value} MiB must be from 0 to {2**50}")
        return value
    if not _MEMORY_RE.match(value):
        raise ValueError(
            f"memory={value!r} is not a memory size: use e.g. '8G', '512M' or '16GiB' "
            "(units K, M, G, T are binary), or a number of MiB"
        )
    return value


def memory_mib(value: str | int) -> int:
    """A memory ask (already checked by :func:`check_memory`) in MiB, rounded down."""
    if isinstance(value, int):
        return value
    m = re.match(r"\s*([0-9.]+)\s*([kKmMgGtT]?)", value)
    assert m is not None
    factor = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}[m.group(2).lower()]
    return math.floor(float(m.group(1)) * factor)


def _check_memory(value: str | int) -> str | int:
    check_memory(value)
    return value


MemoryAsk = Annotated[
    str | int,
    Field(
        union_mode="left_to_right",
        description="memory: '8G', '512M', '16GiB' (units K, M, G, T are binary) or a whole "
        "number of MiB",
        json_schema_extra=memory_schema_fix,
    ),
    AfterValidator(_check_memory),
]
DatasetRef = Annotated[str, Field(pattern=DATASET_REF_PATTERN, max_length=74)]
GpuModel = Annotated[str, Field(min_length=1, max_length=255)]


class Strict(BaseModel):
    """Base for request bodies: unknown fields are an error, not silently ignored.

    The API also checks each body against the model's JSON schema before the model reads it
    (:meth:`nsml_server.api.base.APIHandler.body_as`), so a value of another JSON type is
    refused as the OpenAPI document says (``false`` is not the number 0)."""

    model_config = ConfigDict(extra="forbid")


class GpuReport(Strict):
    """One GPU as a node's probe reports it."""

    index: int = Field(ge=0, le=255)
    uuid: str = Field(min_length=1, max_length=128)
    model: str = Field(min_length=1, max_length=255)
    memory_total_mib: int = Field(ge=0, le=INT32_MAX)
    memory_used_mib: int = Field(default=0, ge=0, le=INT32_MAX)
    utilization_pct: int | None = Field(default=None, ge=0, le=100)
    nvlink_peers: list[Annotated[int, Field(ge=0, le=255)]] = Field(
        default_factory=list, max_length=256
    )
    pcie_group: int | None = Field(
        default=None,
        ge=0,
        le=255,
        description="GPUs under one PCIe switch share this id (lowest GPU index)",
    )


class ProbeReport(Strict):
    """How the node's GPU probe is doing: enabled, or disabled and why."""

    kind: Literal["nvml", "virtual", "none"]
    enabled: bool
    reason: str | None = Field(default=None, max_length=4000)
    driver_version: str | None = Field(default=None, max_length=255)
    warnings: list[Annotated[str, Field(max_length=4000)]] = Field(
        default_factory=list, max_length=100
    )


class Heartbeat(Strict):
    """A node agent's periodic report: its resources, GPUs, images and probe state."""

    backend: Literal["docker", "local"] = "docker"
    docker_url: str | None = Field(default=None, max_length=1024)
    cpu_milli: int = Field(ge=0, le=INT32_MAX)
    memory_mib: int = Field(ge=0, le=INT64_MAX)
    gpu_probe: ProbeReport
    gpus: list[GpuReport] = Field(default_factory=list, max_length=256)
    images: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=10_000
    )
    labels: dict[Annotated[str, Field(max_length=255)], Annotated[str, Field(max_length=4000)]] = (
        Field(default_factory=dict, max_length=1000)
    )
    datasets: dict[
        Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")],
        Annotated[int, Field(ge=0, le=INT64_MAX)],
    ] = Field(
        default_factory=dict,
        max_length=100_000,
        description="dataset versions in the node's cache, {'name@k': bytes}: the scheduler's "
        "locality",
    )

    @field_validator("datasets")
    @classmethod
    def _dataset_keys(cls, value: dict[str, int]) -> dict[str, int]:
        for key, size in value.items():
            if not DATASET_KEY.match(key) or len(key) > 128:
                raise ValueError(f"{key!r} is not a dataset cache key such as 'mnist@3'")
            if size < 0:
                raise ValueError(f"{key!r}: bytes must be >= 0, not {size}")
        return value


class NodePatch(Strict):
    """Admin change of a node: drain it (no new work), bring it back up, or mark it down."""

    state: NodeState


class GpuOut(BaseModel):
    index: int
    uuid: str
    model: str
    memory_total_mib: int
    memory_used_mib: int
    utilization_pct: int | None
    nvlink_peers: list[int]
    pcie_group: int | None
    healthy: bool
    allocated_milli: int = Field(
        0, description="milli-GPUs held by active allocations (1000 = whole)"
    )
    virtual: bool = Field(
        False,
        description="a GPU that does not exist (the node's probe is virtual: NSML_VIRTUAL_GPUS, "
        "or the embedded default on a machine without GPUs); it is scheduled and billed, but "
        "containers get no real GPU",
    )


ADMIN_ONLY = "admins and trusted services only; null for other users"


class NodeOut(BaseModel):
    name: str
    state: NodeState
    backend: str
    docker_url: str | None = Field(
        description=f"how the server reaches the node's Docker engine ({ADMIN_ONLY})",
        json_schema_extra={"x-admin-only": True},
    )
    cpu_milli: int
    memory_mib: int
    gpu_probe: dict[str, object]
    gpus: list[GpuOut]
    images: list[str]
    labels: dict[str, str]
    datasets: dict[str, int] = Field(
        default_factory=dict, description="dataset versions cached on the node, {'name@k': bytes}"
    )
    last_heartbeat: str | None = Field(description="ISO 8601, UTC")
    heartbeat_age_s: float | None
    needs_sweep: bool = Field(
        default=False,
        description="work on it was given up while it was silent (node loss): it takes nothing "
        "new until the server removed that work's containers from its engine",
    )

    def for_caller(self, admin: bool) -> NodeOut:
        """The node as the caller may see it: node internals blanked for non-admins."""
        if admin:
            return self
        hidden = {
            name: None
            for name, f in type(self).model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("x-admin-only")
        }
        return self.model_copy(update=hidden)


class NodeList(BaseModel):
    nodes: list[NodeOut]


class MeOut(BaseModel):
    name: str
    admin: bool
    permission: Literal["user", "team_admin", "admin"]
    credits: float = Field(description="balance in credits")
    groups: list[str]
    scopes: list[str]
    team_admin_of: list[str] = Field(
        default_factory=list,
        description="the teams whose admin the caller is (they may stop those teams' sessions "
        "and manage their members)",
    )
    burn_rate: float = Field(
        default=0.0,
        description="credits per hour that all the caller's running work (sessions, "
        "evaluations, notebook servers) costs at the current policy",
    )


class UsageItem(BaseModel):
    allocation: int
    holder: str = Field(description="'notebook', 'notebook:NAME', 'session/DATASET/N', ...")
    kind: Literal["notebook", "session", "other"]
    node: str
    gpus: float = Field(description="GPUs held (fractions count)")
    started: str
    ended: str | None = Field(description="None while the allocation is active")
    gpu_seconds: float = Field(description="GPUs held x seconds, up to now for an active one")


class UsageOut(BaseModel):
    user: str
    since: str | None
    gpu_seconds: dict[str, float] = Field(description="per kind: notebook, session, other")
    items: list[UsageItem]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    database: str
    schema_revision: str
    backend: str | None
    leader: bool
    deployment: str = Field(
        default="",
        description="the label value (org.jupyter-nsml.server) of this deployment's "
        "containers; its orphan sweep removes only containers that carry it",
    )


class Error(BaseModel):
    message: str = Field(description="what went wrong and what to do, for a person")
    reason: str = Field(description="a stable machine-readable code, e.g. 'bad_request'")


HOLDER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,199}$"


class PlacementIn(Strict):
    """Ask the scheduler for resources on one node."""

    holder: str = Field(
        pattern=HOLDER_PATTERN,
        description="what will hold the resources, unique per user, e.g. 'notebook' or "
        "'mnist/3'; asking again for the same holder returns the same placement",
    )
    gpus: Gpus = 0
    gpu_models: list[GpuModel] = Field(
        default_factory=list, max_length=64, description="acceptable GPU models"
    )
    cpu: float = Field(default=1.0, ge=0, le=4096, description="CPU cores")
    memory: MemoryAsk = "1G"
    datasets: list[DatasetRef] = Field(
        default_factory=list,
        max_length=16,
        description="'name' or 'name@version', each dataset once",
        json_schema_extra={"uniqueItems": True},
    )
    image: str | None = Field(default=None, max_length=512)
    home_node: str | None = Field(
        default=None,
        max_length=255,
        description="the node that holds the user's home folder (node-local homes): preferred, "
        "and a placement elsewhere says why in its reason",
    )
    priority: int = Field(
        default=0, ge=-100, le=100, description="higher first; above 0 needs an admin"
    )
    wait_s: float = Field(
        default=0, ge=0, le=300, description="seconds to wait for a decision before answering"
    )
    user: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="place on behalf of this user (admin)",
    )


class AllocationOut(BaseModel):
    id: int
    node: str
    gpu_indices: list[int]
    gpu_uuids: list[str]
    gpu_milli_per_gpu: int
    cpu_milli: int
    memory_mib: int
    state: Literal["active", "released"]


class PlacementOut(BaseModel):
    id: int
    holder: str
    user: str
    state: Literal["waiting", "placed", "released", "failed", "cancelled"]
    position: int | None = Field(description="1 = next in line (waiting requests only)")
    code: str | None = Field(description="placed | unschedulable | infeasible | user-limit | ...")
    reason: str | None = Field(description="why it waits or failed, for a person")
    request: dict[str, object]
    allocation: AllocationOut | None
    created: str
    decided: str | None


class PlacementList(BaseModel):
    placements: list[PlacementOut]


# ---- training sessions ------------------------------------------------------------------------

SessionState = Literal[
    "queued", "preparing", "running", "completed", "failed", "oom_killed", "stopped", "lost"
]
CHECKPOINT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$"


class CodeOut(BaseModel):
    """A stored code snapshot."""

    digest: str = Field(description="SHA-256 of the snapshot's manifest")
    files: int
    bytes: int


class SessionIn(Strict):
    """Start a training session: stored code, an entry point, arguments and resources."""

    code: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="digest of a code snapshot (POST api/code)"
    )
    entry: str = Field(
        min_length=1,
        max_length=1024,
        description="the file in the snapshot to run, e.g. 'train.py' (run with python) or "
        "'run.sh' (run with bash)",
    )
    args: list[str] = Field(default_factory=list, max_length=1000, description="its arguments")
    gpus: Gpus = 0
    gpu_models: list[GpuModel] = Field(
        default_factory=list, max_length=64, description="acceptable GPU models"
    )
    cpu: float = Field(default=1.0, gt=0, le=4096, description="CPU cores")
    memory: MemoryAsk = "1G"
    datasets: list[DatasetRef] = Field(
        default_factory=list,
        max_length=16,
        description="'name' or 'name@version', each dataset once",
        json_schema_extra={"uniqueItems": True},
    )
    image: str | None = Field(
        default=None, max_length=512, description="container image; default: the server's"
    )
    memo: str = Field(default="", max_length=10_000)
    visibility: Visibility | None = Field(
        default=None,
        description="private: the owner (and admins); team: also the members of its team; "
        "public: every user reads and forks it. Default: team when a team is given or the "
        "caller's billing team pays for their work, else private",
    )
    team: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="the JupyterHub group (one of the caller's) whose members read the "
        "session and whose team admins may stop it; default: the caller's billing team when "
        "that team pays",
    )
    restart_on_lost: bool = Field(
        default=False,
        description="when its node is lost, queue the session again as its next attempt, "
        "loading its last checkpoint, instead of ending it lost (up to the server's "
        "lost_max_attempts)",
    )


class ForkIn(Strict):
    """Start a new session from another one (and one of its checkpoints), with edits."""

    checkpoint: str | None = Field(
        default=None,
        pattern=CHECKPOINT_PATTERN,
        description="the parent's checkpoint the child loads (nsml.bind's load runs on it)",
    )
    args: list[str] | None = Field(
        default=None, max_length=1000, description="replace the arguments (None: keep them)"
    )
    gpus: Gpus | None = None
    gpu_models: list[GpuModel] | None = Field(default=None, max_length=64)
    cpu: float | None = Field(default=None, gt=0, le=4096)
    memory: MemoryAsk | None = None
    image: str | None = Field(default=None, max_length=512)
    memo: str | None = Field(default=None, max_length=10_000)
    restart_on_lost: bool | None = Field(
        default=None, description="requeue the child when its node is lost (None: as the parent)"
    )


class SessionPatch(Strict):
    """Change a session's memo or visibility."""

    memo: str | None = Field(default=None, max_length=10_000)
    visibility: Visibility | None = None
    team: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="the JupyterHub group that may read it (with visibility 'team'; one of "
        "the caller's groups)",
    )


class SessionResources(BaseModel):
    gpus: float
    gpu_models: list[str]
    cpu: float
    memory_mib: int


class QueueOut(BaseModel):
    position: int | None = Field(description="1 = next in line")
    code: str | None
    reason: str | None = Field(description="why it waits, for a person")


#: NaN and infinities in JSON bodies (JSON has no token for them; ``JSON.parse`` refuses
#: ``NaN``): these strings, in report bodies and in every answer.
NonFinite = Literal["nan", "inf", "-inf"]
#: A metric value as answered: a finite number or a :data:`NonFinite` string (null only in
#: sessions recorded before non-finite values were kept).
MetricValueOut = float | NonFinite | None


class SessionOut(BaseModel):
    name: str = Field(description="user/dataset/N (dataset '_' when none was mounted)")
    id: int
    user: str
    state: SessionState
    visibility: Visibility
    team: str | None = Field(
        default=None, description="the team whose members read it (visibility 'team')"
    )
    entry: str
    args: list[str]
    image: str
    datasets: list[str]
    code: str = Field(description="digest of the code snapshot")
    resources: SessionResources
    node: str | None
    gpu_ids: list[str]
    gpu_use: list[dict[str, object]] = Field(
        default_factory=list,
        description="while running: each GPU's index, utilization_pct and memory_used_mib, as "
        "the node last reported them",
    )
    exit_code: int | None
    reason: str | None = Field(
        description="why it ended: completed | exit_code | oom_killed | stopped | lost | "
        "node_lost | start_failed | infeasible"
    )
    message: str | None = Field(description="the same, for a person")
    queue: QueueOut | None = Field(description="queue position and reason while queued")
    stop_requested: bool
    parent: str | None = Field(description="the session this one was forked from")
    parent_checkpoint: str | None
    load_from: str | None = Field(description="SESSION/CHECKPOINT loaded at start, if any")
    attempt: int = Field(description="1, plus one per resume or requeue after a lost node")
    restart_on_lost: bool = Field(
        default=False, description="requeued from its last checkpoint when its node is lost"
    )
    memo: str
    last_step: int | None
    last_metrics: dict[str, MetricValueOut] = Field(
        description='the last value of every metric (NaN and infinities as "nan", "inf", "-inf")'
    )
    points: int = Field(description="report points received")
    created: str
    started: str | None
    finished: str | None
    duration_s: float | None
    credits_used: float | None = Field(
        default=None,
        description="credits charged so far for this session's allocations (all its "
        "attempts), from the ledger; null when not known",
    )
    credit_rate: float | None = Field(
        default=None,
        description="credits per hour it costs at the current policy while it holds "
        "resources; null when it holds none (not running)",
    )


class SessionList(BaseModel):
    sessions: list[SessionOut]


class LogChunk(BaseModel):
    offset: int = Field(description="byte offset of text in the stored log")
    next_offset: int = Field(description="ask for this offset to continue")
    size: int = Field(description="bytes stored so far")
    text: str
    complete: bool = Field(description="the session ended and its whole log is stored")


class EventOut(BaseModel):
    id: int
    session: str
    user: str
    kind: Literal["state", "failure", "notice"]
    state: SessionState | None
    message: str
    created: str


class EventList(BaseModel):
    events: list[EventOut]
    last_id: int = Field(description="pass as ?since= to get only newer events")


class MetricsIn(BaseModel):
    """``nsml.report`` points, as columns (what the SDK sends: ``steps``, ``walls``,
    ``values`` with one entry per step; null = not reported) or as rows (``points``:
    ``[[step|null, wall_time, {"name": value}], ...]``; a null step continues the last).

    Values are numbers or ``"nan"``, ``"inf"``, ``"-inf"``. ``batch`` is the sender's id for
    the batch: a batch repeated with the same id (a retry after a lost answer) is stored once.
    A session that has ended takes only points whose ``walls`` are before its end (409
    otherwise)."""

    batch: str | None = Field(default=None, min_length=1, max_length=128)
    steps: list[int] | None = None
    walls: list[float] | None = None
    values: dict[str, list[float | NonFinite | None]] | None = None
    points: list[list[object]] | None = None


class MetricsAccepted(BaseModel):
    accepted: int = Field(description="points in the batch")
    duplicate: bool = Field(
        default=False, description="the batch was stored before (same id): not stored again"
    )


class MetricSeries(BaseModel):
    steps: list[int]
    values: list[float | NonFinite] = Field(
        description='one per step; NaN and infinities as "nan", "inf", "-inf"'
    )
    walls: list[float]
    total: int = Field(
        default=0,
        description="points of the series in the asked step range before downsampling "
        "(more than len(steps) when max_points thinned it)",
    )


class MetricsOut(BaseModel):
    session: str
    last_step: int | None
    last_metrics: dict[str, MetricValueOut]
    points: int
    series: dict[str, MetricSeries]


class MetricsBatchOut(BaseModel):
    """Several sessions' metrics in one answer (``GET api/metrics?sessions=...``)."""

    metrics: list[MetricsOut] = Field(description="in the order asked, readable sessions only")
    errors: dict[str, str] = Field(
        description="per session name that is not there: why (no such session, not yours)"
    )


class GpuUseSeries(BaseModel):
    gpu: str = Field(description="the GPU's index on the node")
    utilization_pct: list[float | None] = Field(description="one per sample, percent")
    memory_used_mib: list[float | None] = Field(description="one per sample, MiB")


class GpuUseOut(BaseModel):
    """A session's GPU use over time: one sample per node heartbeat while it runs; older
    samples merged (``seconds`` says how long each covers), so the series stays bounded."""

    session: str
    state: str
    node: str | None
    t: list[float] = Field(description="each sample's start, seconds since the epoch (UTC)")
    seconds: list[float] = Field(description="the seconds each sample covers")
    gpus: list[GpuUseSeries]
    current_utilization_pct: float | None = Field(
        description="the last sample's mean utilisation over the session's GPUs"
    )
    note: str | None = Field(
        description="why there are no samples (e.g. virtual GPUs report no utilisation)"
    )
    idle_after_s: float = Field(description='seconds idle before the "GPUs idle" event')
    idle_threshold_pct: float = Field(description="utilisation at or below which a GPU is idle")


class CheckpointOut(BaseModel):
    session: str
    name: str
    size: int
    sha256: str
    step: int | None
    created: str


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointOut]


class PackRequest(BaseModel):
    """Ask for many small files of a version at once."""

    blobs: list[Annotated[str, Field(pattern=BLAKE3_PATTERN)]] = Field(max_length=20_000)
    split: Literal["", "test"] = Field(default="", description="'test': the hidden split (admins)")


class ExecIn(Strict):
    command: list[str] = Field(min_length=1, max_length=1000)
    timeout_s: float = Field(default=60, gt=0, le=600)


class ExecOut(BaseModel):
    exit_code: int
    output: str


class FileChangeOut(BaseModel):
    path: str
    change: Literal["added", "removed", "changed"]
    diff: str | None = Field(description="unified diff for text files, else None")


class DiffOut(BaseModel):
    a: str
    b: str
    args: dict[str, list[str]] = Field(description="'a' and 'b': each session's arguments")
    args_diff: str = Field(description="unified diff of the arguments, one per line")
    fields: dict[str, dict[str, object]] = Field(
        description="other settings that differ: name -> {'a': ..., 'b': ...}"
    )
    code: list[FileChangeOut]


# ---- datasets ----------------------------------------------------------------------------------


class UploadIn(Strict):
    """Begin (or resume) pushing a new version of a dataset."""

    manifest: dict[str, object] = Field(
        description="the version's files: {'format': 'nsml-dataset-manifest/2', 'entries': "
        "[{'path', 'size', 'blake3', 'executable'}]}"
    )
    test_manifest: dict[str, object] | None = Field(
        default=None,
        description="a hidden test split, stored apart: never mounted into a user's "
        "container, never pullable by users",
    )
    local_key: str | None = Field(
        default=None,
        description="the local-transport key (POST api/dataset-store/local) the files were "
        "stored with: the blobs it added to the store count as this version's new bytes",
    )


class MissingBlob(BaseModel):
    blake3: str
    size: int
    offset: int = Field(description="bytes already received: resume the PUT there")


class UploadOut(BaseModel):
    upload_id: str
    name: str
    digest: str = Field(description="BLAKE3 of the canonical manifest")
    test_digest: str | None
    files: int
    bytes: int
    missing: list[MissingBlob] = Field(
        description="blobs the caller must still send: every blob not received yet that no "
        "version the caller may read lists, whatever the store holds"
    )
    missing_bytes: int
    resumed: bool = Field(description="an upload of the same manifest was resumed")


class BlobOut(BaseModel):
    blake3: str
    size: int
    received: int = Field(description="bytes of the blob received so far")
    complete: bool


class PackOut(BaseModel):
    blobs: int = Field(description="blobs in the pack")
    stored: int = Field(description="blobs received and verified (stored once)")
    bytes: int


class LeaderboardOut(BaseModel):
    metric: str
    higher_is_better: bool


class HiddenSplitOut(BaseModel):
    digest: str | None = Field(description="shown to admins only")
    files: int | None = Field(description="shown to admins only")
    bytes: int | None = Field(description="shown to admins only")


class VersionOut(BaseModel):
    version: int
    ref: str = Field(description="NAME@k")
    digest: str
    files: int
    bytes: int
    new_bytes: int = Field(
        description="bytes of the files that no version its pusher could read held"
    )
    created: str
    created_by: str
    last_access: str | None
    test_split: HiddenSplitOut | None


class DatasetOut(BaseModel):
    name: str
    owner: str
    visibility: Visibility
    team: str | None
    scope: Literal["mine", "team", "public", "admin"] = Field(
        description="why the caller sees it: owner, team member, public, or as an admin"
    )
    versions: int
    latest: int | None
    bytes: int = Field(description="size of the latest version")
    total_bytes: int = Field(description="sum of the sizes of every version")
    leaderboard: LeaderboardOut | None
    created: str
    last_access: str | None


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


class DatasetInfo(DatasetOut):
    version_list: list[VersionOut]


class DatasetPatch(Strict):
    """Share a dataset or change its leaderboard settings (owner or admin)."""

    visibility: Visibility | None = None
    team: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="the JupyterHub group that may read it (with visibility 'team')",
    )
    metric: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$",
        description="the leaderboard's metric, e.g. 'accuracy'",
    )
    higher_is_better: bool | None = None
    daily_limit: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description="submissions per user in any 24 hours (null: no limit; 0: none)",
    )
    eval_timeout_s: int | None = Field(
        default=None, ge=10, le=7 * 24 * 3600, description="an evaluation's time limit"
    )
    eval_gpus: int | None = Field(
        default=None, ge=0, le=64, description="GPUs of an evaluation (null: as the session)"
    )
    closed: bool | None = Field(
        default=None,
        description="close the leaderboard (no more submissions; private scores shown), or "
        "open it again",
    )
    scorer: str | None = Field(
        default=None,
        min_length=1,
        max_length=256 * 1024,
        description="a Python scoring script, for metric 'custom': run as `python score.py "
        "PREDICTIONS LABELS` without network and with only those two files, it prints the "
        "score of the ids in LABELS on its last line",
    )


class DeletedOut(BaseModel):
    name: str
    versions: list[int] = Field(description="versions removed")
    dataset_removed: bool = Field(description="the dataset itself is gone (no version left)")


class StoreOut(BaseModel):
    max_file_bytes: int
    max_files: int
    store_blobs: int | None = Field(description="admins only")
    store_bytes: int | None = Field(description="admins only")
    uploads_in_progress: int | None = Field(description="admins only")
    local_socket: str | None = Field(
        default=None,
        description="the Unix socket of the local transport (files handed over as descriptors "
        "by clients on the server's machine; '@' is the abstract namespace), or null",
    )


class LocalGrantIn(Strict):
    """Ask for a key of the local transport: to push, or to pull one version."""

    dataset: str | None = Field(
        default=None, pattern=DATASET_NAME_PATTERN, description="the dataset to pull, if any"
    )
    version: int | None = Field(
        default=None, ge=1, le=999_999_999, description="its version (default latest)"
    )
    split: Literal["", "test"] = ""


class LocalGrantOut(BaseModel):
    socket: str = Field(description="where to connect")
    key: str = Field(description="what to present: store files, and open the version's blobs")
    uid: int = Field(description="the user id the socket must answer as (SO_PEERCRED)")
    expires_s: float
    version: int | None = Field(description="the version the key reads, if any")


class GcIn(Strict):
    older_than_s: float = Field(
        default=24 * 3600,
        ge=0,
        le=100 * 365 * 24 * 3600,
        description="grace period: uploads idle and blobs unreferenced for less are kept",
    )


class GcOut(BaseModel):
    blobs_removed: int
    bytes_freed: int
    manifests_removed: int
    uploads_removed: int
    tmp_removed: int
    missing_live: list[str]


class MountOut(BaseModel):
    ref: str = Field(description="NAME@k")
    dataset: str
    version: int
    state: Literal["preparing", "ready", "failed", "released"]
    host_path: str | None = Field(description="the folder on the node to bind-mount (ready)")
    container_path: str = Field(description="where the container sees it: /data/NAME")
    read_only: bool
    bytes: int
    message: str | None


class MountsOut(BaseModel):
    placement: int
    node: str
    state: Literal["ready", "preparing", "failed"]
    mounts: list[MountOut]
    message: str | None


class HoldOut(BaseModel):
    id: int
    allocation: int
    key: str
    dataset: str
    version: int
    digest: str
    bytes: int
    state: Literal["preparing", "ready", "failed", "released"]
    host_path: str | None


class HoldList(BaseModel):
    holds: list[HoldOut]


class HoldPatch(Strict):
    """A node agent's report on one hold."""

    state: Literal["ready", "failed"]
    host_path: str | None = Field(default=None, max_length=4096)
    message: str | None = Field(default=None, max_length=4000)


# ---- leaderboards ------------------------------------------------------------------------------

SubmissionState = Literal["queued", "running", "scored", "failed", "stopped"]


class SubmissionIn(Strict):
    """Submit a session's checkpoint to the leaderboard of the session's (first) dataset."""

    session: str = Field(
        max_length=400,
        pattern=r"^[^/]+/[A-Za-z0-9._-]{1,64}/[1-9][0-9]{0,9}$",
        description="the session USER/DATASET/N (it must have been run on a dataset)",
    )
    checkpoint: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$",
        description="the checkpoint to evaluate; default: the session's latest",
    )


class SubmissionOut(BaseModel):
    id: int
    dataset: str = Field(description="NAME@k whose hidden split scores it")
    user: str
    session: str
    checkpoint: str
    state: SubmissionState
    score: float | None = Field(description="the public score once scored")
    private_score: float | None = Field(
        description="the private part's score: shown once the leaderboard is closed"
    )
    message: str | None = Field(
        description="why it failed: one line, then the last lines of the program's output"
    )
    node: str | None
    submitted: str
    started: str | None
    finished: str | None


class SubmissionList(BaseModel):
    submissions: list[SubmissionOut]


class LeaderboardRow(BaseModel):
    rank: int
    user: str
    session: str
    checkpoint: str
    submission: int
    score: float | None = Field(
        description="the ranking score: public, or private once closed (null: none there)"
    )
    public_score: float
    private_score: float | None
    submitted: str
    mine: bool = Field(description="the caller's own submission")


class BoardOut(BaseModel):
    dataset: str
    metric: str | None
    higher_is_better: bool | None
    closed: bool
    has_private: bool = Field(description="the hidden split keeps a private part")
    daily_limit: int | None
    eval_timeout_s: int
    eval_gpus: int | None
    rows: list[LeaderboardRow]


# ---- credits, levels, teams ---------------------------------------------------------------------

CREDIT_LIMIT = 1e9
"""Largest amount of credits one grant moves (either way)."""


class CreditGrantIn(Strict):
    amount: float = Field(
        ge=-CREDIT_LIMIT,
        le=CREDIT_LIMIT,
        description="credits to give; negative deducts (never below a zero balance)",
    )
    reason: str = Field(min_length=1, max_length=500, description="why (kept in the ledger)")

    @field_validator("amount")
    @classmethod
    def _finite_nonzero(cls, v: float) -> float:
        if not math.isfinite(v) or round(v * 1000) == 0:
            raise ValueError("give a nonzero amount of at least 0.001 credits")
        return v


class CreditEntryOut(BaseModel):
    id: int
    kind: Literal["grant", "charge", "refund"]
    amount: float = Field(description="credits; negative for a charge")
    amount_milli: int
    reason: str
    actor: str
    user: str | None = Field(description="who ran the charged work")
    session_id: int | None
    server: str | None = Field(description="the notebook server charged ('' the default)")
    allocation: int | None
    interval_start: str | None
    created: str


class DayUsage(BaseModel):
    day: str = Field(description="YYYY-MM-DD (UTC)")
    credits: float


class CreditsOut(BaseModel):
    account: str
    team: bool = Field(description="the account is a team's pool")
    pays: str = Field(description="who pays for this user's work: 'user' or 'team:NAME'")
    balance: float = Field(description="credits")
    balance_milli: int
    burn_rate_per_hour: float = Field(description="credits an hour, for what runs now")
    hours_left: float | None = Field(description="at that rate; null when nothing burns")
    history: list[CreditEntryOut] = Field(description="newest first")
    usage_by_day: list[DayUsage] = Field(description="credits charged per day, oldest first")


class CreditPolicyIn(Strict):
    """Rates in thousandths of a credit per hour; fields not given keep their value."""

    gpu_hour_milli: int | None = Field(None, ge=0, le=10**12)
    gpu_hour_milli_by_model: dict[str, Annotated[int, Field(ge=0, le=10**12)]] | None = None
    cpu_hour_milli: int | None = Field(None, ge=0, le=10**12)
    memory_gb_hour_milli: int | None = Field(None, ge=0, le=10**12)
    interval_s: int | None = Field(None, ge=1, le=3600)
    warn_threshold_milli: int | None = Field(None, ge=0, le=10**15)
    admission_min_hours: float | None = Field(None, ge=0, le=8760)


class CreditPolicyOut(BaseModel):
    gpu_hour_milli: int = Field(description="per GPU-hour, GPU models not listed")
    gpu_hour_milli_by_model: dict[str, int]
    cpu_hour_milli: int
    memory_gb_hour_milli: int = Field(description="per GiB-hour of memory")
    interval_s: int = Field(description="the billing interval, seconds")
    warn_threshold_milli: int
    admission_min_hours: float = Field(description="new work needs this many hours' credits")


class LevelLimitsIn(Strict):
    max_gpus: int | None = Field(None, ge=0, le=10**6, description="null: no cap")
    max_running: int | None = Field(None, ge=0, le=10**6, description="null: no cap")
    priority: int = Field(0, ge=-1000, le=1000, description="queue priority of sessions")


class LimitsOut(BaseModel):
    max_gpus: float | None = Field(description="GPUs at once; null: no cap")
    max_running: int | None = Field(description="active sessions; null: no cap")
    priority: int


class LevelsOut(BaseModel):
    levels: dict[str, LimitsOut]


class UserLevelIn(Strict):
    """Fields not given keep their value; null clears an override."""

    level: Literal["user", "team_admin", "admin"] | None = None
    max_gpus: int | None = Field(None, ge=0, le=10**6)
    max_running: int | None = Field(None, ge=0, le=10**6)
    priority: int | None = Field(None, ge=-1000, le=1000)


class UserLevelOut(BaseModel):
    name: str
    level: str
    overrides: dict[str, int | None]
    limits: LimitsOut = Field(description="in force: the level's with the overrides")
    billing_team: str | None
    groups: list[str]


class BillingTeamIn(Strict):
    team: str | None = Field(max_length=255, description="null: the user pays")


class TeamIn(Strict):
    pays: bool = Field(description="members whose billing team it is draw from its pool")


class TeamAdminIn(Strict):
    admin: bool


class TeamOut(BaseModel):
    name: str
    pays: bool
    balance: float
    balance_milli: int
    admins: list[str]
    members: list[str] = Field(
        description="users in the hub group, as last seen (after a change of members: as "
        "the hub answered it)"
    )
    billed: list[str] = Field(description="members whose work the pool pays for")


class TeamList(BaseModel):
    teams: list[TeamOut]

"""SQLAlchemy 2 models of the NSML database.

The NSML server is the only writer of these tables; every other process (node agents, the
spawner, the client) goes through its REST API. Schema changes are Alembic migrations in
``nsml_server/migrations/versions``; never change a table here without one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NODE_STATES = ("up", "draining", "down")
VISIBILITIES = ("private", "team", "public")
HOLD_STATES = ("preparing", "ready", "failed", "released")
PERMISSION_LEVELS = ("user", "team_admin", "admin")


class Base(DeclarativeBase):
    """Declarative base with the project's constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    """A platform user, mirrored from JupyterHub on first contact.

    ``credits_milli`` is the balance in thousandths of a credit (integers, so that charges
    add up exactly); ``permission`` follows the hub's admin flag.
    """

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    permission: Mapped[str] = mapped_column(String(16), default="user")
    credits_milli: Mapped[int] = mapped_column(BigInteger, default=0)
    created: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime] = mapped_column(DateTime)
    # The NSML permission level an admin gave (``user`` / ``team_admin`` / ``admin``; a hub
    # admin is always ``admin``) and per-user overrides of that level's limits (None: the
    # level's). ``groups`` mirrors the hub's groups (teams) at the user's last contact;
    # ``billing_team`` is the team whose credit pool pays for the user's work (None: the user).
    level: Mapped[str] = mapped_column(String(16), default="user", server_default="user")
    max_gpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
    groups: Mapped[list[Any]] = mapped_column(default=list)
    billing_team: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: The low-balance warning was given since the balance last rose above the threshold.
    credits_warned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Node(Base):
    """A compute node: a Docker engine (or the local-process fallback) plus its GPUs."""

    __tablename__ = "nodes"
    __table_args__ = (
        CheckConstraint("cpu_allocated_milli >= 0", name="cpu_allocated_nonnegative"),
        CheckConstraint("memory_allocated_mib >= 0", name="memory_allocated_nonnegative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    docker_url: Mapped[str | None] = mapped_column(String(1024))
    backend: Mapped[str] = mapped_column(String(32), default="docker")
    state: Mapped[str] = mapped_column(String(16), default="up")
    cpu_milli: Mapped[int] = mapped_column(Integer, default=0)
    memory_mib: Mapped[int] = mapped_column(BigInteger, default=0)
    # What active allocations hold; changed only by conditional UPDATEs in nsml_server.ledger.
    cpu_allocated_milli: Mapped[int] = mapped_column(Integer, default=0)
    memory_allocated_mib: Mapped[int] = mapped_column(BigInteger, default=0)
    gpu_probe: Mapped[dict[str, Any]] = mapped_column(default=dict)
    images: Mapped[list[Any]] = mapped_column(default=list)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Dataset versions the node's cache holds, {"name@k": bytes}: the scheduler's locality.
    datasets: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created: Mapped[datetime] = mapped_column(DateTime)
    last_heartbeat: Mapped[datetime | None] = mapped_column(DateTime)
    # Work on the node was given up while it was silent (node loss): it receives nothing new
    # until the orphan sweep removed that work's containers from its engine.
    needs_sweep: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    gpus: Mapped[list[Gpu]] = relationship(
        back_populates="node", cascade="all, delete-orphan", order_by="Gpu.index"
    )


class Gpu(Base):
    """One GPU of a node, as the node's probe last reported it."""

    __tablename__ = "gpus"
    __table_args__ = (
        UniqueConstraint("node_id", "index", name="uq_gpus_node_id_index"),
        # A GPU is never given beyond its capacity, whatever the code above does.
        CheckConstraint(
            "allocated_milli >= 0 AND allocated_milli <= 1000", name="allocated_within_capacity"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    uuid: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(255))
    memory_total_mib: Mapped[int] = mapped_column(Integer, default=0)
    memory_used_mib: Mapped[int] = mapped_column(Integer, default=0)
    utilization_pct: Mapped[int | None] = mapped_column(Integer)
    nvlink_peers: Mapped[list[Any]] = mapped_column(default=list)
    pcie_group: Mapped[int | None] = mapped_column(Integer)
    healthy: Mapped[bool] = mapped_column(Boolean, default=True)
    allocated_milli: Mapped[int] = mapped_column(Integer, default=0)

    node: Mapped[Node] = relationship(back_populates="gpus")


class Allocation(Base):
    """Resources held on one node by exactly one holder (a session or a notebook server).

    ``holder`` is unique among active allocations: asking twice for the same holder returns
    the allocation it already has. Releasing is idempotent.
    """

    __tablename__ = "allocations"
    __table_args__ = (
        Index(
            "uq_allocations_active_holder",
            "holder",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    user_name: Mapped[str] = mapped_column(String(255), index=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"), index=True)
    gpu_indices: Mapped[list[Any]] = mapped_column(default=list)
    gpu_uuids: Mapped[list[Any]] = mapped_column(default=list)
    gpu_milli_per_gpu: Mapped[int] = mapped_column(Integer, default=0)
    cpu_milli: Mapped[int] = mapped_column(Integer, default=0)
    memory_mib: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default="active")
    created: Mapped[datetime] = mapped_column(DateTime)
    released: Mapped[datetime | None] = mapped_column(DateTime)
    leader_epoch: Mapped[int] = mapped_column(Integer, default=0)
    score: Mapped[dict[str, Any]] = mapped_column(default=dict)

    node: Mapped[Node] = relationship()


class PlacementRequestRow(Base):
    """A request waiting for, or decided by, the scheduler (the queue, persisted)."""

    __tablename__ = "placement_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str] = mapped_column(String(255), index=True)
    user_name: Mapped[str] = mapped_column(String(255))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="waiting", index=True)
    code: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    position: Mapped[int | None] = mapped_column(Integer)
    allocation_id: Mapped[int | None] = mapped_column(ForeignKey("allocations.id"))
    created: Mapped[datetime] = mapped_column(DateTime)
    decided: Mapped[datetime | None] = mapped_column(DateTime)


class Lease(Base):
    """A named lease (the scheduler's leadership): whoever holds an unexpired one leads.

    ``epoch`` grows at every change of holder and fences a former leader's late writes.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255), default="")
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    renewed_at: Mapped[datetime | None] = mapped_column(DateTime)


# ---- training sessions ------------------------------------------------------------------------

SESSION_STATES = (
    "queued",
    "preparing",
    "running",
    "completed",
    "failed",
    "oom_killed",
    "stopped",
    "lost",
)
SESSION_ACTIVE_STATES = ("queued", "preparing", "running")
SESSION_FINAL_STATES = ("completed", "failed", "oom_killed", "stopped", "lost")
SESSION_VISIBILITIES = ("private", "team", "public")


class TrainingSession(Base):
    """A background training session ``user/dataset/N`` and its life.

    ``state`` moves ``queued -> preparing -> running -> completed | failed | oom_killed |
    stopped | lost`` and only the session runner of the leading server moves it (with
    conditional updates). ``token_hash`` is the SHA-256 of the session-scoped token given to
    the container; it is cleared when the session ends. ``visibility`` is ``private`` (the
    owner and admins), ``team`` (also the members of the JupyterHub group ``team``; its team
    admins may stop it) or ``public`` (every user reads it).
    """

    __tablename__ = "sessions"
    __table_args__ = (
        UniqueConstraint("user_name", "dataset_key", "number", name="uq_sessions_user_dataset_n"),
        # Checked by the database on PostgreSQL (migration 0012), by the API everywhere.
        CheckConstraint("visibility IN ('private', 'team', 'public')", name="visibility_valid"),
        CheckConstraint("visibility != 'team' OR team IS NOT NULL", name="team_named"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)
    user_name: Mapped[str] = mapped_column(String(255), index=True)
    dataset_key: Mapped[str] = mapped_column(String(64))
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    visibility: Mapped[str] = mapped_column(String(16), default="private")
    team: Mapped[str | None] = mapped_column(String(255), index=True)
    code_digest: Mapped[str] = mapped_column(String(64))
    entry: Mapped[str] = mapped_column(String(1024))
    args: Mapped[list[Any]] = mapped_column(default=list)
    image: Mapped[str] = mapped_column(String(512))
    datasets: Mapped[list[Any]] = mapped_column(default=list)
    resources: Mapped[dict[str, Any]] = mapped_column(default=dict)
    placement_id: Mapped[int | None] = mapped_column(Integer)
    node: Mapped[str | None] = mapped_column(String(255))
    gpu_ids: Mapped[list[Any]] = mapped_column(default=list)
    handle: Mapped[str | None] = mapped_column(String(255))
    # Bytes of the stored log written before the current container's output began.
    log_base: Mapped[int] = mapped_column(BigInteger, default=0)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    stop_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("sessions.id", ondelete="SET NULL"), index=True
    )
    parent_name: Mapped[str | None] = mapped_column(String(512))
    parent_checkpoint: Mapped[str | None] = mapped_column(String(255))
    load_from: Mapped[str | None] = mapped_column(String(800))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # Lost with its node: queue it again as the next attempt, from its last checkpoint.
    restart_on_lost: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    memo: Mapped[str] = mapped_column(Text, default="")
    token_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    last_step: Mapped[int | None] = mapped_column(BigInteger)
    last_metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    points: Mapped[int] = mapped_column(BigInteger, default=0)
    created: Mapped[datetime] = mapped_column(DateTime)
    started: Mapped[datetime | None] = mapped_column(DateTime)
    finished: Mapped[datetime | None] = mapped_column(DateTime)


class SessionEvent(Base):
    """One entry of the event feed: a session changed state, failed, or has news."""

    __tablename__ = "session_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    session_name: Mapped[str] = mapped_column(String(512))
    user_name: Mapped[str] = mapped_column(String(255), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str | None] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(DateTime)


class UserNotice(Base):
    """Something a user is told that is no session's event: credits running low, a GPU
    notebook server about to be stopped for credits. The billing leader writes it in the
    transaction that decided it; every server process's event stream reads new rows and sends
    them to that user's open notebooks (a ``notice`` event), so the notice reaches a notebook
    whichever process serves its stream. Rows older than a day are deleted (the stream sends
    only what is new)."""

    __tablename__ = "user_notices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_name: Mapped[str] = mapped_column(String(255), index=True)
    subject: Mapped[str] = mapped_column(String(255))
    message: Mapped[str] = mapped_column(Text, default="")
    level: Mapped[str] = mapped_column(String(16), default="warning")
    created: Mapped[datetime] = mapped_column(DateTime, index=True)


class SessionMetricChunk(Base):
    """A batch of ``nsml.report`` points of one session, stored as received (compact JSON).

    ``payload`` is the batch as received (columns) in report order; a batch is one row, so
    ingestion costs one insert per batch, not per point. ``arrays`` holds the same columns as
    little-endian arrays (:func:`nsml_server.sessions.encode_arrays`), which plots read
    without decoding JSON; None for batches stored before it existed.
    """

    __tablename__ = "session_metric_chunks"
    __table_args__ = (
        UniqueConstraint("session_id", "batch", name="uq_session_metric_chunks_session_id_batch"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    first_step: Mapped[int] = mapped_column(BigInteger)
    last_step: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(Integer)
    payload: Mapped[str] = mapped_column(Text)
    arrays: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    created: Mapped[datetime] = mapped_column(DateTime)
    #: The sender's id of the batch (a retry carries the same), unique per session; or None.
    batch: Mapped[str | None] = mapped_column(String(128), nullable=True)


class SessionCheckpoint(Base):
    """A checkpoint saved by ``nsml.save(name)``: a tar archive in the artifact store."""

    __tablename__ = "session_checkpoints"
    __table_args__ = (
        UniqueConstraint("session_id", "name", name="uq_session_checkpoints_session_id_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    step: Mapped[int | None] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(DateTime)


class CodeUpload(Base):
    """Who uploaded which code snapshot (``POST api/code``).

    A snapshot's digest names its content; it does not grant it. A session may run a
    snapshot only when its user uploaded it (a row here), can read a session that runs it,
    or is an admin: a user who learns another user's digest cannot run (and so read) that
    code.
    """

    __tablename__ = "code_uploads"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    created: Mapped[datetime] = mapped_column(DateTime)


class Dataset(Base):
    """A named dataset: its owner, who may read it, and its leaderboard settings.

    Names are global. ``visibility`` is ``private`` (the owner and admins), ``team`` (also the
    members of the JupyterHub group ``team``) or ``public`` (every user). ``next_version``
    only grows, so ``NAME@k`` names one content forever, even after ``rm NAME@k``.
    """

    __tablename__ = "datasets"
    __table_args__ = (
        CheckConstraint("visibility IN ('private', 'team', 'public')", name="visibility_valid"),
        CheckConstraint("visibility != 'team' OR team IS NOT NULL", name="team_named"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    visibility: Mapped[str] = mapped_column(String(16), default="private")
    team: Mapped[str | None] = mapped_column(String(255))
    metric: Mapped[str | None] = mapped_column(String(64))
    higher_is_better: Mapped[bool | None] = mapped_column(Boolean)
    # Leaderboard rules, set by the owner: submissions per user in any 24 hours (None: no
    # limit), an evaluation's time limit, its GPUs (None: as the submitted session had), and
    # whether the board is closed (no more submissions; private scores shown and ranked).
    daily_limit: Mapped[int | None] = mapped_column(Integer)
    eval_timeout_s: Mapped[int] = mapped_column(Integer, default=3600)
    eval_gpus: Mapped[int | None] = mapped_column(Integer)
    closed: Mapped[bool] = mapped_column(Boolean, default=False)
    # The owner's scoring script, for metric "custom" (run apart from user code).
    scorer: Mapped[str | None] = mapped_column(Text)
    next_version: Mapped[int] = mapped_column(Integer, default=1)
    created: Mapped[datetime] = mapped_column(DateTime)
    last_access: Mapped[datetime | None] = mapped_column(DateTime)

    versions: Mapped[list[DatasetVersion]] = relationship(
        back_populates="dataset",
        cascade="all, delete-orphan",
        order_by="DatasetVersion.version",
        passive_deletes=True,
    )


class DatasetVersion(Base):
    """One immutable version ``NAME@k``: a manifest in the blob store, by its digest.

    ``test_digest`` names the hidden test split, a manifest stored apart that is never
    mounted into a user's container nor pulled by users. ``new_bytes`` is what the push of
    this version brought: the bytes of the blobs that no version its pusher could read
    listed (not what was new to the store: that would tell the pusher what others stored).
    """

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "version", name="uq_dataset_versions_k"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    version: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    files: Mapped[int] = mapped_column(Integer, default=0)
    new_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    test_digest: Mapped[str | None] = mapped_column(String(64))
    test_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    test_files: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(DateTime)
    created_by: Mapped[str] = mapped_column(String(255))
    last_access: Mapped[datetime | None] = mapped_column(DateTime)

    dataset: Mapped[Dataset] = relationship(back_populates="versions")


class DatasetUpload(Base):
    """A push in progress: the store's upload(s), for whom, of which manifest(s).

    ``id`` is the store's upload id of the files; ``test_upload_id`` that of the hidden test
    split, when the push has one. Committing turns it into the next version of ``name``
    (creating the dataset on its first version); nothing is visible before that.
    """

    __tablename__ = "dataset_uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    digest: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    files: Mapped[int] = mapped_column(Integer, default=0)
    missing_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    test_upload_id: Mapped[str | None] = mapped_column(String(32))
    test_digest: Mapped[str | None] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime)
    updated: Mapped[datetime] = mapped_column(DateTime)


class DatasetHold(Base):
    """A dataset version made present in a node's cache for one allocation, mounted read-only.

    ``state``: ``preparing`` (the node is filling its cache), ``ready`` (``host_path`` is the
    folder to mount), ``failed`` (``message`` says why), ``released`` (the allocation ended
    and the node's cache no longer holds it for it).
    """

    __tablename__ = "dataset_holds"
    __table_args__ = (
        UniqueConstraint("allocation_id", "key", name="uq_dataset_holds_allocation_key"),
        CheckConstraint(
            "state IN ('preparing', 'ready', 'failed', 'released')", name="state_valid"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    allocation_id: Mapped[int] = mapped_column(ForeignKey("allocations.id"), index=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"), index=True)
    dataset: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default="preparing", index=True)
    host_path: Mapped[str | None] = mapped_column(Text)
    message: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime)
    updated: Mapped[datetime] = mapped_column(DateTime)


SUBMISSION_STATES = ("queued", "running", "scored", "failed", "stopped")


class Submission(Base):
    """A session's checkpoint submitted to its dataset's leaderboard, and its evaluation.

    ``state`` moves ``queued -> running -> scored | failed | stopped`` (``stopped``: asked to
    stop by ``stop_reason``, e.g. its user's credits ran out); only the evaluation runner of
    the leading server moves it. The evaluation runs the session's image and code with the
    checkpoint and the test inputs of ``dataset_ref``'s hidden split, without network; the
    server scores its predictions against the labels (``public_score``; ``private_score`` on
    the private part, when the split has one). ``message`` says why a failed one failed.
    """

    __tablename__ = "submissions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    dataset_ref: Mapped[str] = mapped_column(String(80))
    test_digest: Mapped[str] = mapped_column(String(64))
    user_name: Mapped[str] = mapped_column(String(255), index=True)
    session_id: Mapped[int | None] = mapped_column(
        ForeignKey("sessions.id", ondelete="SET NULL"), index=True
    )
    session_name: Mapped[str] = mapped_column(String(512))
    checkpoint: Mapped[str] = mapped_column(String(255))
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    code_digest: Mapped[str] = mapped_column(String(64))
    entry: Mapped[str] = mapped_column(String(1024))
    args: Mapped[list[Any]] = mapped_column(default=list)
    image: Mapped[str] = mapped_column(String(512))
    resources: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    placement_id: Mapped[int | None] = mapped_column(Integer)
    node: Mapped[str | None] = mapped_column(String(255))
    gpu_ids: Mapped[list[Any]] = mapped_column(default=list)
    handle: Mapped[str | None] = mapped_column(String(255))
    #: Set to ask the evaluation runner to stop it (``credits``: its user ran out).
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    public_score: Mapped[float | None] = mapped_column(Float)
    private_score: Mapped[float | None] = mapped_column(Float)
    message: Mapped[str | None] = mapped_column(Text)
    submitted: Mapped[datetime] = mapped_column(DateTime, index=True)
    started: Mapped[datetime | None] = mapped_column(DateTime)
    finished: Mapped[datetime | None] = mapped_column(DateTime)


class SessionGpuUse(Base):
    """A running session's GPU use over time (:mod:`nsml_server.gpu_use`): one row per
    session, its bounded series of samples (``[{"t", "w", "u", "m"}]``: start time, seconds
    covered, utilisation % and memory MiB per GPU), older samples merged as it grows."""

    __tablename__ = "session_gpu_use"

    session_id: Mapped[int] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    )
    gpu_ids: Mapped[list[Any]] = mapped_column(default=list)
    samples: Mapped[list[Any]] = mapped_column(default=list)
    #: Start (epoch seconds) of the idle stretch the last "GPUs idle" notice was given for.
    idle_notified_for: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


# ---- credits, teams, permission levels, audit ---------------------------------------------------

CREDIT_KINDS = ("grant", "charge", "refund")
ACCOUNT_KINDS = ("user", "team")


class CreditEntry(Base):
    """One row of the append-only credit ledger: a grant, a charge or a refund.

    ``amount_milli`` is signed (a charge is negative). Every balance (``users.credits_milli``,
    ``teams.credits_milli``) is the sum of its account's rows; the cached balance is updated
    in the same transaction as the row (:mod:`nsml_server.credits`). A charge names the
    allocation it bills and the start of its billing interval: ``(allocation_id,
    interval_start)`` is unique, so an interval is charged at most once, whichever server
    (leader, restarted leader, standby that took over) bills it.
    """

    __tablename__ = "credit_ledger"
    __table_args__ = (
        UniqueConstraint("allocation_id", "interval_start", name="uq_credit_ledger_interval"),
        Index("ix_credit_ledger_account", "account_kind", "account", "id"),
        # Billing looks up the newest charges (the last few intervals) of every allocation.
        Index("ix_credit_ledger_interval_start", "interval_start"),
        # A session's charges (its credits_used in the API).
        Index("ix_credit_ledger_session_id", "session_id"),
        CheckConstraint("account_kind IN ('user', 'team')", name="account_kind_valid"),
        CheckConstraint("kind IN ('grant', 'charge', 'refund')", name="kind_valid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_kind: Mapped[str] = mapped_column(String(8), default="user")
    account: Mapped[str] = mapped_column(String(255))
    amount_milli: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(255))
    #: Who ran the charged work (the account may be their team).
    user_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    session_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    server_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    allocation_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    interval_start: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, index=True)


class CreditPolicyRow(Base):
    """The credit policy (one row, ``id = 1``; absent: the defaults of
    :class:`nsml_server.credits.Policy`). Rates are in thousandths of a credit per hour."""

    __tablename__ = "credit_policy"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    gpu_hour_milli: Mapped[int] = mapped_column(BigInteger)
    gpu_hour_milli_by_model: Mapped[dict[str, Any]] = mapped_column(default=dict)
    cpu_hour_milli: Mapped[int] = mapped_column(BigInteger)
    memory_gb_hour_milli: Mapped[int] = mapped_column(BigInteger)
    interval_s: Mapped[int] = mapped_column(Integer)
    warn_threshold_milli: Mapped[int] = mapped_column(BigInteger)
    admission_min_hours: Mapped[float] = mapped_column(Float)
    updated: Mapped[datetime] = mapped_column(DateTime)
    updated_by: Mapped[str] = mapped_column(String(255))


class Team(Base):
    """A team: a JupyterHub group of the same name (the hub owns membership). When ``pays``,
    members whose ``billing_team`` is this team draw from its pool ``credits_milli``."""

    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    pays: Mapped[bool] = mapped_column(Boolean, default=False)
    credits_milli: Mapped[int] = mapped_column(BigInteger, default=0)
    credits_warned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created: Mapped[datetime] = mapped_column(DateTime)


class TeamAdmin(Base):
    """A user who administers a team (its members' billing and its pool's use)."""

    __tablename__ = "team_admins"

    team_id: Mapped[int] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True
    )
    user_name: Mapped[str] = mapped_column(String(255), primary_key=True)


class LevelLimit(Base):
    """The limits of a permission level (None: no limit); a user's overrides win."""

    __tablename__ = "level_limits"

    level: Mapped[str] = mapped_column(String(16), primary_key=True)
    max_gpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)


class AuditEntry(Base):
    """One admin action: who did what to which object, with the details as JSON text."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    actor: Mapped[str] = mapped_column(String(255), index=True)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(512))
    detail: Mapped[str] = mapped_column(Text, default="{}")
    created: Mapped[datetime] = mapped_column(DateTime, index=True)

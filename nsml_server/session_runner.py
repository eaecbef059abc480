"""The session runner: place -> prepare -> run the container -> follow -> record -> release.

The runner lives in the server that holds the scheduler lease (the leader), beside the
scheduler loop. Every tick it reads the live sessions (``queued``, ``preparing``,
``running``) and drives each in a task of its own:

- **queued**: submit a placement request (holder ``USER:session/DATASET/N``) and wait for the
  scheduler's decision; a request that can never fit ends the session ``failed``.
- **preparing**: mint the session-scoped token, copy the code snapshot into the session's
  folder, start the container on the allocated node's engine with the GPUs, limits, code,
  datasets (read-only) and the ``nsml`` environment.
- **running**: copy the container's output into ``<state>/sessions/ID/output.log`` as it
  comes; when the container ends, record the exit code, ``oom_killed`` or ``stopped``
  (a stop sends SIGTERM, waits the grace period, then kills), release the allocation,
  revoke the token, add an event and notify the user of a failure.

Nothing is kept only in memory: after a restart (or when a standby takes over) the runner
finds a running container again by its handle and follows it, and a session whose
container vanished ends ``lost``.

A node whose engine does not answer is waited for, not failed: the session stays
``running`` (a notice in its events says so) until the node has been silent past
``node_timeout + node_lost_grace``; then the session is lost, or queued again as its next
attempt from its last checkpoint when it asked for ``restart_on_lost`` (the rule is in
:mod:`nsml_server.node_loss`). The runner also sweeps a returning node's orphan containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, select

from .api.base import APIError
from .artifacts import ArtifactError, ArtifactStore
from .backends import (
    BackendError,
    DockerBackend,
    ExecutionBackend,
    Mount,
    NameConflict,
    RunNotFound,
    RunSpec,
    RunState,
)
from .backends.docker import remote_tls
from .datasets import Caller, DatasetService
from .db import Database
from .levels import queue_priority
from .models import (
    SESSION_ACTIVE_STATES,
    Allocation,
    Node,
    PlacementRequestRow,
    TrainingSession,
)
from .node_loss import (
    LABEL_ATTEMPT,
    LABEL_SERVER,
    LABEL_SESSION_ID,
    Verdict,
    active_allocations,
    fence,
    node_verdict,
    orphan_reason,
    plan_lost_session,
    session_views,
)
from .sessions import (
    CODE_MOUNT,
    FAILURE_STATES,
    add_event,
    checkpoints,
    classify_exit,
    mint_token,
    session_command,
    session_env,
    transition,
)

log = logging.getLogger("nsml_server.sessions")

LABEL_SESSION = "org.jupyter-nsml.session"
__all__ = ["LABEL_ATTEMPT", "LABEL_SERVER", "LABEL_SESSION", "LABEL_SESSION_ID"]
#: Errors of a node's engine that mean "it does not answer" (not "it refused").
UNREACHABLE = ("engine_unavailable", "node_unreachable")
MIB = 1024 * 1024
#: Bytes of the log's end read to find a traceback for the failure message.
LOG_TAIL_BYTES = 64 * 1024
#: A step that fails this many times in a row (an internal error) ends the session failed.
MAX_STEP_FAILURES = 5


class DatasetsUnavailable(BackendError):
    """The session asks for datasets, and this server has no dataset store."""

    reason = "datasets_unavailable"


@dataclass
class RunnerSettings:
    """What the runner needs to know beyond the database.

    Attributes:
        api_url: the NSML API as a session container reaches it (host network).
        stop_grace_s: seconds between SIGTERM and SIGKILL when a session is stopped.
        container_prefix: session containers are named ``PREFIX-ID-ATTEMPT``.
        server_label: a label value naming this deployment, so that a restarted server
            adopts only its own containers.
        keep_containers: leave ended containers on the engine (for debugging).
        poll_s: seconds between the runner's ticks.
        node_timeout_s: a node silent this long is down (``NSMLServer.node_timeout``).
        node_lost_grace_s: and this much longer, its unconfirmed work is lost
            (``NSMLServer.node_lost_grace``).
        lost_max_attempts: a session asked to restart when lost is requeued only while its
            attempts stay below this (``NSMLServer.lost_max_attempts``).
        unreachable_retry_s: seconds between questions to an engine that does not answer.
        engine_check_s: a running session's node is checked this often while its output is
            quiet (a partitioned engine sends no error).
    """

    api_url: str
    stop_grace_s: float = 10.0
    container_prefix: str = "nsml-session"
    server_label: str = "nsml"
    keep_containers: bool = False
    poll_s: float = 1.0
    node_timeout_s: float = 45.0
    node_lost_grace_s: float = 60.0
    lost_max_attempts: int = 3
    unreachable_retry_s: float = 2.0
    engine_check_s: float = 5.0


def server_label_for(db_url: str) -> str:
    """A stable label for one deployment (its database)."""
    return hashlib.sha256(db_url.encode()).hexdigest()[:16]


class BackendPool:
    """The execution backend of each node: the local node's own, else its Docker engine.

    Remote engines are reached at the URL the node's agent advertised; a ``tcp://`` engine
    with the client certificate in ``$DOCKER_CERT_PATH`` (``cert.pem``, ``key.pem``,
    ``ca.pem``), as the spawner does.
    """

    def __init__(
        self,
        db: Database,
        local_node: str | None,
        local_backend: ExecutionBackend | None,
        make_docker: Callable[[str], ExecutionBackend] | None = None,
    ) -> None:
        self.db = db
        self.local_node = local_node
        self.local_backend = local_backend
        self.make_docker = make_docker or (
            lambda url: DockerBackend(
                url, remote_tls(url, os.environ.get("DOCKER_CERT_PATH")), logger=log
            )
        )
        self._remote: dict[str, ExecutionBackend] = {}

    def is_local(self, node: str) -> bool:
        """Whether *node* is this server's own machine (its files are visible there)."""
        return node == self.local_node and self.local_backend is not None

    def for_node(self, node: str) -> ExecutionBackend:
        """The backend that runs containers on *node*.

        Raises:
            BackendError: the node is unknown or advertises no engine.
        """
        if self.is_local(node):
            assert self.local_backend is not None
            return self.local_backend
        with self.db.session() as s:
            url = s.scalar(select(Node.docker_url).where(Node.name == node))
        if not url:
            raise BackendError(
                f"node {node} advertises no Docker engine URL; start its agent with "
                "--docker-url tcp://HOST:2376",
                reason="node_unreachable",
            )
        backend = self._remote.get(url)
        if backend is None:
            backend = self._remote[url] = self.make_docker(url)
        return backend

    async def close(self) -> None:
        for b in self._remote.values():
            await b.close()
        self._remote.clear()


@dataclass
class _Live:
    """In-memory companions of a live session's task."""

    task: asyncio.Task[None]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    failures: int = 0


class SessionRunner:
    """Drives live sessions while this server leads (see the module documentation).

    Args:
        db: the database.
        scheduler: the placement scheduler (``submit``, ``wait_decided``, ``release``).
        is_leader: whether this server holds the scheduler lease now.
        backends: the execution backend per node.
        store: code snapshots.
        sessions_dir: where each session's folder (log, code copy) lives.
        settings: see :class:`RunnerSettings`.
        now: the clock (naive UTC).
        notify: called with ``(user, session name, state, message, log tail)`` when a
            session fails (runs in a thread; must not raise).
        datasets: the dataset service; it makes a placement's datasets present in its node's
            cache and says where (None: sessions with datasets cannot start).
    """

    def __init__(
        self,
        db: Database,
        scheduler: Any,
        is_leader: Callable[[], bool],
        backends: BackendPool,
        store: ArtifactStore,
        sessions_dir: Path,
        settings: RunnerSettings,
        now: Callable[[], datetime],
        notify: Callable[[str, str, str, str, str], None] | None = None,
        datasets: DatasetService | None = None,
    ) -> None:
        self.db = db
        self.scheduler = scheduler
        self.is_leader = is_leader
        self.backends = backends
        self.store = store
        self.sessions_dir = sessions_dir
        self.settings = settings
        self.now = now
        self.notify = notify
        self.datasets = datasets
        self._live: dict[int, _Live] = {}
        self._wake: asyncio.Event | None = None
        #: Sessions whose node's engine did not answer at the last question (notice given).
        self._unanswered: set[int] = set()
        #: Orphan sweeps in progress, by node name.
        self._sweeps: dict[str, asyncio.Task[int]] = {}
        sessions_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ---- paths -----------------------------------------------------------------------------

    def session_dir(self, session_id: int) -> Path:
        return self.sessions_dir / str(session_id)

    def log_path(self, session_id: int) -> Path:
        return self.session_dir(session_id) / "output.log"

    # ---- the loop --------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at the sessions now (a new one, a stop request)."""
        if self._wake is not None:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until *stop* is set; containers keep running when the server stops."""
        self._wake = asyncio.Event()
        try:
            while not stop.is_set():
                try:
                    if self.is_leader():
                        await self.tick()
                    elif self._live:
                        log.info("no longer leading: handing %d sessions over", len(self._live))
                        await self._drop_all()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("session runner tick failed; retrying")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)
        finally:
            await self._drop_all()

    async def _drop_all(self) -> None:
        tasks: list[asyncio.Task[Any]] = [live.task for live in self._live.values()]
        tasks += self._sweeps.values()
        self._sweeps.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._live.clear()

    async def tick(self) -> None:
        """Start a task for every live session without one; pass on stop requests; sweep
        the orphan containers of fenced nodes that answer again."""
        with self.db.session() as s:
            rows = s.execute(
                select(TrainingSession.id, TrainingSession.stop_requested).where(
                    TrainingSession.state.in_(SESSION_ACTIVE_STATES)
                )
            ).all()
            fenced = list(
                s.scalars(select(Node.name).where(Node.needs_sweep.is_(True), Node.state != "down"))
            )
        for name in fenced:
            if name not in self._sweeps or self._sweeps[name].done():
                self._sweeps[name] = asyncio.create_task(self.sweep(name), name=f"sweep-{name}")
        active = {sid for sid, _ in rows}
        for sid in [k for k, v in self._live.items() if v.task.done()]:
            live = self._live.pop(sid)
            exc = None if live.task.cancelled() else live.task.exception()
            if sid not in active or exc is None:
                continue
            # The step raised: try again later, and give up on a session that keeps failing.
            live.failures += 1
            if live.failures >= MAX_STEP_FAILURES:
                await self._give_up(sid, exc)
                active.discard(sid)
                continue
            self._start(sid, live.failures)
        for sid, stop_requested in rows:
            if sid not in active:
                continue
            if sid not in self._live:
                self._start(sid, 0)
            if stop_requested:
                self._live[sid].stop.set()

    def _start(self, sid: int, failures: int) -> None:
        task = asyncio.create_task(self._drive(sid, failures), name=f"session-{sid}")
        self._live[sid] = _Live(task=task, failures=failures)

    async def _give_up(self, sid: int, exc: BaseException | None) -> None:
        with self.db.session() as s:
            row = s.get(TrainingSession, sid)
            state = row.state if row else None
        if row is None or state is None:
            return
        log.error("%s: giving up after %d internal errors: %s", row.name, MAX_STEP_FAILURES, exc)
        await self._finish(
            row,
            "failed",
            "internal_error",
            f"The platform could not run the session ({exc}); the operator's log has details.",
            None,
        )

    # ---- one session -----------------------------------------------------------------------

    async def _drive(self, sid: int, failures: int) -> None:
        if failures:
            await asyncio.sleep(min(30.0, 0.5 * 2**failures))
        try:
            while True:
                with self.db.session() as s:
                    row = s.get(TrainingSession, sid)
                if row is None or row.state not in SESSION_ACTIVE_STATES:
                    return
                if row.state == "queued":
                    await self._queued(row)
                elif row.state == "preparing":
                    await self._preparing(row)
                else:
                    await self._running(row)
                live = self._live.get(sid)
                if live is not None:
                    live.failures = 0  # a step went through: earlier errors were transient
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("session %d: step failed", sid)
            raise

    def _stop_event(self, sid: int) -> asyncio.Event:
        live = self._live.get(sid)
        return live.stop if live is not None else asyncio.Event()

    async def _queued(self, row: TrainingSession) -> None:
        stop = self._stop_event(row.id)
        if row.stop_requested or stop.is_set():
            await self._finish(row, "stopped", "stopped", "Stopped before it started.", None)
            return
        if row.placement_id is None:
            spec = {k: v for k, v in row.resources.items() if k != "gpus"}
            with self.db.session() as s:
                p = self.scheduler.submit(
                    s,
                    user=row.user_name,
                    holder=f"{row.user_name}:session/{row.dataset_key}/{row.number}",
                    spec=spec,
                    priority=queue_priority(s, row.user_name),  # the user's level's
                )
                pid = p.id
                s.execute(
                    cast(Table, TrainingSession.__table__)
                    .update()
                    .where(TrainingSession.id == row.id)
                    .values(placement_id=pid)
                )
            log.info("%s: queued as placement %d", row.name, pid)
            row.placement_id = pid
        decided = asyncio.create_task(self.scheduler.wait_decided(row.placement_id, 5.0))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({decided, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for t in (decided, stopped):
            t.cancel()
        with self.db.session() as s:
            p = s.get(PlacementRequestRow, row.placement_id)
            fresh = s.get(TrainingSession, row.id)
            if p is None or fresh is None:
                return
            pstate, pmsg = p.state, p.message
            alloc = s.get(Allocation, p.allocation_id) if p.allocation_id else None
            stop_requested = fresh.stop_requested or stop.is_set()
            if pstate == "placed" and alloc is not None and not stop_requested:
                node = s.get(Node, alloc.node_id)
                transition(
                    s,
                    row.id,
                    ["queued"],
                    "preparing",
                    node=node.name if node else None,
                    gpu_ids=[str(i) for i in alloc.gpu_indices],
                )
                add_event(
                    s,
                    row,
                    "state",
                    f"placed on {node.name if node else '?'}"
                    + (
                        f" with GPUs {','.join(map(str, alloc.gpu_indices))}"
                        if alloc.gpu_indices
                        else ""
                    ),
                    self.now(),
                    state="preparing",
                )
                return
        if stop_requested:
            await self._finish(row, "stopped", "stopped", "Stopped before it started.", None)
        elif pstate == "failed":
            await self._finish(row, "failed", "infeasible", pmsg or "It can never fit.", None)
        elif pstate in ("cancelled", "released"):
            await self._finish(
                row, "failed", "placement_lost", "Its placement request was cancelled.", None
            )

    async def _preparing(self, row: TrainingSession) -> None:
        assert row.node is not None
        stop = self._stop_event(row.id)
        if row.stop_requested or stop.is_set():
            await self._finish(row, "stopped", "stopped", "Stopped before it started.", None)
            return
        try:
            backend = self.backends.for_node(row.node)
            labels = {
                LABEL_SESSION: row.name,
                LABEL_SESSION_ID: str(row.id),
                LABEL_ATTEMPT: str(row.attempt),
                LABEL_SERVER: self.settings.server_label,
            }
            found = await backend.list(labels)
            if found:
                log.info("%s: adopting container %s started before a restart", row.name, found[0])
                self._mark_running(row, found[0], self._log_size(row.id))
                return
            data = await self._dataset_mounts(row, stop)
            if data is None:
                return  # still caching (or stopping): the next step looks again
            handle, log_base = await self._start_container(row, backend, labels, data)
        except BackendError as e:
            if e.reason in UNREACHABLE:
                await self._unanswered_engine(row, e.message)
                return
            await self._start_failed(row, e)
            return
        except ArtifactError as e:
            await self._start_failed(row, e)
            return
        self._answered(row)
        if not self._mark_running(row, handle, log_base):
            await backend.remove(handle)

    async def _start_failed(self, row: TrainingSession, e: BackendError | ArtifactError) -> None:
        message = getattr(e, "message", str(e))
        reason = getattr(e, "reason", "start_failed")
        log.warning("%s: could not start: %s", row.name, message)
        await self._finish(
            row,
            "failed",
            "start_failed" if reason in ("backend", "bad_request") else reason,
            f"The session could not start: {message}",
            None,
        )

    def _log_size(self, sid: int) -> int:
        try:
            return self.log_path(sid).stat().st_size
        except FileNotFoundError:
            return 0

    async def _dataset_mounts(
        self, row: TrainingSession, stop: asyncio.Event, wait_s: float = 5.0
    ) -> list[Mount] | None:
        """Read-only mounts (node cache path -> ``/data/NAME``) of the session's datasets.

        Asks the dataset service to make them present on the session's node and hold them for
        its allocation (the local node's cache fills in this server; a remote node's agent
        fills its own). None while they are still being cached after *wait_s* seconds.

        Raises:
            DatasetsUnavailable: no dataset store.
            BackendError: a dataset cannot be cached there (reason ``dataset_cache``).
        """
        if not row.datasets:
            return []
        svc = self.datasets
        if svc is None:
            raise DatasetsUnavailable("this server has no dataset store; run without -d")
        assert row.placement_id is not None
        try:
            out, todo = await svc.run(svc.prepare_mounts, Caller(row.user_name), row.placement_id)
        except APIError as e:
            raise BackendError(e.message, reason="dataset_cache") from e
        futures = await svc.ensure_filling(todo) if todo else []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while out.state == "preparing" and not stop.is_set():
            left = deadline - loop.time()
            if left <= 0:
                return None
            if futures:
                await asyncio.wait(futures, timeout=left)
                futures = []
            else:
                await asyncio.sleep(min(left, 0.2))
            out = await svc.run(svc.mounts_state, row.placement_id)
        if out.state == "failed":
            raise BackendError(
                f"the datasets cannot be cached on {out.node}: {out.message}",
                reason="dataset_cache",
            )
        if out.state != "ready":
            return None
        return [Mount(str(m.host_path), m.container_path, read_only=True) for m in out.mounts]

    async def _start_container(
        self,
        row: TrainingSession,
        backend: ExecutionBackend,
        labels: dict[str, str],
        data_mounts: list[Mount],
    ) -> tuple[str, int]:
        assert row.node is not None
        folder = self.session_dir(row.id)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        work = folder / "work"
        await asyncio.to_thread(self.store.materialize_code, row.code_digest, work)
        token, token_hash = mint_token(row.id)
        with self.db.session() as s:
            s.execute(
                cast(Table, TrainingSession.__table__)
                .update()
                .where(TrainingSession.id == row.id)
                .values(token_hash=token_hash)
            )
        res = row.resources
        gpu_ids = [str(g) for g in row.gpu_ids]
        # On this server's own node the code folder is bind-mounted; a remote node's engine
        # cannot see it, so there it is copied in over the engine's API (~50 ms more).
        code = [Mount(str(work), CODE_MOUNT, read_only=False)]
        local = self.backends.is_local(row.node)
        python = sys.executable if backend.kind == "local" else "python"
        command = session_command(row.entry, list(row.args))
        if command[0] == "python":
            command[0] = python
        spec = RunSpec(
            name=f"{self.settings.container_prefix}-{row.id}-{row.attempt}",
            image=row.image,
            command=command,
            env=session_env(
                name=row.name,
                session_id=row.id,
                api_url=self.settings.api_url,
                token=token,
                datasets=list(row.datasets),
                node=row.node,
                gpu_ids=gpu_ids,
                load_from=row.load_from,
                attempt=row.attempt,
            ),
            workdir=CODE_MOUNT,
            mounts=[*code, *data_mounts] if local else data_mounts,
            copies=[] if local else code,
            gpu_ids=gpu_ids,
            cpu_limit=res.get("cpu_milli", 0) / 1000 if res.get("cpu_milli") else None,
            mem_limit_bytes=res["memory_mib"] * MIB if res.get("memory_mib") else None,
            labels=labels,
        )
        header = (
            f"[nsml] {row.name} attempt {row.attempt} on {row.node}"
            + (f", GPUs {','.join(gpu_ids)}" if gpu_ids else "")
            + f", image {row.image}"
            + (f", loading {row.load_from}" if row.load_from else "")
            + "\n"
        )
        with self.log_path(row.id).open("ab") as f:
            f.write(header.encode())
        log_base = self._log_size(row.id)
        try:
            handle = await backend.start(spec)
        except NameConflict:
            found = await backend.list(labels)
            if not found:
                raise
            handle = found[0]
        log.info("%s: container %s started on %s", row.name, handle[:12], row.node)
        return handle, log_base

    def _mark_running(self, row: TrainingSession, handle: str, log_base: int) -> bool:
        with self.db.session() as s:
            moved = transition(
                s,
                row.id,
                ["preparing"],
                "running",
                handle=handle,
                log_base=log_base,
                started=self.now(),
            )
            if moved:
                add_event(s, row, "state", f"running on {row.node}", self.now(), state="running")
        return moved

    async def _running(self, row: TrainingSession) -> None:
        assert row.node is not None and row.handle is not None
        stop = self._stop_event(row.id)
        path = self.log_path(row.id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        stop_sent = False
        while True:
            if not self._current(row):
                return  # requeued or ended meanwhile: the next step reads it again
            try:
                backend = self.backends.for_node(row.node)
            except BackendError as e:
                if await self._unanswered_engine(row, e.message):
                    return
                continue
            skip = max(0, self._log_size(row.id) - row.log_base)
            pump = asyncio.create_task(backend.copy_logs(row.handle, path, skip))
            waiter = asyncio.create_task(stop.wait())
            try:
                while True:
                    done, _ = await asyncio.wait(
                        {pump, waiter},
                        timeout=self.settings.engine_check_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if done or self._verdict(row.node) is not Verdict.ALIVE:
                        break  # ended, stop asked, or a quiet stream on a silent node: ask
                if waiter.done() and not pump.done() and not stop_sent:
                    stop_sent = True
                    log.info(
                        "%s: stopping (SIGTERM, %gs grace, then SIGKILL)",
                        row.name,
                        self.settings.stop_grace_s,
                    )
                    try:
                        await backend.stop(row.handle, grace_s=self.settings.stop_grace_s)
                        await asyncio.wait({pump}, timeout=30)
                    except BackendError as e:
                        log.warning("%s: could not stop: %s", row.name, e.message)
            finally:
                # Never leave a pump behind (cancelled while following: another server may
                # follow this container next, and two pumps would write the log twice).
                waiter.cancel()
                if not pump.done():
                    pump.cancel()
                    await asyncio.gather(pump, return_exceptions=True)
            if not pump.cancelled() and pump.exception() is not None:
                if not isinstance(pump.exception(), RunNotFound | BackendError):
                    log.warning("%s: following the output failed: %s", row.name, pump.exception())
            try:
                st = await asyncio.wait_for(
                    backend.status(row.handle), self.settings.engine_check_s * 4
                )
            except (BackendError, TimeoutError) as e:
                why = getattr(e, "message", "") or "no answer in time"
                if await self._unanswered_engine(row, why):
                    return
                continue
            self._answered(row)
            if st.state is RunState.MISSING:
                await self._lose(
                    row,
                    f"its container on {row.node} vanished (removed outside the platform, or "
                    "its node's engine lost it)",
                    fence_node=False,
                )
                return
            if st.state is RunState.EXITED:
                break
            # Still running: the output stream broke (engine restart, network); go on.
            await asyncio.sleep(1.0)
        with self.db.session() as s:
            fresh = s.get(TrainingSession, row.id)
            stop_requested = bool(fresh and fresh.stop_requested) or stop_sent or stop.is_set()
        outcome = classify_exit(
            exit_code=st.exit_code,
            oom_killed=st.oom_killed,
            stop_requested=stop_requested,
            memory_mib=int(row.resources.get("memory_mib", 0)),
            error=st.error,
            log_tail=self._log_tail(row.id),
        )
        await self._finish(
            row,
            outcome.state,
            outcome.reason,
            outcome.message,
            st.exit_code,
            finished=st.finished_at,
        )
        if not self.settings.keep_containers:
            try:
                await backend.remove(row.handle)
            except BackendError as e:
                log.warning("%s: could not remove container %s: %s", row.name, row.handle[:12], e)

    # ---- node loss -------------------------------------------------------------------------

    def _current(self, row: TrainingSession) -> bool:
        """Whether the session is still live at the attempt this step drives."""
        with self.db.session() as s:
            fresh = s.get(TrainingSession, row.id)
            return (
                fresh is not None
                and fresh.state in SESSION_ACTIVE_STATES
                and fresh.attempt == row.attempt
            )

    def _verdict(self, node: str) -> Verdict:
        with self.db.session() as s:
            hb = s.scalar(select(Node.last_heartbeat).where(Node.name == node))
        return node_verdict(
            hb, self.now(), self.settings.node_timeout_s, self.settings.node_lost_grace_s
        )

    async def _unanswered_engine(self, row: TrainingSession, error: str) -> bool:
        """The session's node's engine did not answer: give the session up when the node is
        gone, else wait a little. True when this step is over (given up, or moved on)."""
        assert row.node is not None
        verdict = self._verdict(row.node)
        if verdict is Verdict.GONE:
            silent = self.settings.node_timeout_s + self.settings.node_lost_grace_s
            self._unanswered.discard(row.id)
            await self._lose(
                row,
                f"node {row.node} lost (no heartbeat for {silent:g}s or more, and its engine "
                f"does not answer: {error})",
                fence_node=True,
            )
            return True
        if row.id not in self._unanswered:
            self._unanswered.add(row.id)
            limit = self.settings.node_timeout_s + self.settings.node_lost_grace_s
            log.warning("%s: the engine of node %s does not answer: %s", row.name, row.node, error)
            with self.db.session() as s:
                add_event(
                    s,
                    row,
                    "notice",
                    f"node {row.node} does not answer ({error}); waiting for it: the session "
                    f"is lost if the node stays silent for {limit:g}s",
                    self.now(),
                )
        await asyncio.sleep(self.settings.unreachable_retry_s)
        return not self._current(row)

    def _answered(self, row: TrainingSession) -> None:
        """The session's engine answers again after it did not: say so in its events."""
        if row.id in self._unanswered:
            self._unanswered.discard(row.id)
            log.info("%s: the engine of node %s answers again", row.name, row.node)
            with self.db.session() as s:
                add_event(s, row, "notice", f"node {row.node} answers again", self.now())

    async def _lose(self, row: TrainingSession, cause: str, *, fence_node: bool) -> None:
        """The session's run is lost: requeue it (``restart_on_lost``) or end it ``lost``.

        *fence_node*: the run may still be alive on a silent node, so the node takes no new
        work until the orphan sweep removed it (:mod:`nsml_server.node_loss`).
        """
        with self.db.session() as s:
            fresh = s.get(TrainingSession, row.id)
            if (
                fresh is None
                or fresh.state not in ("preparing", "running")
                or fresh.attempt != row.attempt
            ):
                return
            node = s.scalar(select(Node).where(Node.name == row.node)) if row.node else None
            if fence_node and node is not None:
                fence(s, node.id)
            stop_requested = fresh.stop_requested
            saved = checkpoints(s, row.id)
            last = max(saved, key=lambda c: (c.created, c.id)).name if saved else None
            plan = plan_lost_session(
                name=row.name,
                cause=cause,
                restart_on_lost=fresh.restart_on_lost and not stop_requested,
                attempt=fresh.attempt,
                max_attempts=self.settings.lost_max_attempts,
                last_checkpoint=last,
                load_from=fresh.load_from,
            )
            moved = False
            if plan.requeue:
                moved = transition(
                    s,
                    row.id,
                    ("preparing", "running"),
                    "queued",
                    at_attempt=row.attempt,
                    attempt=plan.attempt,
                    load_from=plan.load_from,
                    placement_id=None,
                    node=None,
                    gpu_ids=[],
                    handle=None,
                    started=None,
                    token_hash=None,
                    exit_code=None,
                    reason=None,
                    message=None,
                )
                if moved:
                    p = s.get(PlacementRequestRow, fresh.placement_id or -1)
                    if p is not None:
                        self.scheduler.release(s, p)
                    add_event(s, row, "state", plan.event, self.now(), state="queued")
        if plan.requeue:
            if moved:
                log.warning("%s: %s", row.name, plan.event)
                with self.log_path(row.id).open("ab") as f:
                    f.write(f"[nsml] {plan.event}\n".encode())
            return
        if stop_requested:
            await self._finish(
                row,
                "stopped",
                "stopped",
                f"Stopped on request; {cause}: its container is removed when the node answers "
                "again.",
                None,
            )
            return
        await self._finish(row, "lost", "node_lost" if fence_node else "lost", plan.message, None)

    async def sweep(self, node: str) -> int:
        """Remove the orphan containers of this deployment from *node*'s engine, then let
        the node take new work again; the number removed. An engine that does not answer
        leaves the node fenced (the next tick tries again)."""
        try:
            backend = self.backends.for_node(node)
            found = await backend.labelled({LABEL_SERVER: self.settings.server_label})
        except BackendError as e:
            log.info("node %s: orphan sweep waits for its engine: %s", node, e.message)
            await asyncio.sleep(self.settings.unreachable_retry_s)
            return 0
        sids = {
            int(v) for v in (x.get(LABEL_SESSION_ID, "") for x in found.values()) if v.isdigit()
        }
        aids = {
            int(v)
            for v in (x.get("org.jupyter-nsml.allocation", "") for x in found.values())
            if v.isdigit()
        }
        with self.db.session() as s:
            views = session_views(s, sids)
            allocs = active_allocations(s, aids)
        removed = 0
        for cid, labels in found.items():
            why = orphan_reason(labels, cid, node, views, allocs)
            if why is None:
                continue
            try:
                await backend.remove(cid)
            except BackendError as e:
                log.warning("node %s: could not remove orphan %s: %s", node, cid[:12], e.message)
                return removed
            removed += 1
            log.warning("node %s: removed orphan container %s (%s)", node, cid[:12], why)
        with self.db.session() as s:
            s.execute(
                cast(Table, Node.__table__)
                .update()
                .where(Node.name == node, Node.state != "down")
                .values(needs_sweep=False)
            )
        log.info(
            "node %s: orphan sweep removed %d containers; it takes new work again", node, removed
        )
        return removed

    def _log_tail(self, sid: int) -> str:
        try:
            with self.log_path(sid).open("rb") as f:
                size = f.seek(0, 2)
                f.seek(max(0, size - LOG_TAIL_BYTES))
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    async def _finish(
        self,
        row: TrainingSession,
        state: str,
        reason: str,
        message: str,
        exit_code: int | None,
        finished: datetime | None = None,
    ) -> None:
        """End the session: record, release its placement, revoke its token, tell the user.

        *finished* is when the run ended as its engine saw it (aware), if known: a session
        that ended while no server followed it (a restart) keeps its true end time, not the
        time the new leader noticed.
        """
        now = self.now()
        end = now
        if finished is not None:
            end = min(now, finished.astimezone(UTC).replace(tzinfo=None))
            if row.started is not None:
                end = max(end, row.started)
        with self.db.session() as s:
            if state == "stopped":
                # Billing asked for this stop (reason "credits" set with the request).
                marked = s.scalar(
                    select(TrainingSession.reason).where(TrainingSession.id == row.id)
                )
                if marked == "credits":
                    reason = "credits"
                    message = f"Stopped: the credits ran out. {message}"
            moved = transition(
                s,
                row.id,
                SESSION_ACTIVE_STATES,
                state,
                at_attempt=row.attempt,
                reason=reason,
                message=message,
                exit_code=exit_code,
                finished=end,
                token_hash=None,
            )
            if not moved:
                return
            fresh = s.get(TrainingSession, row.id)
            pid = fresh.placement_id if fresh else row.placement_id
            if pid is not None:
                p = s.get(PlacementRequestRow, pid)
                if p is not None:
                    self.scheduler.release(s, p)
            add_event(
                s,
                row,
                "failure" if state in FAILURE_STATES else "state",
                message,
                now,
                state=state,
            )
        line = f"[nsml] {row.name} ended {state}" + (
            f" (exit code {exit_code})" if exit_code is not None else ""
        )
        # A completion's message only repeats the state and exit code; others explain.
        line += "." if state == "completed" else f": {message}"
        path = self.log_path(row.id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with path.open("ab") as f:
            f.write(f"{line}\n".encode())
        log.info("%s: %s (%s)", row.name, state, message)
        await asyncio.to_thread(shutil.rmtree, self.session_dir(row.id) / "work", True)
        if state in FAILURE_STATES and self.notify is not None:
            tail = self._log_tail(row.id)[-8000:]
            asyncio.get_running_loop().run_in_executor(
                None, self.notify, row.user_name, row.name, state, message, tail
            )

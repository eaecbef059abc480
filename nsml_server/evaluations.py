"""Evaluations of leaderboard submissions: placed, run without network, scored apart.

A submission names a session's checkpoint. Its evaluation is a run of a kind, driven here by
the leading server as sessions are by :mod:`nsml_server.session_runner`:

1. **queued**: a placement request through the same scheduler (GPUs, CPU and memory as the
   session had, or the GPUs the dataset's owner set);
2. **running**: on the chosen node, a container of the session's image with its code, the
   checkpoint and the hidden split's test *inputs* only (never its labels), with
   ``network_mode="none"``; the program is the session's own entry point with its arguments,
   in the SDK's evaluation mode (``NSML_EVALUATION=1``): ``nsml.bind`` loads the checkpoint,
   calls ``infer`` on the inputs, writes ``id,prediction`` rows and ends;
3. **scored** or **failed**: this server copies the predictions file out of the container and
   scores it against the labels, which it reads from the dataset store itself: no user code
   ever runs where the labels are. A crash, a time-out, a missing ``infer`` or predictions
   that cannot be scored end ``failed`` with one line saying why (and the last lines of the
   program's output for a crash).

With the metric ``custom`` the owner's scoring script does the comparison, in a container of
its own on the server's node (the platform's image, no network), given only the predictions
and one part's labels; it prints the score on its last line, and its output is never shown.

Billing asks for a stop (``stop_reason``) when the user's credits run out: the runner sends
SIGTERM, waits ``stop_grace_s``, and ends the evaluation ``stopped`` (a queued one at once).

Whatever happens, the placement is released, the container removed and the evaluation's
folder deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, select, update

from nsml._checkpoint import ArchiveError, extract
from nsml.sdk import EXIT_NO_INFER

from .artifacts import ArtifactStore
from .backends import BackendError, ExecutionBackend, Mount, RunSpec, RunState
from .db import Database
from .models import Dataset, PlacementRequestRow, Submission
from .node_loss import LABEL_ALLOCATION
from .scoring import ScoringError, check_coverage, parse_score, score_parts
from .session_runner import BackendPool
from .sessions import CODE_MOUNT, session_command

log = logging.getLogger("nsml.evaluations")

__all__ = [
    "CHECKPOINT_MOUNT",
    "INPUTS_MOUNT",
    "LABELS_FILE",
    "PREDICTIONS_PATH",
    "PRIVATE_LABELS_FILE",
    "EvaluationRunner",
    "EvaluationSettings",
    "failure_reason",
]

#: Where an evaluation finds the checkpoint, the test inputs, and writes its predictions.
CHECKPOINT_MOUNT = "/nsml/checkpoint"
INPUTS_MOUNT = "/data/test"
PREDICTIONS_PATH = "/tmp/nsml-predictions.csv"
#: The hidden split's layout: ``inputs/…``, ``labels.csv``, optionally ``private-labels.csv``.
INPUTS_DIR = "inputs/"
LABELS_FILE = "labels.csv"
PRIVATE_LABELS_FILE = "private-labels.csv"

LABEL_SUBMISSION = "org.jupyter-nsml.submission"
LABEL_SERVER = "org.jupyter-nsml.server"
ACTIVE = ("queued", "running")
#: The most bytes of predictions (and of one labels file) read.
MAX_PREDICTION_BYTES = 256 * 1024 * 1024
NO_INFER = (
    "the program ended without predictions: call nsml.bind(load=..., infer=...) before "
    "training starts (the evaluation runs your entry point up to that call)"
)
#: What a ``stop_reason`` means, for a person.
STOP_REASONS = {
    "credits": "its user's credits ran out (ask an admin for credits, then submit again)",
}
#: Lines of a failed program's output shown with its reason.
TAIL_LINES = 8


@dataclass(frozen=True)
class EvaluationSettings:
    """How evaluations run: container names, the deployment's label, polling."""

    container_prefix: str = "nsml-session"
    server_label: str = ""
    poll_s: float = 1.0
    stop_grace_s: float = 5.0
    keep_containers: bool = False
    #: The image a dataset's custom scoring script runs in (the platform's own).
    scorer_image: str = "jupyter-nsml/singleuser:latest"
    scorer_timeout_s: float = 300.0


def failure_reason(exit_code: int | None, oom: bool, output: str) -> str:
    """One line saying why the evaluation program failed, then its last lines of output."""
    lines = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith("[nsml]")]
    if oom:
        head = "the evaluation ran out of memory"
    else:
        last = lines[-1].strip() if lines else ""
        head = f"infer failed (exit code {exit_code})" + (f": {last}" if last else "")
    tail = "\n".join(lines[-TAIL_LINES:])
    return head + (f"\n{tail}" if tail else "")


class EvaluationRunner:
    """Drives every queued and running evaluation while this server leads."""

    def __init__(
        self,
        db: Database,
        scheduler: Any,
        is_leader: Callable[[], bool],
        backends: BackendPool,
        artifacts: ArtifactStore,
        dataset_store: Any,
        work_dir: Path,
        settings: EvaluationSettings,
        now: Callable[[], datetime],
    ) -> None:
        self.db = db
        self.scheduler = scheduler
        self.is_leader = is_leader
        self.backends = backends
        self.artifacts = artifacts
        self.dataset_store = dataset_store
        self.work_dir = work_dir
        self.settings = settings
        self.now = now
        self._live: dict[int, asyncio.Task[None]] = {}
        self._wake: asyncio.Event | None = None
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def wake(self) -> None:
        """Look at the submissions now (a new one)."""
        if self._wake is not None:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until *stop* is set (running evaluations are followed again by the next
        leader, which finds their containers by label)."""
        self._wake = asyncio.Event()
        try:
            while not stop.is_set():
                try:
                    if self.is_leader():
                        self.tick()
                    elif self._live:
                        await self._drop_all()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("evaluation runner tick failed; retrying")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)
        finally:
            await self._drop_all()

    async def _drop_all(self) -> None:
        for t in self._live.values():
            t.cancel()
        await asyncio.gather(*self._live.values(), return_exceptions=True)
        self._live.clear()

    def tick(self) -> None:
        """Start a task for every active submission without one."""
        for sid in [k for k, t in self._live.items() if t.done()]:
            task = self._live.pop(sid)
            if not task.cancelled() and task.exception() is not None:
                log.error("submission %d: %s", sid, task.exception())
        with self.db.session() as s:
            ids = s.scalars(select(Submission.id).where(Submission.state.in_(ACTIVE))).all()
        for sid in ids:
            if sid not in self._live:
                self._live[sid] = asyncio.create_task(self._drive(sid), name=f"evaluation-{sid}")

    # ---- one submission ----------------------------------------------------------------------

    def _load(self, sid: int) -> Submission | None:
        with self.db.session() as s:
            row = s.get(Submission, sid)
            if row is not None:
                s.expunge(row)
            return row

    def _update(self, sid: int, states: tuple[str, ...], **values: Any) -> bool:
        with self.db.session() as s:
            result = s.execute(
                update(cast(Table, Submission.__table__))
                .where(Submission.id == sid, Submission.state.in_(states))
                .values(**values)
            )
            return bool(getattr(result, "rowcount", 0))

    async def _drive(self, sid: int) -> None:
        failures = 0
        while True:
            row = self._load(sid)
            if row is None or row.state not in ACTIVE:
                return
            try:
                if row.stop_reason is not None:
                    await self._stop(row)
                    return
                if row.state == "queued":
                    await self._queued(row)
                elif row.handle is None:
                    await self._start(row)
                else:
                    await self._follow(row)
                failures = 0
            except asyncio.CancelledError:
                raise
            except BackendError as e:
                failures += 1
                if failures >= 5 or e.reason not in ("engine_unavailable", "backend"):
                    await self._finish(row, "failed", f"the evaluation could not run: {e.message}")
                    return
                await asyncio.sleep(min(30.0, 0.5 * 2**failures))
            except Exception as e:
                log.exception("submission %d: step failed", sid)
                failures += 1
                if failures >= 5:
                    await self._finish(row, "failed", f"the platform could not evaluate it ({e})")
                    return
                await asyncio.sleep(min(30.0, 0.5 * 2**failures))

    def _labels(self, row: Submission) -> dict[str, str]:
        return {
            LABEL_SUBMISSION: str(row.id),
            LABEL_SERVER: self.settings.server_label,
        }

    async def _queued(self, row: Submission) -> None:
        if row.placement_id is None:
            spec = {k: v for k, v in row.resources.items() if k not in ("gpus", "datasets")}
            with self.db.session() as s:
                p = self.scheduler.submit(
                    s,
                    user=row.user_name,
                    holder=f"{row.user_name}:evaluation/{row.id}",
                    spec=spec,
                    priority=0,
                )
                pid = p.id
                s.execute(
                    update(cast(Table, Submission.__table__))
                    .where(Submission.id == row.id)
                    .values(placement_id=pid)
                )
            row.placement_id = pid
        await self.scheduler.wait_decided(row.placement_id, 5.0)
        from .models import Allocation, Node

        with self.db.session() as s:
            p = s.get(PlacementRequestRow, row.placement_id)
            if p is None:
                return
            state, message = p.state, p.message
            alloc = s.get(Allocation, p.allocation_id) if p.allocation_id else None
            node = s.get(Node, alloc.node_id) if alloc is not None else None
            node_name = node.name if node is not None else None
            gpus = [str(i) for i in alloc.gpu_indices] if alloc is not None else []
        if state == "placed" and node_name is not None:
            self._update(
                row.id,
                ("queued",),
                state="running",
                node=node_name,
                gpu_ids=gpus,
                started=self.now(),
            )
            log.info("submission %d: placed on %s", row.id, node_name)
        elif state == "failed":
            await self._finish(row, "failed", f"it can never be placed: {message}")
        elif state in ("cancelled", "released"):
            await self._finish(row, "failed", "its placement request was cancelled")

    def folder(self, sid: int) -> Path:
        return self.work_dir / str(sid)

    def _prepare(self, row: Submission) -> Path:
        """The evaluation's folder: code, the checkpoint unpacked, the test inputs only."""
        folder = self.folder(row.id)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, mode=0o700)
        self.artifacts.materialize_code(row.code_digest, folder / "code")
        with self.artifacts.open(row.checkpoint_sha256) as f:
            try:
                extract(f, folder / "checkpoint")
            except ArchiveError as e:
                raise BackendError(f"checkpoint {row.checkpoint} is damaged: {e}") from e
        manifest = self.dataset_store.load_manifest(row.test_digest)
        inputs = type(manifest)(
            dataclasses.replace(e, path=e.path[len(INPUTS_DIR) :])
            for e in manifest
            if e.path.startswith(INPUTS_DIR)
        )
        self.dataset_store.materialize(inputs, folder / "inputs", mode="hardlink", readonly=True)
        # The container's user may not be this server's: it may read everything, write
        # nothing. (The inputs are links to the store's read-only blobs: left as they are.)
        for path in (folder, *folder.rglob("*")):
            if path.is_symlink():
                continue
            if path.is_dir():
                path.chmod(0o755)
            elif path.parts[len(folder.parts)] in ("code", "checkpoint"):
                path.chmod((path.stat().st_mode | 0o444) & ~0o222)
        return folder

    async def _start(self, row: Submission) -> None:
        assert row.node is not None
        backend = self.backends.for_node(row.node)
        labels = self._labels(row)
        with self.db.session() as s:
            p = s.get(PlacementRequestRow, row.placement_id) if row.placement_id else None
            if p is not None and p.allocation_id is not None:
                # A node that returns after it was lost sweeps the containers of released
                # allocations (node_loss.orphan_reason): this evaluation's among them.
                labels[LABEL_ALLOCATION] = str(p.allocation_id)
        found = await backend.list(labels)
        if found:
            self._update(row.id, ("running",), handle=found[0])
            return
        folder = await asyncio.to_thread(self._prepare, row)
        local = self.backends.is_local(row.node)
        placed = [
            Mount(str(folder / "code"), CODE_MOUNT, read_only=True),
            Mount(str(folder / "checkpoint"), CHECKPOINT_MOUNT, read_only=True),
            Mount(str(folder / "inputs"), INPUTS_MOUNT, read_only=True),
        ]
        res = row.resources
        command = session_command(row.entry, [str(a) for a in row.args])
        if command[0] == "python":
            command[0] = sys.executable if backend.kind == "local" else "python"
        spec = RunSpec(
            name=f"{self.settings.container_prefix}-eval-{row.id}",
            image=row.image,
            command=command,
            env={
                "NSML_EVALUATION": "1",
                "NSML_SUBMISSION": str(row.id),
                "NSML_CHECKPOINT": CHECKPOINT_MOUNT,
                "NSML_TEST_PATH": INPUTS_MOUNT,
                "NSML_DATASET_PATH": INPUTS_MOUNT,
                "NSML_PREDICTIONS": PREDICTIONS_PATH,
                "PYTHONDONTWRITEBYTECODE": "1",
            },
            workdir=CODE_MOUNT,
            mounts=placed if local else [],
            copies=[] if local else placed,
            gpu_ids=[str(g) for g in row.gpu_ids],
            cpu_limit=res.get("cpu_milli", 0) / 1000 if res.get("cpu_milli") else None,
            mem_limit_bytes=res["memory_mib"] * 1024 * 1024 if res.get("memory_mib") else None,
            labels=labels,
            network="none",
        )
        handle = await backend.start(spec)
        if not self._update(row.id, ("running",), handle=handle):
            await backend.remove(handle)
        log.info("submission %d: container %s on %s", row.id, handle[:12], row.node)

    async def _follow(self, row: Submission) -> None:
        assert row.node is not None and row.handle is not None
        backend = self.backends.for_node(row.node)
        with self.db.session() as s:
            ds = s.get(Dataset, row.dataset_id)
            timeout = ds.eval_timeout_s if ds is not None else 3600
        started = row.started or self.now()
        left = (started + timedelta(seconds=timeout) - self.now()).total_seconds()
        st = await backend.wait(row.handle, timeout_s=max(0.0, min(left, 5.0)), poll_s=0.2)
        if st.state in (RunState.CREATED, RunState.RUNNING):
            if left > 5.0:
                return  # the next step looks again
            await backend.stop(row.handle, grace_s=self.settings.stop_grace_s)
            await self._finish(
                row,
                "failed",
                f"the evaluation took longer than the dataset's limit of {timeout} s",
                backend,
            )
            return
        if st.state is RunState.MISSING:
            await self._finish(row, "failed", "the evaluation's container vanished", backend)
            return
        if st.exit_code == EXIT_NO_INFER and not st.oom_killed:
            await self._finish(row, "failed", NO_INFER, backend)
            return
        if st.exit_code != 0 or st.oom_killed:
            output = await backend.logs(row.handle, tail=200)
            await self._finish(
                row, "failed", failure_reason(st.exit_code, st.oom_killed, output), backend
            )
            return
        data = await backend.read_file(row.handle, PREDICTIONS_PATH, MAX_PREDICTION_BYTES)
        if data is None:
            await self._finish(row, "failed", NO_INFER, backend)
            return
        try:
            public, private = await self._score_any(row, data)
        except ScoringError as e:
            await self._finish(row, "failed", f"the predictions cannot be scored: {e}", backend)
            return
        await self._finish(row, "scored", None, backend, public=public, private=private)

    def _read_split_file(self, row: Submission, name: str) -> str | None:
        manifest = self.dataset_store.load_manifest(row.test_digest)
        for e in manifest:
            if e.path == name:
                if e.size > MAX_PREDICTION_BYTES:
                    raise ScoringError(f"the dataset's {name} is too large to score")
                with self.dataset_store.open(e.blake3) as f:
                    return cast(bytes, f.read()).decode("utf-8", errors="replace")
        return None

    async def _score_any(self, row: Submission, data: bytes) -> tuple[float, float | None]:
        with self.db.session() as s:
            ds = s.get(Dataset, row.dataset_id)
            metric, scorer = (ds.metric, ds.scorer) if ds is not None else (None, None)
        if metric == "custom":
            if not scorer:
                raise ScoringError("the dataset has no scoring script any more")
            return await self._score_custom(row, data, scorer)
        return await asyncio.to_thread(self._score, row, data)

    async def _score_custom(
        self, row: Submission, data: bytes, scorer: str
    ) -> tuple[float, float | None]:
        """Run the owner's script in a container of its own: no network, only the
        predictions, one part's labels and the script, on the server's own node."""
        backend = self.backends.local_backend
        if backend is None or backend.kind != "docker":
            raise ScoringError(
                "a custom scoring script needs a Docker engine on the NSML server's node"
            )
        labels = self._read_split_file(row, LABELS_FILE)
        if labels is None:
            raise ScoringError(f"the dataset's hidden split has no {LABELS_FILE}")
        private = self._read_split_file(row, PRIVATE_LABELS_FILE)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScoringError("the predictions file is not UTF-8 text") from None
        check_coverage(text, labels, private)
        scores: list[float] = []
        for part, content in (("public", labels), ("private", private)):
            if content is None:
                continue
            folder = self.folder(row.id) / f"score-{part}"
            await asyncio.to_thread(self._write_score_folder, folder, data, content, scorer)
            spec = RunSpec(
                name=f"{self.settings.container_prefix}-score-{row.id}-{part}",
                image=self.settings.scorer_image,
                command=[
                    "python",
                    "-I",
                    "/nsml/score/score.py",
                    "/nsml/score/predictions.csv",
                    "/nsml/score/labels.csv",
                ],
                workdir="/nsml/score",
                mounts=[Mount(str(folder), "/nsml/score", read_only=True)],
                cpu_limit=1.0,
                mem_limit_bytes=2 * 1024**3,
                labels={**self._labels(row), "org.jupyter-nsml.scorer": part},
                network="none",
            )
            handle = await backend.start(spec)
            try:
                st = await backend.wait(handle, timeout_s=self.settings.scorer_timeout_s)
                if st.state is not RunState.EXITED:
                    raise ScoringError("the dataset's scoring script did not finish in time")
                if st.exit_code != 0:
                    # Its output is not shown: it read the labels.
                    raise ScoringError(
                        f"the dataset's scoring script failed (exit code {st.exit_code}); "
                        "its owner must fix it"
                    )
                scores.append(parse_score(await backend.logs(handle)))
            finally:
                with contextlib.suppress(BackendError):
                    await backend.remove(handle)
        return scores[0], scores[1] if len(scores) > 1 else None

    @staticmethod
    def _write_score_folder(folder: Path, predictions: bytes, labels: str, scorer: str) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "predictions.csv").write_bytes(predictions)
        (folder / "labels.csv").write_text(labels, encoding="utf-8")
        (folder / "score.py").write_text(scorer, encoding="utf-8")
        folder.chmod(0o755)
        for f in folder.iterdir():
            f.chmod(0o444)

    def _score(self, row: Submission, data: bytes) -> tuple[float, float | None]:
        with self.db.session() as s:
            ds = s.get(Dataset, row.dataset_id)
            metric = ds.metric if ds is not None else None
        if not metric:
            raise ScoringError("the dataset has no metric any more")
        labels = self._read_split_file(row, LABELS_FILE)
        if labels is None:
            raise ScoringError(f"the dataset's hidden split has no {LABELS_FILE}")
        private = self._read_split_file(row, PRIVATE_LABELS_FILE)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ScoringError("the predictions file is not UTF-8 text") from None
        return score_parts(metric, text, labels, private)

    async def _stop(self, row: Submission) -> None:
        """Stop an evaluation asked to stop (``stop_reason``): SIGTERM, the stop grace, then
        SIGKILL for a running one; end it ``stopped``, its placement released."""
        backend = self.backends.for_node(row.node) if row.node and row.handle else None
        if backend is not None and row.handle is not None:
            with contextlib.suppress(BackendError):
                await backend.stop(row.handle, grace_s=self.settings.stop_grace_s)
        why = STOP_REASONS.get(row.stop_reason or "", f"asked to stop ({row.stop_reason})")
        await self._finish(row, "stopped", f"stopped: {why}", backend)

    async def _finish(
        self,
        row: Submission,
        state: str,
        message: str | None,
        backend: ExecutionBackend | None = None,
        *,
        public: float | None = None,
        private: float | None = None,
    ) -> None:
        moved = self._update(
            row.id,
            ACTIVE,
            state=state,
            message=message,
            public_score=public,
            private_score=private,
            finished=self.now(),
        )
        with self.db.session() as s:
            fresh = s.get(Submission, row.id)
            pid = fresh.placement_id if fresh is not None else row.placement_id
            if pid is not None:
                p = s.get(PlacementRequestRow, pid)
                if p is not None:
                    self.scheduler.release(s, p)
        if backend is not None and row.handle is not None and not self.settings.keep_containers:
            with contextlib.suppress(BackendError):
                await backend.remove(row.handle)
        await asyncio.to_thread(shutil.rmtree, self.folder(row.id), True)
        if moved:
            log.info(
                "submission %d (%s): %s%s",
                row.id,
                row.session_name,
                state,
                f" {public}" if state == "scored" else f": {(message or '').splitlines()[0]}",
            )

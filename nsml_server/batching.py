"""Group commit of frequent small requests, off the event loop.

A thousand node agents send a heartbeat every 10 s and ask for their dataset holds every
second: ~100 writes and ~1,000 reads a second. One transaction each, run on the event loop (a
heartbeat) or one thread hop and transaction each (a holds poll), their database round trips
held up everything else the server does (placements waited seconds, bench/cluster_scale.py).
:class:`Batcher` gives every caller its own answer but does the work of everything that
arrived while the previous batch was running in one call, in one worker thread; under load a
batch holds many requests, an idle server runs a lone request at once.

:class:`HeartbeatQueue` and :func:`holds_batcher` are the two users.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from . import nodes
from .db import Database
from .models import Node
from .schemas import Heartbeat, NodeOut

log = logging.getLogger("nsml_server.batching")

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs ``work(items) -> results`` (one result per item, in order) on batches of items.

    A batch that raises is run again one item at a time, so one bad item fails alone (its
    caller gets the exception).
    """

    def __init__(
        self, work: Callable[[list[T]], Sequence[R]], *, name: str, max_batch: int = 256
    ) -> None:
        self.work = work
        self.name = name
        self.max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._draining = False
        self._task: asyncio.Future[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"nsml-{name}")

    async def submit(self, item: T) -> R:
        """Queue *item*; its result once the batch holding it ran."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if not self._draining:
            self._draining = True
            self._task = asyncio.ensure_future(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                items = [b[0] for b in batch]
                results: list[Any]
                try:
                    results = list(await loop.run_in_executor(self._executor, self.work, items))
                except Exception as e:
                    if len(items) == 1:
                        results = [e]
                    else:
                        log.warning(
                            "%s: a batch of %d failed (%s); one by one", self.name, len(items), e
                        )
                        results = []
                        for item in items:
                            try:
                                results += await loop.run_in_executor(
                                    self._executor, self.work, [item]
                                )
                            except Exception as e1:
                                results.append(e1)
                for (_, fut), r in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(r, Exception):
                        fut.set_exception(r)
                    else:
                        fut.set_result(r)
        finally:
            self._draining = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class HeartbeatQueue(Batcher[tuple[str, Heartbeat], NodeOut]):
    """Heartbeats applied (:func:`nodes.apply_heartbeat`) many per transaction.

    Each caller gets its node's view as of its batch's commit.
    """

    def __init__(
        self,
        db: Database,
        now: Callable[[], datetime],
        max_batch: int = 256,
        gpu_use: Any = None,
    ) -> None:
        self.db = db
        self.now = now
        self.gpu_use = gpu_use  # gpu_use.GpuUseMonitor: samples sessions' GPU use
        super().__init__(self._apply, name="heartbeats", max_batch=max_batch)

    def _apply(self, items: list[tuple[str, Heartbeat]]) -> list[NodeOut]:
        now = self.now()
        with self.db.session() as s:
            # The batch's nodes and GPUs in one query: each apply then finds them loaded, and
            # their changes go to the database together at the end (no flush per node).
            names = {name for name, _ in items}
            known = {
                n.name: n
                for n in s.scalars(
                    select(Node).where(Node.name.in_(names)).options(selectinload(Node.gpus))
                )
            }
            applied = []
            for name, hb in items:
                node = nodes.apply_heartbeat(s, name, hb, now, self.gpu_use, known)
                known[name] = node  # a second heartbeat of a new node in this batch finds it
                applied.append(node)
            s.flush()
            return [nodes.node_out(node, now) for node in applied]

"""``api/placements``: ask the scheduler for resources, follow the request, release them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from gpu_scheduler.model import GPU_MILLI, PlacementRequest

from .. import schemas
from ..datasets import Resolved
from ..images import ImageNotAllowed, InvalidImage, check_image
from ..models import Allocation, Node, PlacementRequestRow
from ..scheduler import Submission
from ..schemas import AllocationOut, PlacementIn, PlacementList, PlacementOut
from .base import APIError, APIHandler, ServerContext
from .credits import admission
from .datasets import dataset_resolver


def iso(t: datetime | None) -> str | None:
    return t.isoformat() + "Z" if t else None


def allowed_image(ctx: ServerContext, image: str, default: str | None = None) -> str:
    """*image* when it is a Docker image reference that the operator allows
    (``NSMLServer.allowed_images``); the configured *default* image always is.

    Raises:
        APIError: 400 that names the bad value and lists the allowed images.
    """
    if default is not None and image == default:
        return image
    try:
        return check_image(image, ctx.allowed_images)
    except (InvalidImage, ImageNotAllowed) as e:
        raise APIError(400, e.message, e.reason) from None


def spec_of(body: PlacementIn, resolve: Callable[[list[str]], list[Resolved]]) -> dict[str, object]:
    """Validate the resource ask and turn it into the stored spec (milli units, MiB).

    *resolve* turns the dataset references into versions the user may read (``name@k``, real
    bytes): a missing or unreadable dataset is a 4xx and nothing is queued.
    """
    g = body.gpus  # checked by the schema: 0, 0.001 to 1, or a whole number
    gpu_milli = round(g * GPU_MILLI) if 0 < g < 1 else int(g) * GPU_MILLI
    memory_mib = schemas.memory_mib(body.memory)  # checked by the schema
    datasets = [
        {"ref": d.key, "bytes": d.bytes, "digest": d.digest}
        for d in (resolve(list(body.datasets)) if body.datasets else [])
    ]
    spec = {
        "gpu_milli": gpu_milli,
        "gpu_models": sorted(set(body.gpu_models)),
        "cpu_milli": round(body.cpu * 1000),
        "memory_mib": memory_mib,
        "datasets": datasets,
        "image": body.image,
    }
    if body.home_node:
        spec["home_node"] = body.home_node
    try:
        PlacementRequest(
            gpu_milli=gpu_milli,
            cpu_milli=int(spec["cpu_milli"]),  # type: ignore[call-overload]
            memory_mib=memory_mib,
        )
    except ValueError as e:
        raise APIError(400, str(e), "bad_request") from e
    return spec


def placement_out(s: Session, row: PlacementRequestRow) -> PlacementOut:
    """The API view of a request (and its allocation, if placed)."""
    alloc = s.get(Allocation, row.allocation_id) if row.allocation_id else None
    node = s.get(Node, alloc.node_id) if alloc else None
    return PlacementOut(
        id=row.id,
        holder=row.holder.split(":", 1)[-1],
        user=row.user_name,
        state=row.state,  # type: ignore[arg-type]
        position=row.position,
        code=row.code,
        reason=row.message,
        request=dict(row.spec),
        allocation=AllocationOut(
            id=alloc.id,
            node=node.name if node else "?",
            gpu_indices=list(alloc.gpu_indices),
            gpu_uuids=list(alloc.gpu_uuids),
            gpu_milli_per_gpu=alloc.gpu_milli_per_gpu,
            cpu_milli=alloc.cpu_milli,
            memory_mib=alloc.memory_mib,
            state=alloc.state,  # type: ignore[arg-type]
        )
        if alloc
        else None,
        created=iso(row.created) or "",
        decided=iso(row.decided),
    )


class PlacementsHandler(APIHandler):
    """``POST api/placements`` (ask); ``GET api/placements[?state=...&all=1]`` (list)."""

    async def post(self) -> None:
        try:
            body = self.body_as(PlacementIn)
        except ValidationError as e:  # pragma: no cover - body_as maps these
            raise APIError(400, str(e), "bad_request") from e
        user = self.user_name
        if body.user is not None and body.user != user:
            self.require_admin()
            user = body.user
        if body.priority > 0:
            self.require_admin()
        if body.image is not None:
            allowed_image(self.ctx, body.image)
        spec = spec_of(body, await dataset_resolver(self, user, body.datasets))
        if body.holder == "notebook" or body.holder.startswith("notebook:"):
            with self.ctx.db.session() as s:  # a notebook server: credits and GPU limits
                admission(
                    s,
                    user,
                    spec,
                    "a notebook server with these resources",
                    self.ctx.now(),
                    counts_as_session=False,
                )
        scheduler = self.ctx.scheduler
        assert scheduler is not None
        sub = Submission(
            user=user, holder=f"{user}:{body.holder}", spec=spec, priority=body.priority
        )
        request_id, fresh, created, existing = await self.ctx.submit_queue.submit(sub)
        if fresh:
            out = PlacementOut(
                id=request_id,
                holder=body.holder,
                user=user,
                state="waiting",
                position=None,
                code=None,
                reason=None,
                request=spec,
                allocation=None,
                created=iso(created) or "",
                decided=None,
            )
        else:
            out = existing
        was_waiting = out.state == "waiting"
        decision = None
        if body.wait_s > 0 and out.state == "waiting":
            decision = await scheduler.wait_decided(request_id, body.wait_s)
        if decision is not None:
            # Decided by this server just now: answer from memory, no query.
            out = out.model_copy(
                update={
                    "state": decision["state"],
                    "code": decision["code"],
                    "reason": decision["reason"],
                    "position": None,
                    "decided": iso(decision["decided"]),
                    "allocation": AllocationOut(**decision["allocation"])
                    if decision["allocation"]
                    else None,
                }
            )
        elif body.wait_s > 0 and out.state == "waiting":
            out = await asyncio.get_running_loop().run_in_executor(None, self._read, request_id)
        if out.state == "failed":
            raise APIError(422, out.reason or "This request can never fit.", "infeasible")
        status = {"placed": 201, "waiting": 202}.get(out.state, 200)
        if not was_waiting and out.state == "placed":
            status = 200
        self.write_json(out, status=status)

    def _read(self, request_id: int) -> PlacementOut:
        with self.ctx.db.session() as s:
            row = s.get(PlacementRequestRow, request_id)
            assert row is not None
            return placement_out(s, row)

    def get(self) -> None:
        state = self.get_query_argument("state", None)
        states = ("waiting", "placed", "released", "failed", "cancelled")
        if state is not None and state not in states:
            raise APIError(
                400, f"Invalid state {state!r}; valid: {', '.join(states)}.", "bad_request"
            )
        everyone = self.get_query_argument("all", "0") in ("1", "true")
        if everyone:
            self.require_admin()
        with self.ctx.db.session() as s:
            q = select(PlacementRequestRow).order_by(PlacementRequestRow.id)
            if not everyone:
                q = q.where(PlacementRequestRow.user_name == self.user_name)
            if state is not None:
                q = q.where(PlacementRequestRow.state == state)
            out = PlacementList(placements=[placement_out(s, r) for r in s.scalars(q)])
        self.write_json(out)


class PlacementHandler(APIHandler):
    """``GET api/placements/ID``; ``DELETE`` cancels a waiting request or releases (idempotent)."""

    def _row(self, s: Session, pid: str) -> PlacementRequestRow:
        row = s.get(PlacementRequestRow, int(pid))
        if row is None:
            raise APIError(404, f"No placement {pid}.", "not_found")
        if row.user_name != self.user_name and not self.is_admin:
            raise APIError(403, f"Placement {pid} belongs to another user.", "forbidden")
        return row

    def get(self, pid: str) -> None:
        with self.ctx.db.session() as s:
            out = placement_out(s, self._row(s, pid))
        self.write_json(out)

    def delete(self, pid: str) -> None:
        scheduler = self.ctx.scheduler
        assert scheduler is not None
        with self.ctx.db.session() as s:
            row = self._row(s, pid)
            scheduler.release(s, row)
            s.flush()
            out = placement_out(s, row)
        self.write_json(out)

"""A live one-line status of a session in the notebook (ipywidgets), that never blocks the kernel.

The line is an ``ipywidgets.HTML`` refreshed by an asyncio task on the kernel's own event
loop; the HTTP call runs in a worker thread, so cells keep running while it follows the
session. It stops by itself when the session reaches a final state.
"""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import Callable, Mapping
from typing import Any

from nsml.sessions import FINAL_STATES

log = logging.getLogger("nsml_magics")

_COLORS = {
    "queued": "#6c757d",
    "preparing": "#0d6efd",
    "running": "#198754",
    "completed": "#198754",
    "failed": "#dc3545",
    "oom_killed": "#dc3545",
    "lost": "#dc3545",
    "stopped": "#fd7e14",
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_status(s: Mapping[str, Any]) -> str:
    """The status line's HTML for a session as the API describes it.

    Shows the name, the state (with the queue position or the reason when there is one),
    progress from the last report (epoch, step), up to four last metrics, the node and the
    session's GPUs (a share of one GPU as such), their use while running when the node
    reports it (NVML; virtual GPUs report none), and the exit code of a finished session.
    """
    state = str(s.get("state", "?"))
    color = _COLORS.get(state, "#6c757d")
    parts = [
        f"<b>{html.escape(str(s.get('name', '?')))}</b>",
        f"<span style='color:{color};font-weight:bold'>{html.escape(state)}</span>",
    ]
    queue = s.get("queue") or {}
    if state == "queued" and queue.get("position"):
        parts.append(f"#{int(queue['position'])} in queue")
    values = dict(s.get("last_metrics") or {})
    epoch = values.pop("epoch", None)
    if epoch is not None:
        parts.append(f"epoch {_fmt(epoch)}")
    if s.get("last_step") is not None:
        parts.append(f"step {_fmt(s['last_step'])}")
    if values:
        shown = list(values.items())[:4]
        parts.append(", ".join(f"{html.escape(str(k))} {_fmt(v)}" for k, v in shown))
    where = _where(s)
    if where:
        parts.append(where)
    use = [g for g in s.get("gpu_use") or () if g.get("utilization_pct") is not None]
    if use:
        pct = sum(int(g["utilization_pct"]) for g in use) / len(use)
        mem = sum(int(g.get("memory_used_mib") or 0) for g in use)
        parts.append(f"GPU use {pct:.0f}%, {mem} MiB")
    if state in FINAL_STATES and s.get("exit_code") is not None:
        parts.append(f"exit {s['exit_code']}")
    why = s.get("message") or queue.get("reason")
    if why and state not in ("running", "completed"):
        parts.append(f"<i>{html.escape(str(why))[:200]}</i>")
    return "<span style='font-family:monospace'>" + " · ".join(parts) + "</span>"


def _where(s: Mapping[str, Any]) -> str:
    """``node-a GPU 0,1``, ``node-a 0.5 of GPU 2``, ``node-a``; empty before placement."""
    if not s.get("node"):
        return ""
    where = html.escape(str(s["node"]))
    ids = [str(g) for g in s.get("gpu_ids") or []]
    if not ids:
        return where
    asked = (s.get("resources") or {}).get("gpus") or 0
    share = f"{float(asked):g} of " if 0 < float(asked) < 1 else ""
    return f"{where} {share}GPU {html.escape(','.join(ids))}"


class StatusLine:
    """Follow one session: ``StatusLine(fetch).start()`` and display ``.widget``.

    *fetch* returns the session's current description (a blocking call; it runs in a worker
    thread). Errors are shown in the line and retried with back-off.
    """

    def __init__(
        self,
        fetch: Callable[[], Mapping[str, Any]],
        *,
        interval_s: float = 2.0,
        render: Callable[[Mapping[str, Any]], str] = render_status,
    ) -> None:
        import ipywidgets

        self.fetch = fetch
        self.interval_s = interval_s
        self.render = render
        self.widget = ipywidgets.HTML(value="<i>starting…</i>")
        self.last: Mapping[str, Any] | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> StatusLine:
        """Schedule the refresh task on the running (kernel) loop; a no-op without one."""
        try:
            loop = asyncio.get_event_loop()
        except RuntimeError:
            return self
        self.task = loop.create_task(self.follow())
        return self

    async def follow(self) -> None:
        """Refresh until the session ends (or the task is cancelled)."""
        loop = asyncio.get_running_loop()
        delay = self.interval_s
        while True:
            try:
                status = await loop.run_in_executor(None, self.fetch)
            except Exception as e:  # shown, then retried: the line must never die silently
                msg = getattr(e, "message", None) or str(e) or e.__class__.__name__
                self.widget.value = f"<i>status unavailable: {html.escape(msg)}; retrying</i>"
                delay = min(delay * 2, 30.0)
            else:
                self.last = status
                self.widget.value = self.render(status)
                delay = self.interval_s
                if str(status.get("state")) in FINAL_STATES:
                    return
            await asyncio.sleep(delay)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

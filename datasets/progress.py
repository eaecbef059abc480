"""The progress protocol shared by scanning, pushing, materializing and fetching.

Long operations take ``on_progress``, a plain callable that receives :class:`ProgressEvent`
values. It needs no library: the CLI can drive ``tqdm`` and a notebook ``ipywidgets`` with it::

    bar = tqdm(unit="B", unit_scale=True)

    def on_progress(event: ProgressEvent) -> None:
        bar.total = event.total_bytes or None
        bar.set_description(event.phase)
        bar.update(event.done_bytes - bar.n)

Guarantees: events come from the thread that called the operation, one at a time, at most
about :data:`EVENT_INTERVAL_S` apart while bytes move (plus one per phase change); within a
phase ``done_bytes`` and ``done_files`` never decrease, and the last event of a phase that
completes has ``done_bytes == total_bytes`` and ``done_files == total_files``. An exception
raised by the callback aborts the operation (the CLI uses that for Ctrl-C).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

EVENT_INTERVAL_S = 0.1
"""Smallest interval between two events of one phase, in seconds (about ten a second)."""


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """Where a long operation stands.

    Attributes:
        phase: ``"scan"`` (walking the folder; totals still 0 = unknown), ``"hash"``,
            ``"push"`` (hashing and storing a local folder), ``"upload"`` (blobs sent by a
            client), ``"materialize"`` (building a folder from blobs) or ``"fetch"``
            (downloading blobs).
        done_bytes: bytes processed so far in this phase.
        total_bytes: bytes the phase will process; 0 when not known yet.
        done_files: files finished so far in this phase.
        total_files: files the phase will process; 0 when not known yet.
        path: a file of the phase, relative POSIX path, ``""`` when none applies.
    """

    phase: str
    done_bytes: int
    total_bytes: int
    done_files: int
    total_files: int
    path: str = ""

    @property
    def fraction(self) -> float:
        """Share of the bytes done, 0.0..1.0 (0.0 while the total is unknown)."""
        if self.total_bytes <= 0:
            return 1.0 if self.total_files and self.done_files >= self.total_files else 0.0
        return min(1.0, self.done_bytes / self.total_bytes)


ProgressCallback = Callable[[ProgressEvent], None]
"""The type of ``on_progress`` arguments."""

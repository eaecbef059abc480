"""Errors of the dataset store, each with a stable ``reason`` for API answers.

Every error carries a message for users (what is wrong, with the offending value, and what to
do) and a short machine-readable ``reason``; the server answers ``{"message", "reason"}`` from
them without a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class DatasetError(Exception):
    """Base of every error this package raises on purpose.

    Attributes:
        reason: a stable, hyphenated code (``"invalid-name"``, ``"symlink-escape"`` ...).
    """

    reason: str = "dataset-error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        """The user-facing message."""
        return str(self.args[0]) if self.args else ""


class InvalidName(DatasetError, ValueError):
    """A dataset name, reference, cache key, digest or upload id breaks its rule."""

    reason = "invalid-name"


class UnsafePath(DatasetError):
    """A path that may not enter (or leave) the store.

    Raised by :func:`~nsml_datasets.manifest.scan` for a pushed folder's contents and by
    :class:`~nsml_datasets.manifest.Manifest` for a path in a manifest received from a client.

    Attributes:
        path: the offending path, relative to the pushed folder (POSIX form).
        reason: one of ``parent-reference``, ``absolute``, ``bad-name``, ``symlink-escape``,
            ``broken-symlink``, ``symlink-loop``, ``special-file``, ``too-large``,
            ``too-many-files``, ``total-too-large``, ``unreadable``, ``not-a-folder``.
    """

    reason = "unsafe-path"

    def __init__(self, path: str, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.path = path


class IntegrityError(DatasetError):
    """Bytes whose BLAKE3 (or length) is not the one announced.

    Attributes:
        blake3: the expected hash.
        actual: the hash (or ``"<n> bytes"``) found instead, ``""`` when not computed.
    """

    reason = "integrity"

    def __init__(self, message: str, *, blake3: str, actual: str = "") -> None:
        super().__init__(message)
        self.blake3 = blake3
        self.actual = actual


class NotFound(DatasetError, LookupError):
    """A blob, manifest, upload or cache entry that does not exist."""

    reason = "not-found"


class UploadIncomplete(DatasetError):
    """``commit()`` of an upload whose blobs are not all stored yet.

    Attributes:
        missing: the BLAKE3 of every blob still to upload.
    """

    reason = "upload-incomplete"

    def __init__(self, message: str, *, missing: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = tuple(missing)


class Busy(DatasetError):
    """Another writer holds the same partial blob of an upload right now; retry later."""

    reason = "busy"


class InUse(DatasetError):
    """A cache entry that a session holds cannot be removed."""

    reason = "in-use"


class CacheFull(DatasetError):
    """A node cache cannot make room for a dataset.

    ``reason`` tells the two cases apart:

    - ``larger-than-budget``: the dataset is larger than the whole budget; it can never fit.
    - ``in-use``: it would fit once sessions release the entries they hold; retry later.
    """

    reason = "in-use"

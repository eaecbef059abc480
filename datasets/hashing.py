"""The content hash of datasets: BLAKE3, 256 bits, written as 64 lowercase hex digits.

Every blob is named by the BLAKE3 of its bytes and every manifest by the BLAKE3 of its
canonical JSON. BLAKE3 is a cryptographic hash (no known collisions or preimages) that runs
several times faster than SHA-256 on the same core (SIMD over 1 KiB chunks), which matters
because a push hashes every byte on the client (to know what to send) and again on the server
(which trusts no client), and a pull or a node cache verifies every byte it receives.
"""

from __future__ import annotations

from typing import Any

import blake3

ALGORITHM = "blake3"
"""The name of the hash, as manifests and the API spell it."""

HEX_DIGITS = 64
"""Length of a digest in hexadecimal."""

PARALLEL_FROM = 8 << 20
"""Inputs of at least this many bytes are hashed on several cores at once."""


def new_hasher(size_hint: int = 0) -> Any:
    """A fresh incremental hasher (``update``, ``hexdigest``), multi-threaded for big inputs.

    The hasher releases the GIL while it hashes, so threads hashing different files run in
    parallel too.
    """
    if size_hint >= PARALLEL_FROM:
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """The hex digest of *data*."""
    return new_hasher(len(data)).update(data).hexdigest()  # type: ignore[no-any-return]

"""The content hash of datasets: BLAKE3, 256 bits, written as 64 lowercase hex digits.

Every blob is named by the BLAKE3 of its bytes and every manifest by the BLAKE3 of its
canonical JSON. BLAKE3 is a cryptographic hash (no known collisions or preimages) that runs
several times faster than SHA-256 on the same core (SIMD over 1 KiB chunks), which matters
because a push hashes every byte on the client (to know what to send) and again on the server
(which trusts no client), and a pull or a node cache verifies every byte it receives.
"""

from __future__ import annotations

import os
from typing import Any

import blake3

ALGORITHM = "blake3"
"""The name of the hash, as manifests and the API spell it."""

HEX_DIGITS = 64
"""Length of a digest in hexadecimal."""


def new_hasher() -> Any:
    """A fresh incremental hasher (``update``, ``hexdigest``).

    Single-threaded on purpose: it releases the GIL while it hashes, so the callers' own
    threads (one file each) already use every core, and the library's multi-threaded mode
    (a spinning thread pool) costs several times the CPU it saves on this workload.
    """
    return blake3.blake3()


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """The hex digest of *data*."""
    return new_hasher().update(data).hexdigest()  # type: ignore[no-any-return]


def hash_fd(fd: int, size: int) -> str:
    """The hex digest of at most *size* bytes of the open file *fd*, read with ``pread`` from
    offset 0 (the shared file offset is left alone); a file shorter than *size* hashes what
    it holds.

    ``pread`` rather than ``mmap``: safe on a file another process may truncate meanwhile (a
    mapped read would die of ``SIGBUS``), and cheaper with several threads at work, since
    unmapping a file makes the kernel flush the other cores' TLBs (measured: a copy-and-hash
    of 1 GiB in 6,767 files on 4 threads ran 20 % faster than through ``mmap``).
    """
    h = new_hasher()
    buf = bytearray(min(size, 1 << 20) or 1)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[: min(len(buf), size - done)]], done)
        if n == 0:
            break
        h.update(view[:n])
        done += n
    return h.hexdigest()  # type: ignore[no-any-return]

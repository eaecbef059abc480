"""Versioned, content-addressed datasets for NSML: manifests, the blob store, the node cache.

Imported as ``nsml_datasets`` (the folder is ``datasets/``; a top-level ``datasets`` package
would shadow Hugging Face ``datasets``). Plain files only: the NSML server keeps names,
versions, owners and visibility in its database and calls this library.

- :mod:`.names`: ``validate_name``, ``parse_ref("mnist@3")``, cache keys.
- :mod:`.manifest`: ``scan(folder)`` → :class:`Manifest` (refusing unsafe paths), ``diff``.
- :mod:`.store`: :class:`BlobStore` — blobs by BLAKE3, resumable uploads, ``gc``,
  ``materialize``, ``push_folder``.
- :mod:`.materialize`: ``download`` (a pull over HTTP through a ``fetch`` function).
- :mod:`.cache`: :class:`NodeCache` — a node's cache with LRU eviction under a byte budget.
- :mod:`.progress`: :class:`ProgressEvent`, the progress callback protocol.
"""

from .cache import CacheEntry, NodeCache
from .errors import (
    Busy,
    CacheFull,
    DatasetError,
    IntegrityError,
    InUse,
    InvalidName,
    NotFound,
    UnsafePath,
    UploadIncomplete,
)
from .manifest import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_FILES,
    Entry,
    Manifest,
    ManifestDiff,
    diff,
    scan,
    validate_relpath,
    verify_folder,
)
from .materialize import MODES, Fetch, Mode, build_tree, download
from .names import format_ref, parse_ref, validate_key, validate_name
from .progress import ProgressCallback, ProgressEvent
from .store import (
    DEFAULT_GRACE_S,
    BlobStore,
    GcReport,
    PushResult,
    StoreUsage,
    Upload,
    validate_upload_id,
)

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_MAX_FILES",
    "DEFAULT_MAX_FILE_BYTES",
    "MODES",
    "BlobStore",
    "Busy",
    "CacheEntry",
    "CacheFull",
    "DatasetError",
    "Entry",
    "Fetch",
    "GcReport",
    "InUse",
    "IntegrityError",
    "InvalidName",
    "Manifest",
    "ManifestDiff",
    "Mode",
    "NodeCache",
    "NotFound",
    "ProgressCallback",
    "ProgressEvent",
    "PushResult",
    "StoreUsage",
    "UnsafePath",
    "Upload",
    "UploadIncomplete",
    "build_tree",
    "diff",
    "download",
    "format_ref",
    "parse_ref",
    "scan",
    "validate_key",
    "validate_name",
    "validate_relpath",
    "validate_upload_id",
    "verify_folder",
]

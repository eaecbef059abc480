"""Dataset names, ``NAME@VERSION`` references and node-cache keys.

Names become folder names on every node, so they are short and ASCII:

- a **name** is 1 to :data:`NAME_MAX` letters, digits, ``-``, ``_`` or ``.``, starting with a
  letter or a digit (so never ``.`` or ``..``, never a path);
- a **version** is a positive integer without leading zeros (``mnist@3``);
- a **cache key** names one materialized tree in a node cache. By convention it is the
  reference ``NAME@VERSION`` for the files sessions mount, and ``NAME@VERSION+SPLIT`` (e.g.
  ``mnist@3+test``) for another manifest stored apart, such as a hidden test split that only the
  evaluator ever mounts. The store and the cache treat both alike; the server decides what is
  mounted into which container.
"""

from __future__ import annotations

import re

from .errors import InvalidName

NAME_MAX = 64
"""Longest dataset name, in characters."""

KEY_MAX = 128
"""Longest node-cache key, in characters."""

VERSION_MAX = 999_999_999
"""Largest version number."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z", re.ASCII)
_VERSION_RE = re.compile(r"[1-9][0-9]*\Z", re.ASCII)
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*\Z", re.ASCII)

NAME_RULE = (
    f"1 to {NAME_MAX} characters: letters, digits, '-', '_' or '.', starting with a letter or "
    "a digit (e.g. 'mnist', 'imagenet-1k_v2.1')"
)
KEY_RULE = (
    f"1 to {KEY_MAX} characters: letters, digits, '-', '_', '.', '@' or '+', starting with a "
    "letter or a digit (e.g. 'mnist@3' or 'mnist@3+test')"
)


def validate_name(name: object) -> str:
    """Return *name* when it is a valid dataset name.

    Raises:
        InvalidName: naming the bad value and the rule.
    """
    if not isinstance(name, str) or len(name) > NAME_MAX or not _NAME_RE.match(name):
        raise InvalidName(f"invalid dataset name {name!r}: use {NAME_RULE}")
    return name


def parse_ref(ref: object) -> tuple[str, int | None]:
    """Split ``"NAME"`` or ``"NAME@VERSION"`` into ``(name, version or None)``.

    ``None`` means "the latest version": the server resolves it.

    Raises:
        InvalidName: naming the bad value and the rule.
    """
    if not isinstance(ref, str):
        raise InvalidName(f"invalid dataset reference {ref!r}: expected NAME or NAME@VERSION")
    name, at, version = ref.partition("@")
    if not at:
        return validate_name(name), None
    validate_name(name)
    if not _VERSION_RE.match(version) or int(version) > VERSION_MAX:
        raise InvalidName(
            f"invalid dataset reference {ref!r}: the version after '@' must be a positive "
            f"integer without leading zeros, at most {VERSION_MAX} (e.g. '{name}@3')"
        )
    return name, int(version)


def format_ref(name: str, version: int) -> str:
    """``NAME@VERSION`` for a valid name and a positive version.

    Raises:
        InvalidName: for a bad name or version.
    """
    validate_name(name)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 < version <= VERSION_MAX:
        raise InvalidName(
            f"invalid version {version!r} for dataset {name!r}: use an integer 1..{VERSION_MAX}"
        )
    return f"{name}@{version}"


def validate_key(key: object) -> str:
    """Return *key* when it is a valid node-cache key (see the module docstring).

    Raises:
        InvalidName: naming the bad value and the rule.
    """
    if not isinstance(key, str) or len(key) > KEY_MAX or not _KEY_RE.match(key):
        raise InvalidName(f"invalid cache key {key!r}: use {KEY_RULE}")
    return key

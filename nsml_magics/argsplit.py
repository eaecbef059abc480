"""What differed between runs: a session's script arguments as named values, and the split of
many sessions' arguments into the *common* ones (the same value in every session) and the
*exclusive* ones (different somewhere, or missing from some).

Pure functions over plain values (no Bokeh, no I/O); the comparison panel
(:mod:`nsml_magics.panel`) shows their result.

How a command line is read (``parse_args``):

- ``--name=value`` and ``--name value`` are the same argument; ``-n value`` likewise
  (the name keeps its dashes: ``-n`` and ``--n`` stay different options).
- An option followed by another option, by ``--`` or by nothing is a flag: its value is
  ``True``. A negative number (``--shift -1``) is a value, not an option.
- An option given more than once keeps all its values in order, as a tuple
  (``--layer 64 --layer 32`` is ``(64, 32)``).
- Anything else is positional: the first is named ``#1``, the second ``#2``; after a bare
  ``--`` every word is positional.
- Values that read as numbers are numbers (``0.1``, ``1e-1`` and ``.10`` are one value; ``10``
  and ``10.0`` too), so that the same setting written two ways is not a difference;
  ``true``/``false`` stay strings (a script decides what they mean).

The rule ``--name value`` cannot tell an option's value from a positional argument that
follows a flag (``--verbose data.csv``); it takes the value, as ``argparse`` would for an
option that takes one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Scalar = bool | int | float | str
Value = Scalar | tuple[Scalar, ...]


class _Missing:
    """The marker of an argument a session does not have (shown as ``—``)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


#: An argument that a session does not have.
MISSING = _Missing()

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INT = re.compile(r"[+-]?\d+")


def is_number(word: str) -> bool:
    """Whether *word* reads as a decimal number (``-1``, ``0.5``, ``.5``, ``1e-3``)."""
    return _NUMBER.fullmatch(word) is not None


def scalar(word: str) -> Scalar:
    """*word* as a number when it reads as one (an int when it is integral), else the word."""
    if _INT.fullmatch(word):
        return int(word)
    if _NUMBER.fullmatch(word):
        x = float(word)
        if math.isfinite(x) and x.is_integer() and abs(x) < 2**53:
            return int(x)
        return x
    return word


def _is_option(word: str) -> bool:
    return word.startswith("-") and word not in ("-", "--") and not is_number(word)


def parse_args(argv: Sequence[str]) -> dict[str, Value]:
    """A script's arguments as ``{name: value}`` in the order first seen (see the module's
    rules): options by their name with dashes (``--lr``), positional ones as ``#1``, ``#2``."""
    values: dict[str, list[Scalar]] = {}
    positional = 0
    i = 0
    only_positional = False
    while i < len(argv):
        word = argv[i]
        if not only_positional and word == "--":
            only_positional = True
            i += 1
            continue
        if only_positional or not _is_option(word):
            positional += 1
            values[f"#{positional}"] = [scalar(word)]
            i += 1
            continue
        name, eq, text = word.partition("=")
        value: Scalar
        if eq:
            value = scalar(text)
            i += 1
        elif i + 1 < len(argv) and argv[i + 1] != "--" and not _is_option(argv[i + 1]):
            value = scalar(argv[i + 1])
            i += 2
        else:
            value = True
            i += 1
        values.setdefault(name, []).append(value)
    return {k: v[0] if len(v) == 1 else tuple(v) for k, v in values.items()}


def same(a: Value | _Missing, b: Value | _Missing) -> bool:
    """Whether two argument values are one setting (numbers by value, ``True`` only equal
    to ``True``, never equal to MISSING unless both are)."""
    if isinstance(a, _Missing) or isinstance(b, _Missing):
        return a is b
    if isinstance(a, tuple) or isinstance(b, tuple):
        return (
            isinstance(a, tuple)
            and isinstance(b, tuple)
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return type(a) is type(b) and a == b
    return a == b


def show(v: Value | _Missing) -> str:
    """An argument value as a table cell: ``—`` when missing, ``✓`` for a flag, numbers
    short (``0.001``), repeated values joined by spaces."""
    if isinstance(v, _Missing):
        return "—"
    if v is True:
        return "✓"
    if isinstance(v, tuple):
        return " ".join(show(x) for x in v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


@dataclass(frozen=True)
class Split:
    """The common / exclusive split of the arguments of ``sessions`` (in the given order).

    ``common``: arguments with the same value in every session. ``exclusive``: for every
    other argument, its value in each session (:data:`MISSING` where absent), by argument
    then session. Arguments in the order first seen.
    """

    sessions: tuple[str, ...]
    common: dict[str, Value] = field(default_factory=dict)
    exclusive: dict[str, dict[str, Value | _Missing]] = field(default_factory=dict)

    def cell(self, arg: str, session: str) -> Value | _Missing:
        """The value of *arg* in *session* (common ones included)."""
        if arg in self.common:
            return self.common[arg]
        return self.exclusive[arg][session]


def split_args(args: Mapping[str, Sequence[str]]) -> Split:
    """Split the script arguments of several sessions (``{session: argv}``) into common and
    exclusive ones (see :class:`Split`). One session: every argument is common."""
    parsed = {name: parse_args(argv) for name, argv in args.items()}
    order: dict[str, None] = {}
    for p in parsed.values():
        order.update(dict.fromkeys(p))
    common: dict[str, Value] = {}
    exclusive: dict[str, dict[str, Value | _Missing]] = {}
    for arg in order:
        cells: dict[str, Value | _Missing] = {s: p.get(arg, MISSING) for s, p in parsed.items()}
        first = next(iter(cells.values()))
        if all(same(first, v) for v in cells.values()) and not isinstance(first, _Missing):
            common[arg] = first
        else:
            exclusive[arg] = cells
    return Split(tuple(parsed), common, exclusive)


def value_groups(split: Split, arg: str) -> dict[str, list[str]]:
    """Sessions grouped by their value of *arg* (shown as text; ``—`` for missing), groups
    in the order of their first session: what colouring the lines by *arg* uses."""
    groups: dict[str, list[str]] = {}
    for s in split.sessions:
        groups.setdefault(show(split.cell(arg, s)), []).append(s)
    return groups

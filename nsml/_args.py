"""Argument parsing shared by the ``nsml`` CLI and the ``%nsml`` magics.

* :class:`Parser` is an :class:`argparse.ArgumentParser` whose mistakes are one line: it
  raises :class:`UsageProblem` (the CLI prints it and exits with status 2; the magics raise
  IPython's ``UsageError``) instead of printing a usage block and exiting. It also reads a
  value that looks negative (``--memory -1G``, ``-n -5``) as the option's value, so that the
  converter can refuse it with a reason instead of argparse saying "expected one argument".
* The converters (:func:`gpus`, :func:`cpu`, :func:`memory`, :func:`integer`,
  :func:`seconds`) are the ``type=`` of every numeric option: they refuse non-finite,
  negative and out-of-range values with a message that names the valid range.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = [
    "MAX_CPU",
    "MAX_GPUS",
    "MAX_MEMORY_MIB",
    "Parser",
    "UsageProblem",
    "cpu",
    "gpus",
    "integer",
    "memory",
    "memory_mib",
    "seconds",
]

#: Bounds the NSML server enforces (``POST api/sessions``); the client refuses values outside
#: them before anything is sent.
MAX_GPUS = 256
MAX_CPU = 4096
#: 1 PiB: far above any machine, small enough that the value stays an exact integer.
MAX_MEMORY_MIB = 1024**3

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_MEMORY_UNITS = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}
MEMORY_FORM = "a size such as 8G, 512M or 1.5G (binary units K, M, G, T; a bare number is MiB)"


class UsageProblem(Exception):
    """A mistake in the command line: one line that says what is wrong and what is valid."""


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def gpus(text: str) -> float:
    """``--gpus``: 0, a fraction below 1 (a share of one GPU) or a whole number up to 256."""
    form = f"give 0, a fraction below 1 (e.g. 0.5) or a whole number of GPUs up to {MAX_GPUS}"
    try:
        value = _finite(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; {form}") from None
    if value < 0 or value > MAX_GPUS:
        raise argparse.ArgumentTypeError(f"{text} is out of range; {form}")
    if value >= 1 and value != int(value):
        raise argparse.ArgumentTypeError(f"{text} is neither a fraction below 1 nor whole; {form}")
    if 0 < value < 0.001:
        raise argparse.ArgumentTypeError(f"{text} is below 0.001 GPU; {form}")
    return value


def cpu(text: str) -> float:
    """``--cpu``: CPU cores, above 0 (at least 0.001) and at most 4096."""
    form = f"give a number of CPU cores from 0.001 to {MAX_CPU}, e.g. 2 or 0.5"
    try:
        value = _finite(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; {form}") from None
    if not 0.001 <= value <= MAX_CPU:
        raise argparse.ArgumentTypeError(f"{text} is out of range; {form}")
    return value


def memory_mib(text: str) -> int:
    """A memory size in MiB (``8G`` → 8192; a bare number is MiB).

    Raises:
        ValueError: not a size, below 1 MiB, or above 1 PiB (the message says the form).
    """
    if text.strip().startswith("-"):
        raise ValueError(f"{text} is negative; give {MEMORY_FORM}")
    m = _MEMORY.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a memory size; give {MEMORY_FORM}")
    number = float(m.group(1))
    mib = number * _MEMORY_UNITS[m.group(2).lower()]
    if not math.isfinite(mib) or mib > MAX_MEMORY_MIB:
        raise ValueError(f"{text} is more than 1024T; give {MEMORY_FORM}")
    if mib < 1:
        raise ValueError(f"{text} is less than 1 MiB; give {MEMORY_FORM}")
    return int(mib)


def memory(text: str) -> str:
    """``--memory``: a size from 1M to 1024T (``8G``, ``512M``); returned as given (stripped)."""
    try:
        memory_mib(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def integer(lo: int, hi: int, what: str = "a whole number") -> Callable[[str], int]:
    """A converter of whole numbers from *lo* to *hi* (both included)."""

    def convert(text: str) -> int:
        form = f"give {what} from {lo} to {hi}"
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; {form}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is out of range; {form}")
        return value

    convert.__name__ = "integer"
    return convert


def seconds(lo: float, hi: float, *, above: bool = False) -> Callable[[str], float]:
    """A converter of finite durations in seconds from *lo* (excluded when *above*) to *hi*."""

    form = f"give seconds {'above' if above else 'from'} {_plain(lo)} " + (
        f"and up to {_plain(hi)}" if above else f"to {_plain(hi)}"
    )

    def convert(text: str) -> float:
        try:
            value = _finite(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e}; {form}") from None
        if value < lo or value > hi or (above and value == lo):
            raise argparse.ArgumentTypeError(f"{text} is out of range; {form}")
        return value

    convert.__name__ = "seconds"
    return convert


def _plain(x: float) -> str:
    """``600``, ``0.5``, ``315360000`` (no exponent)."""
    return str(int(x)) if x == int(x) else f"{x:f}".rstrip("0")


class Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes raise :class:`UsageProblem` (one line), and that
    reads negative-looking values (``-5``, ``-1G``, ``-inf``) as option values.

    Sub-parsers made with ``add_subparsers()`` are of the same class.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageProblem(f"{self.prog}: {message} (see {self.prog} --help)")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            # Named after the verb they were given to, not the top-level command.
            self._chosen(ns).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def _chosen(self, ns: argparse.Namespace) -> argparse.ArgumentParser:
        """The deepest sub-parser that *ns* chose (``nsml dataset push``), else this one."""
        parser: argparse.ArgumentParser = self
        while True:
            sub = next(
                (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None
            )
            name = getattr(ns, sub.dest, None) if sub is not None else None
            if sub is None or name not in sub.choices:
                return parser
            parser = sub.choices[name]

    def _parse_optional(self, arg_string: str) -> Any:
        found = super()._parse_optional(arg_string)
        # An unknown single-dash word that does not start with a known short option (-1G,
        # -5, -1e400, -inf) is a value, not an option: the converter of the option before it
        # gets to say what is wrong with it. Unknown --words stay unknown options.
        # (Python 3.11 answers one tuple, later versions a list of them.)
        first = found[0] if isinstance(found, list) and found else found
        if (
            isinstance(first, tuple)
            and first[0] is None
            and not arg_string.startswith("--")
            and arg_string[:2] not in self._option_string_actions
        ):
            return None
        return found

"""The API's route table and the rules of its path and query parameters.

A route is written as the OpenAPI document writes its path (``/placements/{id}``); the same
template gives tornado its pattern and names the document's operations. The parameter rules
(type, bounds, pattern, length, allowed values) are read from the document itself, so the
server refuses exactly what the document says is invalid, and nothing else. Every path and
query parameter of every route is checked in one place (:meth:`RouteRules.check`, called by
the API's base handler) before a handler sees it:

- an integer path parameter out of its rule (``/placements/99999999999999999999``) is a
  404 that names the parameter and its range: no such object can exist;
- any other parameter out of its rule is a 400 that names the parameter and its rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

INT32_MAX = 2**31 - 1
"""Largest value of the database's ``INTEGER`` columns (ids, counters)."""

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
"""Bounds of the database's ``BIGINT`` columns (byte offsets, steps)."""

HTTP_METHODS = ("get", "post", "put", "patch", "delete")
"""The methods a route may implement (and the document may describe)."""

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_INTEGER = re.compile(r"-?[0-9]{1,40}\Z")
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\Z")
_DATETIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})?\Z"
)


def parse_datetime(raw: str) -> datetime | None:
    """An RFC 3339 date-time (the OpenAPI ``date-time`` format) as naive UTC; None if it is
    not one. No offset means UTC; a leap second counts as :59; year 0 as year 1."""
    m = _DATETIME.match(raw)
    if not m:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micro = int((m.group(7) or ".")[1:7].ljust(6, "0"))
    try:
        t = datetime(max(year, 1), month, day, hour, minute, min(second, 59), micro)
    except ValueError:
        return None  # no such day (2026-02-30) or hour
    offset = (m.group(8) or "Z").upper()
    if offset != "Z":
        sign = 1 if offset[0] == "+" else -1
        try:
            t -= sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
        except OverflowError:
            t = datetime.min if sign > 0 else datetime.max
    return t


@dataclass(frozen=True)
class Route:
    """One API route: an OpenAPI path template, its handler class and the handler's arguments."""

    template: str
    handler: type
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> list[str]:
        """The path parameters, in the order the handler receives them."""
        return _PLACEHOLDER.findall(self.template)

    def pattern(self, api_prefix: str) -> str:
        """The tornado pattern under *api_prefix* (e.g. ``/services/nsml/api/``).

        Each parameter matches one path segment, whatever it holds: a value that breaks the
        parameter's rule reaches the handler and is refused with a message that names it,
        instead of falling through to "no such endpoint".
        """
        parts = _PLACEHOLDER.split(self.template.lstrip("/"))
        return api_prefix + "".join(
            "([^/]+)" if i % 2 else re.escape(part) for i, part in enumerate(parts)
        )

    def methods(self) -> list[str]:
        """The HTTP methods the handler implements (lower case, in :data:`HTTP_METHODS` order)."""
        return [m.lower() for m in implemented_methods(self.handler)]

    def spec(
        self, api_prefix: str, document: Mapping[str, Any]
    ) -> tuple[str, type, dict[str, Any]]:
        """The tornado rule: pattern, handler, and its arguments plus the route's rules."""
        rules = RouteRules.from_document(self, document)
        return self.pattern(api_prefix), self.handler, {**self.kwargs, "route": rules}


def implemented_methods(handler: type) -> list[str]:
    """Upper-case names of the methods *handler* implements (for an ``Allow`` header)."""
    from tornado.web import RequestHandler

    return [
        m.upper()
        for m in HTTP_METHODS
        if getattr(handler, m, None) is not getattr(RequestHandler, m)
    ]


class ParamError(Exception):
    """A parameter broke its rule: the status to answer and a sentence that names the rule."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ParamRule:
    """The rule of one parameter, as the OpenAPI document states it."""

    name: str
    where: str  # "path" or "query"
    schema: Mapping[str, Any]
    required: bool = False

    @classmethod
    def from_openapi(cls, param: Mapping[str, Any]) -> ParamRule:
        return cls(
            name=str(param["name"]),
            where=str(param["in"]),
            schema=dict(param.get("schema") or {"type": "string"}),
            required=bool(param.get("required", False)),
        )

    def describe(self) -> str:
        """The rule in words, e.g. ``an integer from 1 to 2147483647``."""
        s = self.schema
        kind = s.get("type", "string")
        if "enum" in s:
            return "one of " + ", ".join(repr(str(v)) for v in s["enum"])
        if kind in ("integer", "number"):
            noun = "an integer" if kind == "integer" else "a number"
            lo, hi = s.get("minimum"), s.get("maximum")
            if lo is not None and hi is not None:
                return f"{noun} from {_fmt(lo)} to {_fmt(hi)}"
            if lo is not None:
                return f"{noun} >= {_fmt(lo)}"
            if hi is not None:
                return f"{noun} <= {_fmt(hi)}"
            return noun
        if kind == "boolean":
            return "true or false"
        words = []
        if s.get("format") == "date-time":
            words.append("a date and time in ISO 8601 (RFC 3339) form, e.g. 2026-11-01T00:00:00Z")
        elif s.get("description"):
            words.append(str(s["description"]))
        elif "pattern" in s:
            words.append(f"text matching {s['pattern']}")
        else:
            words.append("text")
        if "maxLength" in s:
            words.append(f"at most {s['maxLength']} characters")
        return ", ".join(words)

    def check(self, raw: str) -> None:
        """Raise :class:`ParamError` when *raw* breaks the rule."""
        if not self._valid(raw):
            status = 404 if self.where == "path" and self.schema.get("type") == "integer" else 400
            shown = raw if len(raw) <= 80 else raw[:77] + "..."
            raise ParamError(
                status,
                f"Invalid {self.where} parameter {self.name}={shown!r}: it must be "
                f"{self.describe()}.",
            )

    def _valid(self, raw: str) -> bool:
        s = self.schema
        kind = s.get("type", "string")
        if "enum" in s:
            return raw in {str(v) for v in s["enum"]}
        if kind == "integer":
            if not _INTEGER.match(raw):
                return False
            return _in_range(int(raw), s)
        if kind == "number":
            if not _NUMBER.match(raw):
                return False
            value = float(raw)
            return math.isfinite(value) and _in_range(value, s)
        if kind == "boolean":
            return raw in ("true", "false")
        if s.get("format") == "date-time" and parse_datetime(raw) is None:
            return False
        if len(raw) < int(s.get("minLength", 0)):
            return False
        if "maxLength" in s and len(raw) > int(s["maxLength"]):
            return False
        pattern = s.get("pattern")
        return pattern is None or re.search(str(pattern), raw) is not None


def _in_range(value: float, schema: Mapping[str, Any]) -> bool:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


@dataclass(frozen=True)
class RouteRules:
    """The parameter rules of one route, per method, from the OpenAPI document."""

    template: str
    path_names: tuple[str, ...]
    rules: Mapping[str, tuple[ParamRule, ...]]

    @classmethod
    def from_document(cls, route: Route, document: Mapping[str, Any]) -> RouteRules:
        item = document.get("paths", {}).get(route.template, {})
        common = [ParamRule.from_openapi(p) for p in item.get("parameters", [])]
        rules: dict[str, tuple[ParamRule, ...]] = {}
        for method in HTTP_METHODS:
            op = item.get(method)
            if op is None:
                continue
            own = [ParamRule.from_openapi(p) for p in op.get("parameters", [])]
            names = {(r.name, r.where) for r in own}
            rules[method] = tuple(own + [r for r in common if (r.name, r.where) not in names])
        return cls(route.template, tuple(route.params), rules)

    def check(
        self, method: str, path_args: Sequence[str], query: Mapping[str, Sequence[str]]
    ) -> None:
        """Raise :class:`ParamError` for the first parameter that breaks its rule.

        Path parameters come first (a 404 for an id that cannot exist wins over a bad
        query). Query parameters the document does not name are ignored; a parameter given
        twice must be valid each time.
        """
        rules = self.rules.get(method.lower())
        if rules is None:
            return
        by_path = {r.name: r for r in rules if r.where == "path"}
        for name, raw in zip(self.path_names, path_args, strict=False):
            rule = by_path.get(name)
            if rule is not None:
                rule.check(raw)
        for rule in rules:
            if rule.where != "query":
                continue
            values = query.get(rule.name)
            if not values:
                if rule.required:
                    raise ParamError(
                        400, f"Missing query parameter {rule.name}: give {rule.describe()}."
                    )
                continue
            for value in values:
                rule.check(value)


def decode_query(arguments: Mapping[str, Iterable[bytes]]) -> dict[str, list[str]]:
    """Tornado's query arguments as text (undecodable bytes become U+FFFD, then fail rules)."""
    return {k: [v.decode("utf-8", "replace") for v in vs] for k, vs in arguments.items()}

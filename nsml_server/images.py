"""Which container images may run: Docker's reference grammar and the operator's allowed list.

Pure code, shared by the NSML server (sessions, placements) and the hub's spawner (the spawn
form): an image named by a user is first checked against Docker's reference grammar (the one
``docker pull`` accepts, from ``distribution/reference``), then against the operator's list of
allowed images. Both refusals say what is valid, so that a bad name fails at submit and never
at container start.

Allowed entries are references or patterns, matched against the reference as written (no
registry is added; ``python`` and ``docker.io/library/python`` are different names):

=================================== ==========================================================
``jupyter-nsml/singleuser:latest``  exactly that image (also ``jupyter-nsml/singleuser``, whose
                                    tag is ``latest``)
``jupyter-nsml/singleuser``         every tag and digest of that repository
``jupyter-nsml/*``                  every repository under ``jupyter-nsml/``, every tag
                                    (``*`` and ``?`` are shell-style wildcards over the name;
                                    a wildcard in the tag part matches tags)
``*``                               every valid reference
=================================== ==========================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

__all__ = [
    "DEFAULT_IMAGE",
    "ImageNotAllowed",
    "ImageRef",
    "InvalidImage",
    "allowed_images_from_env",
    "check_image",
    "document_pattern",
    "is_allowed",
    "parse_reference",
]

DEFAULT_IMAGE = "jupyter-nsml/singleuser:latest"
"""The platform's own notebook and session image when none is configured."""

NAME_MAX = 255  # distribution/reference: NameTotalLengthMax

# distribution/reference/regexp.go, written out.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"  # ASCII, as Docker's \w
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?"
)
_FORM = (
    "a Docker image reference such as 'jupyter-nsml/singleuser:latest' or "
    "'registry.example.org:5000/team/image:1.2' (lowercase repository path; letters, digits, "
    "'.', '_', '-' in the tag)"
)


class InvalidImage(ValueError):
    """The text is not a Docker image reference; the message says which form is valid."""

    reason = "invalid_image"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ImageNotAllowed(ValueError):
    """A valid reference that the operator does not allow; the message lists the allowed ones."""

    reason = "image_not_allowed"

    def __init__(self, message: str, allowed: Sequence[str]) -> None:
        super().__init__(message)
        self.message = message
        self.allowed = tuple(allowed)


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference.

    Attributes:
        name: the repository, with its registry if one was written (``jupyter-nsml/x``).
        tag: the tag; None when none was written (Docker then uses ``latest``, unless a
            digest is given).
        digest: ``sha256:...`` when the reference pins one.
    """

    name: str
    tag: str | None = None
    digest: str | None = None

    @property
    def effective_tag(self) -> str | None:
        """The tag Docker runs: the written one, else ``latest`` unless a digest pins the image."""
        if self.tag is not None:
            return self.tag
        return None if self.digest else "latest"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def _show(text: str) -> str:
    """*text* quoted for a message, cut to a readable length."""
    return repr(text) if len(text) <= 100 else repr(text[:100]) + "..."


def parse_reference(text: object) -> ImageRef:
    """Parse *text* by Docker's reference grammar.

    Raises:
        InvalidImage: not a string, empty, too long, or not a reference (e.g. it holds
            spaces, ``;``, uppercase letters in the repository path).
    """
    if not isinstance(text, str):
        raise InvalidImage(f"image={text!r:.100} is not an image name; expected {_FORM}.")
    m = _REFERENCE.fullmatch(text)
    if not m:
        raise InvalidImage(f"image={_show(text)} is not a valid image name; expected {_FORM}.")
    name = m.group("name")
    if len(name) > NAME_MAX:
        raise InvalidImage(
            f"image={_show(text)}: the repository name is longer than {NAME_MAX} characters; "
            f"expected {_FORM}."
        )
    return ImageRef(name=name, tag=m.group("tag"), digest=m.group("digest"))


def _split_pattern(pattern: str) -> tuple[str, str | None, str | None]:
    """``name[:tag][@digest]`` of a pattern, where name and tag may hold ``*`` and ``?``."""
    rest, _, digest = pattern.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :], digest or None
    return rest, None, digest or None


def is_allowed(ref: ImageRef, patterns: Iterable[str]) -> bool:
    """Whether *ref* matches one of *patterns* (see the module docstring)."""
    for pattern in patterns:
        pattern = pattern.strip()
        if not pattern:
            continue
        if pattern == "*":
            return True
        name, tag, digest = _split_pattern(pattern)
        if not fnmatchcase(ref.name, name):
            continue
        if digest is not None and ref.digest != digest:
            continue
        if tag is not None and (
            ref.effective_tag is None or not fnmatchcase(ref.effective_tag, tag)
        ):
            continue
        return True
    return False


def check_image(text: object, patterns: Sequence[str]) -> str:
    """Return *text* when it is a valid reference that *patterns* allow.

    Raises:
        InvalidImage: not a Docker image reference.
        ImageNotAllowed: a reference the operator does not allow; lists *patterns*.
    """
    ref = parse_reference(text)
    if not is_allowed(ref, patterns):
        listed = ", ".join(patterns) or "none"
        raise ImageNotAllowed(
            f"The image {str(ref)!r} is not allowed on this platform; allowed: {listed}. "
            "Ask an admin to allow another image.",
            patterns,
        )
    return str(text)


def allowed_images_from_env(env: Mapping[str, str]) -> list[str]:
    """The allowed images from ``NSML_ALLOWED_IMAGES`` (comma-separated references or
    patterns); when it is unset or blank, the platform's own images: ``NSML_NOTEBOOK_IMAGE``
    (default ``jupyter-nsml/singleuser:latest``) and ``NSML_SESSION_IMAGE`` if set."""
    raw = env.get("NSML_ALLOWED_IMAGES", "")
    listed = [p.strip() for p in raw.split(",") if p.strip()]
    if listed:
        return listed
    own = [env.get("NSML_NOTEBOOK_IMAGE") or DEFAULT_IMAGE]
    session = env.get("NSML_SESSION_IMAGE")
    if session and session not in own:
        own.append(session)
    return own


def _escape(c: str) -> str:
    """*c* for a regular expression, escaped only where it is special (``re.escape`` also
    escapes ``-``, which ECMA-262's unicode mode refuses outside a class)."""
    return "\\" + c if c in ".^$*+?()[]{}|\\" else c


def _wild(text: str, many: str, one: str) -> str:
    """*text* as a regular expression where ``*`` is *many* and ``?`` is *one*."""
    return "".join(many if c == "*" else one if c == "?" else _escape(c) for c in text)


def document_pattern(patterns: Sequence[str]) -> str:
    """A regular expression (ECMA-262 and Python alike) of the references *patterns* allow,
    for the API document: a client (or a fuzzer) reading it knows which images are accepted.

    Exact for references and for patterns whose wildcards are whole path segments or tags
    (``team/*``, ``repo:1.*``); a wildcard inside a path segment (``team/py*``) is
    approximated by Docker's path-component grammar. A pattern cannot bound the repository
    name's length: the document also gives the field a ``maxLength`` of :data:`NAME_MAX`.
    """
    any_tag = rf"(?::{_TAG})?(?:@{_DIGEST})?"
    alternatives = []
    for pattern in (p.strip() for p in patterns):
        if not pattern:
            continue
        if pattern == "*":
            return f"^{_REFERENCE.pattern}$"
        name, tag, digest = _split_pattern(pattern)
        segments = []
        for segment in name.split("/"):
            if segment == "*":
                segments.append(f"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
            else:
                segments.append(_wild(segment, rf"(?:{_SEPARATOR}?{_ALNUM})*", "[a-z0-9]"))
        text = "/".join(segments)
        if tag is None:
            text += any_tag if digest is None else ""
        elif tag == "latest" and digest is None:
            text += "(?::latest)?"
        else:
            text += ":" + _wild(tag, r"[A-Za-z0-9_.-]*", r"[A-Za-z0-9_.-]")
        if digest is not None:
            text += "@" + "".join(_escape(c) for c in digest)
        alternatives.append(text)
    if not alternatives:
        return "^(?!)$"
    return "^(?:" + "|".join(alternatives) + ")$"

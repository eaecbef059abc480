"""Which images may run: Docker's reference grammar, then the operator's allowed list."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsml_server.images import (
    NAME_MAX,
    ImageNotAllowed,
    InvalidImage,
    allowed_images_from_env,
    check_image,
    document_pattern,
    is_allowed,
    parse_reference,
)


@pytest.mark.parametrize(
    ("text", "name", "tag", "digest"),
    [
        ("jupyter-nsml/singleuser:latest", "jupyter-nsml/singleuser", "latest", None),
        ("python", "python", None, None),
        ("library/python:3.11-slim", "library/python", "3.11-slim", None),
        (
            "registry.example.org:5000/team/img:1.2",
            "registry.example.org:5000/team/img",
            "1.2",
            None,
        ),
        ("localhost/a__b/c.d-e:X_1", "localhost/a__b/c.d-e", "X_1", None),
        ("[::1]:5000/x", "[::1]:5000/x", None, None),
        ("img@sha256:" + "a" * 64, "img", None, "sha256:" + "a" * 64),
        ("img:1@sha256:" + "b" * 64, "img", "1", "sha256:" + "b" * 64),
    ],
)
def test_docker_references_are_accepted(
    text: str, name: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.name, ref.tag, ref.digest) == (name, tag, digest)
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("evil;rm -rf /", id="a shell command"),
        pytest.param("a b", id="a space"),
        pytest.param("", id="empty"),
        pytest.param("Python", id="uppercase repository"),
        pytest.param("-a", id="leading dash"),
        pytest.param("a//b", id="empty path component"),
        pytest.param("a:b:c", id="two tags"),
        pytest.param("a:" + "t" * 129, id="tag too long"),
        pytest.param("a@sha256:abc", id="short digest"),
        pytest.param("$(reboot)", id="command substitution"),
        pytest.param("img\n", id="a newline"),
        pytest.param("x" * 256, id="name too long"),
        pytest.param(7, id="not a string"),
    ],
)
def test_what_is_not_a_reference_is_refused_saying_the_form(text: object) -> None:
    with pytest.raises(InvalidImage) as e:
        parse_reference(text)
    assert "Docker image reference such as 'jupyter-nsml/singleuser:latest'" in e.value.message
    assert e.value.reason == "invalid_image"
    assert len(e.value.message) < 400


@pytest.mark.parametrize(
    ("image", "patterns", "allowed"),
    [
        ("jupyter-nsml/singleuser:latest", ["jupyter-nsml/singleuser:latest"], True),
        ("jupyter-nsml/singleuser", ["jupyter-nsml/singleuser:latest"], True),  # latest implied
        ("jupyter-nsml/singleuser:2", ["jupyter-nsml/singleuser:latest"], False),
        ("jupyter-nsml/singleuser:2", ["jupyter-nsml/singleuser"], True),  # every tag
        ("jupyter-nsml/pytorch:1", ["jupyter-nsml/*"], True),
        ("evil/jupyter-nsml:1", ["jupyter-nsml/*"], False),
        ("jupyter-nsml/x:dev-3", ["jupyter-nsml/x:dev-*"], True),
        ("jupyter-nsml/x:prod", ["jupyter-nsml/x:dev-*"], False),
        ("localhost:5000/x:1", ["localhost:5000/x"], True),
        ("docker.io/library/python", ["python"], False),  # matched as written
        ("img@sha256:" + "a" * 64, ["img:latest"], False),  # a digest has no implied tag
        ("img@sha256:" + "a" * 64, ["img@sha256:" + "a" * 64], True),
        ("anything/else:1", ["*"], True),
        ("anything/else:1", [], False),
    ],
)
def test_allowed_images_and_patterns(image: str, patterns: list[str], allowed: bool) -> None:
    assert is_allowed(parse_reference(image), patterns) is allowed


def test_a_refused_image_lists_the_allowed_ones() -> None:
    with pytest.raises(ImageNotAllowed) as e:
        check_image("evil/miner:latest", ["jupyter-nsml/singleuser:latest", "team/*"])
    assert e.value.message == (
        "The image 'evil/miner:latest' is not allowed on this platform; allowed: "
        "jupyter-nsml/singleuser:latest, team/*. Ask an admin to allow another image."
    )
    assert e.value.reason == "image_not_allowed"
    assert check_image("team/x:1", ["team/*"]) == "team/x:1"


@pytest.mark.parametrize(
    ("env", "allowed"),
    [
        pytest.param({}, ["jupyter-nsml/singleuser:latest"], id="the platform's own image"),
        pytest.param(
            {"NSML_NOTEBOOK_IMAGE": "r/nb:1", "NSML_SESSION_IMAGE": "r/run:1"},
            ["r/nb:1", "r/run:1"],
            id="the notebook and session images",
        ),
        pytest.param(
            {"NSML_ALLOWED_IMAGES": " a/*, b:1 ,", "NSML_NOTEBOOK_IMAGE": "r/nb:1"},
            ["a/*", "b:1"],
            id="the operator's list",
        ),
        pytest.param({"NSML_ALLOWED_IMAGES": " "}, ["jupyter-nsml/singleuser:latest"], id="blank"),
    ],
)
def test_the_default_list(env: dict[str, str], allowed: list[str]) -> None:
    assert allowed_images_from_env(env) == allowed


# The API document states the allowed images as a pattern: whatever matches it is accepted
# (a client, or the fuzzer, that follows the document is never refused for its image), and
# the names the operator did not allow do not match it.
DOCUMENT_CASES = [
    (
        ["jupyter-nsml/singleuser:latest"],
        ["jupyter-nsml/singleuser:latest", "jupyter-nsml/singleuser"],
        ["jupyter-nsml/singleuser:1", "evil;rm -rf /", "jupyter-nsml/other"],
    ),
    (["jupyter-nsml/*"], ["jupyter-nsml/a:1", "jupyter-nsml/a/b"], ["other/a", "jupyter-nsml/"]),
    (["python"], ["python", "python:3.11", "python@sha256:" + "a" * 64], ["pythonx", "py"]),
    (["repo:1.*"], ["repo:1.2", "repo:1."], ["repo:2", "repo"]),
    (["*"], ["a/b:c", "registry.example.org:5000/x/y:1"], ["A;b", ""]),
    ([], [], ["a", "jupyter-nsml/singleuser"]),
]


@pytest.mark.parametrize(("patterns", "matching", "not_matching"), DOCUMENT_CASES)
def test_the_documents_pattern_matches_exactly_the_allowed_names(
    patterns: list[str], matching: list[str], not_matching: list[str]
) -> None:
    rx = re.compile(document_pattern(patterns))
    for name in matching:
        assert rx.match(name) and check_image(name, patterns) == name
    for name in not_matching:
        assert not rx.match(name), name


@pytest.mark.parametrize("patterns", [c[0] for c in DOCUMENT_CASES if c[0]])
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_name_the_documents_pattern_admits_is_allowed(
    patterns: list[str], data: st.DataObject
) -> None:
    """As the document states it: the pattern, and at most NAME_MAX characters."""
    names = st.from_regex(document_pattern(patterns), fullmatch=True)
    name = data.draw(names.filter(lambda n: len(n) <= NAME_MAX))
    assert check_image(name, patterns) == name

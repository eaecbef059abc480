"""Dataset names and references, as a specification: what is accepted, what is refused and why."""

from __future__ import annotations

import pytest

from nsml_datasets import InvalidName, format_ref, parse_ref, validate_key, validate_name
from nsml_datasets.names import NAME_MAX


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("mnist", id="plain letters"),
        pytest.param("ImageNet-1k_v2.1", id="mixed case, digits, dash, underscore and dot"),
        pytest.param("7scenes", id="may start with a digit"),
        pytest.param("a" * NAME_MAX, id="exactly the longest name"),
    ],
)
def test_valid_names_are_returned_unchanged(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("a" * (NAME_MAX + 1), id="one character too long"),
        pytest.param(".hidden", id="starts with a dot"),
        pytest.param("..", id="parent folder"),
        pytest.param("-rf", id="starts with a dash (would read as an option)"),
        pytest.param("a/b", id="slash"),
        pytest.param("a@3", id="at sign (that is a reference, not a name)"),
        pytest.param("my data", id="space"),
        pytest.param("datä", id="non-ASCII letter"),
        pytest.param("\uff41", id="full-width letter"),
        pytest.param("a\nb", id="newline"),
        pytest.param(3, id="not a string"),
        pytest.param(None, id="None"),
    ],
)
def test_invalid_names_are_refused_showing_the_value_and_the_rule(name: object) -> None:
    with pytest.raises(InvalidName) as info:
        validate_name(name)
    assert repr(name) in str(info.value)
    assert "letters, digits" in str(info.value)
    assert info.value.reason == "invalid-name"


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        pytest.param("mnist", ("mnist", None), id="no version means the latest"),
        pytest.param("mnist@3", ("mnist", 3), id="explicit version"),
        pytest.param("a.b-c_d@120", ("a.b-c_d", 120), id="any valid name with a version"),
    ],
)
def test_references_split_into_name_and_version(ref: str, expected: tuple[str, int | None]) -> None:
    assert parse_ref(ref) == expected


@pytest.mark.parametrize(
    "ref",
    [
        pytest.param("mnist@", id="empty version"),
        pytest.param("mnist@0", id="version zero"),
        pytest.param("mnist@-1", id="negative version"),
        pytest.param("mnist@03", id="leading zero"),
        pytest.param("mnist@latest", id="a word as version"),
        pytest.param("mnist@1@2", id="two at signs"),
        pytest.param("mnist@1000000000", id="version over the maximum"),
        pytest.param("../x@1", id="bad name part"),
    ],
)
def test_bad_references_are_refused_showing_the_value(ref: str) -> None:
    with pytest.raises(InvalidName) as info:
        parse_ref(ref)
    assert repr(ref) in str(info.value) or repr(ref.partition("@")[0]) in str(info.value)


def test_format_ref_is_the_inverse_of_parse_ref() -> None:
    assert format_ref("mnist", 3) == "mnist@3"
    assert parse_ref(format_ref("mnist", 3)) == ("mnist", 3)
    with pytest.raises(InvalidName, match="invalid version 0"):
        format_ref("mnist", 0)
    with pytest.raises(InvalidName):
        format_ref("mnist", True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        pytest.param("mnist@3", True, id="a reference is a key"),
        pytest.param("mnist@3+test", True, id="a hidden split stored apart"),
        pytest.param("../mnist@3", False, id="a path is not a key"),
        pytest.param("mnist@3/data", False, id="slash"),
        pytest.param("", False, id="empty"),
        pytest.param("k" * 129, False, id="too long"),
    ],
)
def test_cache_keys(key: str, valid: bool) -> None:
    if valid:
        assert validate_key(key) == key
    else:
        with pytest.raises(InvalidName, match="invalid cache key"):
            validate_key(key)

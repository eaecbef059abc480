"""The common / exclusive split of session arguments: how a command line is read, and which
arguments count as differing between sessions."""

from __future__ import annotations

import pytest

from nsml_magics.argsplit import (
    MISSING,
    Value,
    parse_args,
    same,
    scalar,
    show,
    split_args,
    value_groups,
)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param([], {}, id="no arguments"),
        pytest.param(["--lr", "0.1"], {"--lr": 0.1}, id="--a b"),
        pytest.param(["--lr=0.1"], {"--lr": 0.1}, id="--a=b"),
        pytest.param(["--opt=adam"], {"--opt": "adam"}, id="--a=b with a string"),
        pytest.param(["--name=a=b"], {"--name": "a=b"}, id="--a=b keeps later equals signs"),
        pytest.param(["--note="], {"--note": ""}, id="--a= is an empty string"),
        pytest.param(["--verbose"], {"--verbose": True}, id="flag at the end"),
        pytest.param(
            ["--amp", "--lr", "1"], {"--amp": True, "--lr": 1}, id="flag followed by an option"
        ),
        pytest.param(["--amp", "--", "x"], {"--amp": True, "#1": "x"}, id="flag before --"),
        pytest.param(["-n", "3"], {"-n": 3}, id="short option with a value"),
        pytest.param(["-n", "3", "--n", "4"], {"-n": 3, "--n": 4}, id="-n and --n differ"),
        pytest.param(["--shift", "-1"], {"--shift": -1}, id="negative number is a value"),
        pytest.param(["--eps", "-1e-8"], {"--eps": -1e-8}, id="negative exponent is a value"),
        pytest.param(
            ["--layer", "64", "--layer", "32"], {"--layer": (64, 32)}, id="repeated option"
        ),
        pytest.param(["-v", "-v"], {"-v": (True, True)}, id="repeated flag"),
        pytest.param(
            ["train.csv", "--lr", "1", "out"],
            {"#1": "train.csv", "--lr": 1, "#2": "out"},
            id="positional arguments numbered in order",
        ),
        pytest.param(["-", "x"], {"#1": "-", "#2": "x"}, id="lone dash is positional"),
        pytest.param(["--", "--lr", "1"], {"#1": "--lr", "#2": 1}, id="after -- all positional"),
        pytest.param(["5"], {"#1": 5}, id="positional number"),
    ],
)
def test_parse_args(argv: list[str], expected: dict[str, Value]) -> None:
    got = parse_args(argv)
    assert got == expected
    assert list(got) == list(expected), "arguments keep the order first seen"
    for k, v in expected.items():
        assert type(got[k]) is type(v), k


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("10", 10),
        ("10.0", 10),
        ("0.1", 0.1),
        (".1", 0.1),
        ("1e-1", 0.1),
        ("1E3", 1000),
        ("-2", -2),
        ("+3", 3),
        ("adam", "adam"),
        ("1e", "1e"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("true", "true"),
        ("0x10", "0x10"),
        ("1.5.2", "1.5.2"),
        ("1e400", float("inf")),
    ],
)
def test_scalar_reads_numbers_and_leaves_words(word: str, expected: object) -> None:
    assert scalar(word) == expected
    assert type(scalar(word)) is type(expected)


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        (0.1, 0.1, True),
        (10, 10.0, True),
        (1, True, False),
        ("1", 1, False),
        (True, True, True),
        ((1, 2), (1, 2), True),
        ((1, 2), (2, 1), False),
        ((1,), 1, False),
        (MISSING, MISSING, True),
        (MISSING, True, False),
        ("adam", "sgd", False),
    ],
)
def test_same(a: object, b: object, equal: bool) -> None:
    assert same(a, b) is equal  # type: ignore[arg-type]
    assert same(b, a) is equal  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "common", "exclusive"),
    [
        pytest.param(
            {"a": ["--lr", "0.1", "--bs", "32"], "b": ["--lr", "0.01", "--bs", "32"]},
            {"--bs": 32},
            {"--lr": {"a": 0.1, "b": 0.01}},
            id="one value differs",
        ),
        pytest.param(
            {"a": ["--lr=0.1"], "b": ["--lr", "0.1"], "c": ["--lr", "1e-1"]},
            {"--lr": 0.1},
            {},
            id="--a=b, --a b and another spelling of the number are one setting",
        ),
        pytest.param(
            {"a": ["--epochs", "10"], "b": ["--epochs", "10.0"]},
            {"--epochs": 10},
            {},
            id="10 and 10.0 are the same number",
        ),
        pytest.param(
            {"a": ["--seed", "1"], "b": ["--seed", "01x"]},
            {},
            {"--seed": {"a": 1, "b": "01x"}},
            id="a number and a string differ",
        ),
        pytest.param(
            {"a": ["--amp", "--lr", "1"], "b": ["--lr", "1"]},
            {"--lr": 1},
            {"--amp": {"a": True, "b": MISSING}},
            id="a flag present in only one session",
        ),
        pytest.param(
            {"a": ["--layer", "64", "--layer", "32"], "b": ["--layer", "64"]},
            {},
            {"--layer": {"a": (64, 32), "b": 64}},
            id="a repeated option differs from a single one",
        ),
        pytest.param(
            {"a": ["data.csv", "--lr", "1"], "b": ["other.csv", "--lr", "1"]},
            {"--lr": 1},
            {"#1": {"a": "data.csv", "b": "other.csv"}},
            id="positional arguments compared by position",
        ),
        pytest.param(
            {"a": [], "b": ["--lr", "1"], "c": []},
            {},
            {"--lr": {"a": MISSING, "b": 1, "c": MISSING}},
            id="missing arguments are marked missing",
        ),
        pytest.param(
            {"a": ["--x", "1", "--y", "2"]},
            {"--x": 1, "--y": 2},
            {},
            id="one session: everything is common",
        ),
        pytest.param({"a": [], "b": []}, {}, {}, id="no arguments anywhere"),
    ],
)
def test_split_args(
    args: dict[str, list[str]], common: dict[str, Value], exclusive: dict[str, object]
) -> None:
    split = split_args(args)
    assert split.sessions == tuple(args)
    assert split.common == common
    assert set(split.exclusive) == set(exclusive)
    for arg, cells in exclusive.items():
        assert list(split.exclusive[arg]) == list(args), "one cell per session, in order"
        for s, v in cells.items():  # type: ignore[attr-defined]
            assert same(split.exclusive[arg][s], v), (arg, s)
    assert not set(split.common) & set(split.exclusive)


def test_split_keeps_the_order_arguments_are_first_seen() -> None:
    split = split_args({"a": ["--b", "1", "--a", "1"], "b": ["--c", "1", "--b", "2"]})
    assert list(split.exclusive) == ["--b", "--a", "--c"]
    assert split.cell("--a", "b") is MISSING


@pytest.mark.parametrize(
    ("value", "text"),
    [(MISSING, "—"), (True, "✓"), (0.001, "0.001"), ((64, 32), "64 32"), ("adam", "adam")],
)
def test_show(value: object, text: str) -> None:
    assert show(value) == text  # type: ignore[arg-type]


def test_value_groups_colour_sessions_by_an_argument() -> None:
    split = split_args(
        {"a": ["--opt", "adam"], "b": ["--opt", "sgd"], "c": ["--opt", "adam"], "d": []}
    )
    assert value_groups(split, "--opt") == {"adam": ["a", "c"], "sgd": ["b"], "—": ["d"]}

"""Leaderboard metrics against hand-computed values, and the files they read."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsml_server.scoring import (
    METRICS,
    ScoringError,
    align,
    get_metric,
    parse_table,
    score,
    score_parts,
)

# (metric, labels, predictions, expected) — each worked out by hand in the comment.
CASES = [
    # 3 of 4 right.
    ("accuracy", ["a", "b", "a", "c"], ["a", "a", "a", "c"], 3 / 4),
    # "1", "1.0" and "01" name the same class.
    ("accuracy", ["1", "0", "2"], ["1.0", "00", "3"], 2 / 3),
    # One class only, all right.
    ("accuracy", ["a", "a"], ["a", "a"], 1.0),
    # a: tp 1, fp 0, fn 1 -> 2/3; b: tp 2, fp 1, fn 0 -> 4/5; mean 11/15.
    ("macro_f1", ["a", "a", "b", "b"], ["a", "b", "b", "b"], 11 / 15),
    # One class in the labels, all right: F1 of "a" is 1.
    ("macro_f1", ["a", "a"], ["a", "a"], 1.0),
    # One class in the labels, "b" only predicted: a -> 2/3, b -> 0; mean 1/3.
    ("macro_f1", ["a", "a"], ["a", "b"], 1 / 3),
    # Nothing right: every class's F1 is 0.
    ("macro_f1", ["a", "b"], ["b", "a"], 0.0),
    # Squared errors 0, 1, 4.
    ("mse", ["1", "2", "3"], ["1", "3", "5"], 5 / 3),
    ("rmse", ["1", "2", "3"], ["1", "3", "5"], math.sqrt(5 / 3)),
    # Absolute errors 0, 1, 2.
    ("mae", ["1", "2", "3"], ["1", "3", "5"], 1.0),
    ("mae", ["-1.5"], ["1.5"], 3.0),
    # scikit-learn's documented example: pairs (pos, neg) ordered right 3 of 4.
    ("roc_auc", ["0", "0", "1", "1"], ["0.1", "0.4", "0.35", "0.8"], 0.75),
    # A tie counts one half.
    ("roc_auc", ["0", "1"], ["0.5", "0.5"], 0.5),
    # Perfect and reversed rankings; labels may be words.
    ("roc_auc", ["false", "true", "true"], ["0", "2", "1"], 1.0),
    ("roc_auc", ["1", "0"], ["0", "1"], 0.0),
    # Positives 0.9 and 0.5 against negatives 0.5 and 0.1: 1 + 1 + 0.5 + 1 of 4.
    ("roc_auc", ["1", "1", "0", "0"], ["0.9", "0.5", "0.5", "0.1"], 3.5 / 4),
]


@pytest.mark.parametrize(("metric", "labels", "predictions", "expected"), CASES)
def test_metric_values(
    metric: str, labels: list[str], predictions: list[str], expected: float
) -> None:
    assert get_metric(metric).compute(labels, predictions) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("metric", "labels", "predictions", "message"),
    [
        ("mse", ["1", "2"], ["1", "nan"], "prediction 2 is 'nan'; it must be a finite number"),
        ("mae", ["1"], ["inf"], "prediction 1 is 'inf'; it must be a finite number"),
        ("rmse", ["1"], ["cat"], "prediction 1 is 'cat', not a number"),
        ("roc_auc", ["0", "1"], ["0.2", "NaN"], "prediction 2 is 'NaN'"),
        ("accuracy", ["a", "b"], ["a", "nan"], "prediction 2 is 'nan'; it must name a class"),
        ("macro_f1", ["a"], [""], "prediction 1 is ''; it must name a class"),
        ("accuracy", ["a", "b"], ["a"], "expected 2 predictions, got 1"),
        ("mse", ["1"], ["1", "2"], "expected 1 predictions, got 2"),
        ("accuracy", [], [], "the test set is empty"),
        ("roc_auc", ["1", "1"], ["0.2", "0.3"], "undefined when every label is 1"),
        ("roc_auc", ["0", "0"], ["0.2", "0.3"], "undefined when every label is 0"),
        ("roc_auc", ["0", "2"], ["0.2", "0.3"], "label 2 is (hidden); roc_auc needs labels 0"),
        ("mse", ["1", "x"], ["1", "2"], "label 2 is (hidden), not a number"),
    ],
)
def test_values_that_cannot_be_scored_say_which(
    metric: str, labels: list[str], predictions: list[str], message: str
) -> None:
    with pytest.raises(ScoringError) as e:
        get_metric(metric).compute(labels, predictions)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_every_metric_knows_its_order() -> None:
    order = {name: m.higher_is_better for name, m in METRICS.items()}
    assert order == {
        "accuracy": True,
        "macro_f1": True,
        "roc_auc": True,
        "mse": False,
        "rmse": False,
        "mae": False,
    }


def test_an_unknown_metric_lists_the_built_in_ones() -> None:
    with pytest.raises(ScoringError) as e:
        get_metric("f2")
    assert str(e.value) == (
        "no built-in metric 'f2'; choose one of accuracy, macro_f1, mae, mse, rmse, roc_auc"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the labels file is empty; write a header 'id,label'"),
        ("name,label\na,1\n", "header is 'name,label'; it must be 'id,label'"),
        ("id,label,extra\n", "header is 'id,label,extra'"),
        ("id,label\na,1\nb\n", "line 3 has 1 fields; it must have 2"),
        ("id,label\na,1\na,2\n", "names id 'a' twice (line 3)"),
        ("id,label\n ,1\n", "line 2 has an empty id"),
    ],
)
def test_malformed_files_are_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(ScoringError) as e:
        parse_table(text, "label", "labels")
    assert message in str(e.value)


def test_files_are_read_with_headers_in_any_case_and_blank_lines_skipped() -> None:
    assert parse_table("ID,Label\r\na, 1\r\n\r\nb,x y\r\n", "label", "labels") == {
        "a": "1",
        "b": "x y",
    }


def test_missing_and_unknown_ids_are_named() -> None:
    labels = {str(i): "0" for i in range(8)}
    preds = {str(i): "0" for i in range(1, 8)} | {"x": "1"}
    with pytest.raises(ScoringError) as e:
        align(labels, preds)
    assert str(e.value) == (
        "expected 8 predictions, got 8; missing ids: 0; ids not in the test set: x"
    )
    many = {str(i): "0" for i in range(2)}
    with pytest.raises(ScoringError, match=r"missing ids: 2, 3, 4, 5, 6 and 1 more"):
        align(labels, many)


def test_predictions_are_aligned_by_id_not_by_line() -> None:
    labels = "id,label\na,1\nb,0\nc,1\n"
    predictions = "id,prediction\nc,1\na,1\nb,1\n"
    assert score("accuracy", labels, predictions) == pytest.approx(2 / 3)
    assert score("roc_auc", labels, "id,prediction\nb,0.1\nc,0.7\na,0.9\n") == 1.0


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(min_value=-5, max_value=5)), min_size=2, max_size=40
    ).filter(lambda rows: len({label for label, _ in rows}) == 2)
)
def test_roc_auc_is_the_share_of_rightly_ordered_pairs(rows: list[tuple[bool, int]]) -> None:
    """The rank formula against the definition: every (positive, negative) pair counted."""
    pos = [s for label, s in rows if label]
    neg = [s for label, s in rows if not label]
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    labels = ["1" if label else "0" for label, _ in rows]
    scores = [str(s) for _, s in rows]
    assert get_metric("roc_auc").compute(labels, scores) == pytest.approx(
        pairs / (len(pos) * len(neg))
    )


def test_public_and_private_parts_are_scored_apart_and_both_must_be_predicted() -> None:
    public = "id,label\na,1\nb,0\n"
    private = "id,label\nc,1\nd,1\n"
    predictions = "id,prediction\nd,0\nc,1\nb,0\na,1\n"
    assert score_parts("accuracy", predictions, public, private) == (1.0, 0.5)
    assert score_parts("accuracy", "id,prediction\na,1\nb,1\n", public) == (0.5, None)
    with pytest.raises(ScoringError, match="missing ids: c, d"):
        score_parts("accuracy", "id,prediction\na,1\nb,1\n", public, private)
    with pytest.raises(ScoringError, match="name the same ids"):
        score_parts("accuracy", predictions, public, "id,label\na,1\n")


def test_the_clients_list_of_built_in_metrics_is_the_servers() -> None:
    from nsml.datasets import BUILTIN_METRIC_ORDER

    assert BUILTIN_METRIC_ORDER == {n: m.higher_is_better for n, m in METRICS.items()}

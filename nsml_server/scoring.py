"""Leaderboard metrics and the prediction and label formats they read. Pure: no I/O.

A dataset's hidden test split holds test *inputs* and a *labels* file; an evaluation writes a
*predictions* file; the scorer, which runs apart from user code, reads both and computes the
dataset's metric. Both files are CSV with a header row and two columns::

    id,label            id,prediction
    img-0001,cat        img-0001,cat
    img-0002,dog        img-0002,cat

``id`` is the input's name (a file's path relative to the test inputs folder, or whatever the
dataset owner chose); ids are unique. Regression metrics read numbers; ``roc_auc`` reads labels
``0``/``1`` (or ``false``/``true``) and a score per id, higher meaning more likely ``1``.

Every metric knows whether higher is better. A file that cannot be scored raises
:class:`ScoringError` with one line saying what is wrong and, where it helps, which ids.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "METRICS",
    "Metric",
    "ScoringError",
    "align",
    "check_coverage",
    "get_metric",
    "parse_score",
    "parse_table",
    "score",
    "score_parts",
]

#: The most ids an error message lists before "and N more".
_SHOW = 5


class ScoringError(ValueError):
    """Predictions or labels that cannot be scored; the message is one line for the user."""


@dataclass(frozen=True)
class Metric:
    """A built-in metric: its name, order, what its values are and how it is computed."""

    name: str
    higher_is_better: bool
    #: "class": labels and predictions compared as classes; "number": both numbers;
    #: "score": binary labels and a real-valued score per id.
    kind: str
    compute: Callable[[Sequence[object], Sequence[object]], float]
    description: str


def _ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_SHOW])
    return shown + (f" and {len(ids) - _SHOW} more" if len(ids) > _SHOW else "")


def parse_table(text: str, value_column: str, what: str) -> dict[str, str]:
    """Parse an ``id,<value_column>`` CSV into ``{id: value}`` (values stripped, as text).

    Raises:
        ScoringError: no header or a wrong one, a row without two fields, an empty id,
            a repeated id.
    """
    rows = csv.reader(io.StringIO(text))
    try:
        header = [h.strip().lower() for h in next(rows)]
    except StopIteration:
        raise ScoringError(
            f"the {what} file is empty; write a header 'id,{value_column}'"
        ) from None
    except csv.Error as e:
        raise ScoringError(f"the {what} file is not CSV: {e}") from None
    if header[:2] != ["id", value_column] or len(header) != 2:
        raise ScoringError(
            f"the {what} file's header is {','.join(header)!r}; it must be 'id,{value_column}'"
        )
    out: dict[str, str] = {}
    try:
        for n, row in enumerate(rows, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 2:
                raise ScoringError(
                    f"the {what} file's line {n} has {len(row)} fields; it must have 2 (id and "
                    f"{value_column})"
                )
            key, value = row[0].strip(), row[1].strip()
            if not key:
                raise ScoringError(f"the {what} file's line {n} has an empty id")
            if key in out:
                raise ScoringError(f"the {what} file names id {key!r} twice (line {n})")
            out[key] = value
    except csv.Error as e:
        raise ScoringError(f"the {what} file is not CSV: {e}") from None
    return out


def align(labels: Mapping[str, str], predictions: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Labels and predictions in the same id order (the labels' order).

    Raises:
        ScoringError: the predictions miss ids or name ids that are not in the test set.
    """
    missing = [k for k in labels if k not in predictions]
    extra = [k for k in predictions if k not in labels]
    if missing or extra:
        parts = [f"expected {len(labels)} predictions, got {len(predictions)}"]
        if missing:
            parts.append(f"missing ids: {_ids(missing)}")
        if extra:
            parts.append(f"ids not in the test set: {_ids(extra)}")
        raise ScoringError("; ".join(parts))
    order = list(labels)
    return [labels[k] for k in order], [predictions[k] for k in order]


def _shown(value: object, what: str) -> str:
    """How a refusal names a value: a prediction's is shown; a label's never is (the
    submitter reads the message, and labels are secret)."""
    return repr(value) if what != "label" else "(hidden)"


def _number(value: object, what: str, index: int) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ScoringError(f"{what} {index + 1} is {_shown(value, what)}, not a number") from None
    if not math.isfinite(x):
        raise ScoringError(
            f"{what} {index + 1} is {_shown(value, what)}; it must be a finite number"
        )
    return x


def _numbers(values: Sequence[object], what: str) -> list[float]:
    return [_number(v, what, i) for i, v in enumerate(values)]


def _class(value: object) -> str:
    """A class label as compared: text stripped; ``1``, ``1.0`` and ``01`` are the same class."""
    text = str(value).strip()
    try:
        x = float(text)
    except ValueError:
        return text
    if math.isfinite(x) and x == int(x):
        return str(int(x))
    return text


def _classes(values: Sequence[object], what: str) -> list[str]:
    out = [_class(v) for v in values]
    for i, c in enumerate(out):
        if c == "" or c.lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
            raise ScoringError(f"{what} {i + 1} is {_shown(values[i], what)}; it must name a class")
    return out


def _check_lengths(y_true: Sequence[object], y_pred: Sequence[object]) -> None:
    if len(y_true) != len(y_pred):
        raise ScoringError(f"expected {len(y_true)} predictions, got {len(y_pred)}")
    if not y_true:
        raise ScoringError("the test set is empty: there is nothing to score")


def accuracy(y_true: Sequence[object], y_pred: Sequence[object]) -> float:
    """The share of predictions equal to their label."""
    _check_lengths(y_true, y_pred)
    t, p = _classes(y_true, "label"), _classes(y_pred, "prediction")
    return sum(a == b for a, b in zip(t, p, strict=True)) / len(t)


def macro_f1(y_true: Sequence[object], y_pred: Sequence[object]) -> float:
    """The unweighted mean of each class's F1 over every class in the labels or predictions.

    A class with no true positive has F1 0 (as scikit-learn's ``zero_division=0``).
    """
    _check_lengths(y_true, y_pred)
    t, p = _classes(y_true, "label"), _classes(y_pred, "prediction")
    classes = sorted(set(t) | set(p))
    total = 0.0
    for c in classes:
        tp = sum(a == c and b == c for a, b in zip(t, p, strict=True))
        fp = sum(a != c and b == c for a, b in zip(t, p, strict=True))
        fn = sum(a == c and b != c for a, b in zip(t, p, strict=True))
        total += 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
    return total / len(classes)


def mse(y_true: Sequence[object], y_pred: Sequence[object]) -> float:
    """The mean squared error."""
    _check_lengths(y_true, y_pred)
    t, p = _numbers(y_true, "label"), _numbers(y_pred, "prediction")
    return math.fsum((a - b) ** 2 for a, b in zip(t, p, strict=True)) / len(t)


def rmse(y_true: Sequence[object], y_pred: Sequence[object]) -> float:
    """The square root of the mean squared error."""
    return math.sqrt(mse(y_true, y_pred))


def mae(y_true: Sequence[object], y_pred: Sequence[object]) -> float:
    """The mean absolute error."""
    _check_lengths(y_true, y_pred)
    t, p = _numbers(y_true, "label"), _numbers(y_pred, "prediction")
    return math.fsum(abs(a - b) for a, b in zip(t, p, strict=True)) / len(t)


_TRUE = {"1", "true", "yes", "positive"}
_FALSE = {"0", "false", "no", "negative"}


def _binary(values: Sequence[object]) -> list[bool]:
    out = []
    for i, v in enumerate(values):
        c = _class(v).lower()
        if c in _TRUE:
            out.append(True)
        elif c in _FALSE:
            out.append(False)
        else:
            raise ScoringError(
                f"label {i + 1} is {_shown(v, 'label')}; roc_auc needs labels 0 or 1"
            )
    return out


def roc_auc(y_true: Sequence[object], y_pred: Sequence[object]) -> float:
    """The area under the ROC curve of binary labels and real-valued scores.

    Computed as the Mann-Whitney statistic: the chance that a random positive scores above a
    random negative, ties counting one half (scikit-learn's ``roc_auc_score`` gives the same).

    Raises:
        ScoringError: the labels hold one class only (the area is then undefined).
    """
    _check_lengths(y_true, y_pred)
    t, s = _binary(y_true), _numbers(y_pred, "prediction")
    positives = sum(t)
    negatives = len(t) - positives
    if positives == 0 or negatives == 0:
        only = "1" if positives else "0"
        raise ScoringError(
            f"roc_auc is undefined when every label is {only}: the test set needs both classes"
        )
    # Average ranks (1-based) with ties sharing their mean rank.
    order = sorted(range(len(s)), key=lambda i: s[i])
    ranks = [0.0] * len(s)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and s[order[j + 1]] == s[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[order[k]] = mean_rank
        i = j + 1
    rank_sum = math.fsum(r for r, positive in zip(ranks, t, strict=True) if positive)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("accuracy", True, "class", accuracy, "share of predictions equal to the label"),
        Metric("macro_f1", True, "class", macro_f1, "mean F1 over classes, each weighing the same"),
        Metric("mse", False, "number", mse, "mean squared error"),
        Metric("rmse", False, "number", rmse, "root mean squared error"),
        Metric("mae", False, "number", mae, "mean absolute error"),
        Metric("roc_auc", True, "score", roc_auc, "area under the ROC curve (binary labels 0/1)"),
    )
}


def get_metric(name: str) -> Metric:
    """The built-in metric *name*.

    Raises:
        ScoringError: no such metric (the message lists the built-in ones).
    """
    try:
        return METRICS[name]
    except KeyError:
        raise ScoringError(
            f"no built-in metric {name!r}; choose one of {', '.join(sorted(METRICS))}"
        ) from None


def score(metric: str, labels_csv: str, predictions_csv: str) -> float:
    """Score a predictions file against a labels file with the built-in *metric*.

    Raises:
        ScoringError: an unknown metric, a malformed file, missing or extra ids, a value the
            metric cannot use.
    """
    m = get_metric(metric)
    labels = parse_table(labels_csv, "label", "labels")
    predictions = parse_table(predictions_csv, "prediction", "predictions")
    y_true, y_pred = align(labels, predictions)
    return m.compute(y_true, y_pred)


def parse_score(stdout: str) -> float:
    """The score a custom scoring script printed: the last non-empty line, a finite number.

    Raises:
        ScoringError: no such line (the message never quotes the output: it may hold labels).
    """
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    try:
        value = float(lines[-1]) if lines else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ScoringError(
            "the dataset's scoring script did not print a finite number on its last line; "
            "its owner must fix it"
        )
    return value


def _parts(
    predictions_csv: str, labels_csv: str, private_labels_csv: str | None
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Predictions, public and private labels parsed, the predictions covering exactly the
    ids of both parts."""
    predictions = parse_table(predictions_csv, "prediction", "predictions")
    public = parse_table(labels_csv, "label", "labels")
    private = (
        parse_table(private_labels_csv, "label", "private labels")
        if private_labels_csv is not None
        else {}
    )
    if public.keys() & private.keys():
        raise ScoringError(
            "the public and private labels name the same ids; the owner must fix them"
        )
    align(public | private, predictions)
    return predictions, public, private


def check_coverage(
    predictions_csv: str, labels_csv: str, private_labels_csv: str | None = None
) -> None:
    """Check that the predictions name exactly the ids of both parts (as :func:`score_parts`).

    Raises:
        ScoringError: a malformed file, missing or extra ids, ids in both parts.
    """
    _parts(predictions_csv, labels_csv, private_labels_csv)


def score_parts(
    metric: str,
    predictions_csv: str,
    labels_csv: str,
    private_labels_csv: str | None = None,
) -> tuple[float, float | None]:
    """The public and private scores of a predictions file (private None without a part).

    The predictions cover every id of both parts, no more; each part is scored on its own ids.

    Raises:
        ScoringError: as :func:`score`; also when both parts name one id.
    """
    m = get_metric(metric)
    predictions, public, private = _parts(predictions_csv, labels_csv, private_labels_csv)
    public_score = m.compute(*align(public, {k: predictions[k] for k in public}))
    if not private:
        return public_score, None
    return public_score, m.compute(*align(private, {k: predictions[k] for k in private}))

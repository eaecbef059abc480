"""The SDK's evaluation mode: bind loads the submitted checkpoint, runs infer, writes the
predictions and ends the program before training starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nsml.sdk import prediction_rows

SCRIPT = """
import os, sys
import nsml

state = {}

def load(folder):
    state["w"] = float(open(os.path.join(folder, "w.txt")).read())

def save(folder):
    raise AssertionError("an evaluation never saves")

def infer(path):
    %s

nsml.bind(save=save, load=load, infer=infer)
print("TRAINING STARTED")
"""


def evaluate(tmp_path: Path, infer_body: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "w.txt").write_text("2.5")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, x in (("a.txt", "1"), ("b.txt", "4")):
        (inputs / name).write_text(x)
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "main.py"
    script.write_text(SCRIPT % textwrap.indent(infer_body, "    ").strip())
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSML_")} | {
        "NSML_EVALUATION": "1",
        "NSML_CHECKPOINT": str(tmp_path / "ckpt"),
        "NSML_TEST_PATH": str(inputs),
        "NSML_PREDICTIONS": str(out / "predictions.csv"),
    }
    r = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    return r, out / "predictions.csv"


def test_bind_loads_the_checkpoint_runs_infer_writes_predictions_and_ends(
    tmp_path: Path,
) -> None:
    r, predictions = evaluate(
        tmp_path,
        "return {n: float(open(os.path.join(path, n)).read()) * state['w'] "
        "for n in sorted(os.listdir(path))}",
    )
    assert r.returncode == 0, r.stderr
    assert predictions.read_bytes() == b"id,prediction\r\na.txt,2.5\r\nb.txt,10.0\r\n"
    assert "TRAINING STARTED" not in r.stdout
    assert "[nsml] evaluation: 2 predictions written" in r.stdout
    assert not list(predictions.parent.glob("*.partial"))


def test_a_crashing_infer_fails_with_its_traceback_and_writes_nothing(tmp_path: Path) -> None:
    r, predictions = evaluate(tmp_path, "raise ValueError('shape mismatch in layer 3')")
    assert r.returncode == 1
    assert "ValueError: shape mismatch in layer 3" in r.stderr
    assert not predictions.exists()
    assert "TRAINING STARTED" not in r.stdout


def test_infer_returning_something_else_is_refused_by_name(tmp_path: Path) -> None:
    r, predictions = evaluate(tmp_path, "return 42")
    assert r.returncode == 1
    assert "infer must return {id: prediction} or (id, prediction) pairs, not int" in r.stderr
    assert not predictions.exists()


@pytest.mark.parametrize(
    ("returned", "rows"),
    [
        ({"a": 1, "b": 0.5}, [("a", "1"), ("b", "0.5")]),
        ([("a", "cat"), ("b", True)], [("a", "cat"), ("b", "1")]),
        (iter([(1, 2.0)]), [("1", "2.0")]),
        ({}, []),
    ],
)
def test_prediction_rows(returned: object, rows: list[tuple[str, str]]) -> None:
    assert prediction_rows(returned) == rows


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ("abc", "not str"),
        (None, "not NoneType"),
        ([("a",)], "infer's item 0 is ('a',); give (id, prediction) pairs"),
        ({"a": [1, 2]}, "the prediction for id 'a' is a list"),
    ],
)
def test_prediction_rows_refuse_what_is_not_a_prediction(returned: object, message: str) -> None:
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prediction_rows(returned)

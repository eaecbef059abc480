"""Report points on the server: non-finite values kept and shown as strings, a retried batch
stored once, and points for an ended session refused unless measured before its end."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from nsml_server import sessions as sessions_module
from nsml_server.db import Database, check_schema
from nsml_server.models import SessionMetricChunk, TrainingSession
from nsml_server.schemas import MetricsOut
from nsml_server.sessions import (
    SessionError,
    create_session,
    decode_arrays,
    decode_chunk,
    encode_arrays,
    ingest_points,
    metric_series,
    metric_series_many,
    parse_columns,
    session_out,
)

NOW = datetime(2026, 1, 1, 12, 0, 0)


def epoch(t: datetime) -> float:
    return t.replace(tzinfo=UTC).timestamp()


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    check_schema(d.engine, d.url)
    yield d
    d.dispose()


def new_session(s: Session, state: str = "running") -> TrainingSession:
    row = create_session(
        s,
        user="u",
        datasets=[],
        values={"code_digest": "0" * 64, "entry": "t.py", "image": "i", "resources": {}},
        now=NOW,
    )
    row.state = state
    s.flush()
    return row


def post(s: Session, row: TrainingSession, body: str) -> Any:
    s.refresh(row)
    return ingest_points(s, row, json.loads(body), NOW, body)


def no_nan_tokens(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"{token} is not valid JSON (JSON.parse refuses it)")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        pytest.param('"nan"', "nan", id="the string nan"),
        pytest.param('"inf"', "inf", id="the string inf"),
        pytest.param('"-inf"', "-inf", id="the string -inf"),
        pytest.param("NaN", "nan", id="Python's NaN token"),
        pytest.param("Infinity", "inf", id="Python's Infinity token"),
        pytest.param("-Infinity", "-inf", id="Python's -Infinity token"),
        pytest.param("1e400", "inf", id="an overflowing number"),
        pytest.param("0.25", 0.25, id="a number"),
    ],
)
def test_a_non_finite_value_is_kept_and_shown_as_a_string_in_valid_json(
    db: Database, sent: str, shown: Any
) -> None:
    with db.session() as s:
        row = new_session(s)
        post(s, row, f'{{"steps":[0,1],"walls":[1.0,2.0],"values":{{"loss":[1.5,{sent}]}}}}')
        s.refresh(row)
        assert row.last_metrics == {"loss": shown}
        out = MetricsOut(
            session=row.name,
            last_step=row.last_step,
            last_metrics=dict(row.last_metrics),
            points=row.points,
            series=metric_series(s, row),
        ).model_dump_json()
        data = no_nan_tokens(out)
        assert data["last_metrics"] == {"loss": shown}
        assert data["series"]["loss"]["values"] == [1.5, shown]
        listed = no_nan_tokens(session_out(s, row, NOW).model_dump_json())
        assert listed["last_metrics"] == {"loss": shown}


def test_a_value_that_is_no_number_is_still_refused() -> None:
    with pytest.raises(SessionError) as e:
        parse_columns({"steps": [0], "walls": [1.0], "values": {"x": ["high"]}})
    assert e.value.status == 400 and "not a number" in e.value.message


def test_a_batch_retried_after_its_answer_was_lost_is_stored_once(db: Database) -> None:
    body = '{"batch":"123-ab/7","steps":[0,1,2],"walls":[1.0,2.0,3.0],"values":{"l":[3,2,1]}}'
    with db.session() as s:
        row = new_session(s)
        first = post(s, row, body)
        again = post(s, row, body)
        assert (first.accepted, first.duplicate) == (3, False)
        assert (again.accepted, again.duplicate) == (3, True)
        # The same steps under another id are other points (e.g. another process).
        other = post(s, row, body.replace("123-ab/7", "456-cd/1"))
        assert not other.duplicate
        s.refresh(row)
        assert row.points == 6
        assert metric_series(s, row)["l"].steps == [0, 1, 2, 0, 1, 2]


def test_a_batch_that_two_servers_take_at_once_is_stored_once(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both look before either has written: the database's unique batch id decides."""
    body = '{"batch":"race-1","steps":[0,1],"walls":[1.0,2.0],"values":{"l":[2,1]}}'
    with db.session() as s:
        row = new_session(s)
        assert not post(s, row, body).duplicate
    monkeypatch.setattr(sessions_module, "_stored_batch", lambda *a: False)
    with db.session() as s:
        row = s.get(TrainingSession, row.id)
        assert row is not None
        assert post(s, row, body).duplicate
        s.refresh(row)
        assert row.points == 2 and metric_series(s, row)["l"].steps == [0, 1]


@pytest.mark.parametrize(
    ("walls_after_end_s", "stored"),
    [
        pytest.param(-5.0, True, id="measured before the end: sent late, stored"),
        pytest.param(0.0, True, id="measured at the end: stored"),
        pytest.param(1.0, False, id="measured after the end: 409"),
    ],
)
def test_an_ended_session_takes_only_points_measured_before_its_end(
    db: Database, walls_after_end_s: float, stored: bool
) -> None:
    end = NOW + timedelta(minutes=5)
    wall = epoch(end) + walls_after_end_s
    body = json.dumps({"steps": [0], "walls": [wall], "values": {"loss": [1.0]}})
    with db.session() as s:
        row = new_session(s, "completed")
        row.finished = end
        s.flush()
        if stored:
            assert post(s, row, body).accepted == 1
        else:
            with pytest.raises(SessionError) as e:
                post(s, row, body)
            assert e.value.status == 409 and e.value.reason == "session_ended"
            assert f"Session {row.name} has ended (completed)" in e.value.message
            s.refresh(row)
            assert row.points == 0


def test_an_ended_session_answers_a_repeat_of_a_batch_it_stored_while_running(
    db: Database,
) -> None:
    body = '{"batch":"9-x/1","steps":[4],"walls":[1.0],"values":{"loss":[0.5]}}'
    with db.session() as s:
        row = new_session(s)
        post(s, row, body)
        row.state, row.finished = "stopped", NOW
        s.flush()
        assert post(s, row, body).duplicate
        late = body.replace("9-x/1", "9-x/2").replace("[1.0]", f"[{epoch(NOW) + 60}]")
        with pytest.raises(SessionError):
            post(s, row, late)


def test_rows_carry_a_batch_id_too(db: Database) -> None:
    with db.session() as s:
        row = new_session(s)
        body = {"batch": "r/1", "points": [[None, 1.0, {"x": float("inf")}]]}
        assert ingest_points(s, row, body, NOW).accepted == 1
        s.refresh(row)
        assert ingest_points(s, row, body, NOW).duplicate
        assert row.last_metrics == {"x": "inf"} and math.isinf(float(row.last_metrics["x"]))


def test_nan_and_inf_read_as_such_in_status_and_the_notebook_status_line() -> None:
    from nsml.cli_session import status_text
    from nsml_magics.status import render_status

    st = {
        "name": "u/_/1",
        "state": "running",
        "entry": "t.py",
        "args": [],
        "image": "i",
        "resources": {"gpus": 0, "cpu": 1, "memory_mib": 512},
        "datasets": [],
        "node": "n",
        "gpu_ids": [],
        "exit_code": None,
        "created": "2026-01-01T00:00:00Z",
        "started": None,
        "finished": None,
        "last_step": 9,
        "last_metrics": {"loss": "nan", "grad": "inf", "score": "-inf", "acc": 0.5},
    }
    assert "step 9: loss=nan grad=inf score=-inf acc=0.5" in status_text(st)
    html = render_status(st)
    for text in ("loss nan", "grad inf", "score -inf"):
        assert text in html, html


def test_a_series_is_downsampled_to_the_asked_points_keeping_its_nan_and_extremes(
    db: Database,
) -> None:
    n = 5_000
    loss: list[Any] = [1.0 / (1 + i) for i in range(n)]
    loss[1234], loss[4000], loss[4500] = "nan", 99.0, "-inf"
    body = json.dumps(
        {"steps": list(range(n)), "walls": [float(i) for i in range(n)], "values": {"l": loss}}
    )
    with db.session() as s:
        row = new_session(s)
        post(s, row, body)
        thin = metric_series(s, row, max_points=200)["l"]
        assert thin.total == n and len(thin.steps) <= 200
        assert len(thin.steps) == len(thin.values) == len(thin.walls)
        kept = dict(zip(thin.steps, thin.values, strict=True))
        assert kept[1234] == "nan" and kept[4000] == 99.0 and kept[4500] == "-inf"
        assert thin.steps[0] == 0 and thin.steps[-1] == n - 1
        full = metric_series(s, row)["l"]
        assert full.total == n and len(full.steps) == n


def test_a_zoomed_range_gets_its_exact_points(db: Database) -> None:
    with db.session() as s:
        row = new_session(s)
        for k in range(3):  # three chunks: steps 0-99, 100-199, 200-299
            steps = list(range(100 * k, 100 * k + 100))
            post(s, row, json.dumps({"steps": steps, "walls": [0.0] * 100, "values": {"l": steps}}))
        zoom = metric_series(s, row, since_step=140, to_step=159, max_points=1000)["l"]
        assert zoom.steps == list(range(140, 160)) and zoom.values == list(range(140, 160))
        assert zoom.total == 20
        thin = metric_series(s, row, since_step=0, to_step=299, max_points=10)["l"]
        assert thin.total == 300 and len(thin.steps) <= 10


def test_many_sessions_series_in_one_query_are_each_ones_own(db: Database) -> None:
    with db.session() as s:
        rows = [new_session(s) for _ in range(3)]
        for k, row in enumerate(rows[:2]):
            for c in range(2):  # two chunks each, interleaved between the sessions
                steps = list(range(50 * c, 50 * c + 50))
                values = {"l": [float(k * 1000 + v) for v in steps], "m": [1.0] * 50}
                post(s, row, json.dumps({"steps": steps, "walls": [0.0] * 50, "values": values}))
        many = metric_series_many(s, [r.id for r in rows], ["l"], 10, to_step=89, max_points=20)
        assert set(many) == {r.id for r in rows} and many[rows[2].id] == {}
        for row in rows[:2]:
            one = metric_series(s, row, ["l"], 10, to_step=89, max_points=20)
            assert list(many[row.id]) == ["l"] and many[row.id] == one
            assert one["l"].total == 80 and len(one["l"].steps) <= 20
        assert many[rows[1].id]["l"].values[0] == 1010.0


def test_arrays_of_a_batch_read_back_as_its_json_does() -> None:
    cols = parse_columns(
        {
            "steps": [0, 1, 2, 2**62 - 1],
            "walls": [1.5, 2.5, 3.5, 4.5],
            "values": {"loss": [1.0, "nan", "-inf", 3], "acc": [None, 0.5, None, 1], "e": [7] * 4},
        }
    )
    blob = encode_arrays(cols)
    got, want = decode_arrays(blob), decode_chunk(cols.to_json())
    assert got.steps.tolist() == want.steps.tolist() == [0, 1, 2, 2**62 - 1]
    assert got.walls.tolist() == want.walls.tolist()
    assert set(got.values) == set(want.values) == {"loss", "acc", "e"}
    for name, (present, values) in want.values.items():
        g_present, g_values = got.values[name]
        assert (present is None) == (g_present is None), name
        if present is not None:
            assert g_present.tolist() == present.tolist() == [False, True, False, True]
        assert [str(v) for v in g_values.tolist()] == [str(v) for v in values.tolist()], name
    for bad in (b"", blob[:-1], blob + b"\0", b"NOTARRAY" + blob[8:]):
        with pytest.raises(ValueError):
            decode_arrays(bad)


def test_batches_stored_before_arrays_existed_are_read_from_their_json(db: Database) -> None:
    def body(steps: list[int]) -> str:
        return json.dumps({"steps": steps, "walls": [0.0] * 3, "values": {"l": [3, "nan", 1]}})

    with db.session() as s:
        row = new_session(s)
        post(s, row, body([0, 1, 2]))
        post(s, row, body([3, 4, 5]))
        with_arrays = metric_series(s, row)
        s.execute(update(SessionMetricChunk).values(arrays=None))  # as an older batch is
        from_json = metric_series(s, row)
        assert from_json == with_arrays and with_arrays["l"].steps == [0, 1, 2, 3, 4, 5]
        assert with_arrays["l"].values == [3.0, "nan", 1.0, 3.0, "nan", 1.0]


def test_decoded_batches_are_cached_within_a_bound() -> None:
    from nsml_server.sessions import ChunkCache, chunk_columns, decode_chunk

    body = '{"steps":[0,1,2],"walls":[1,2,3],"values":{"l":[1,null,"nan"]}}'
    assert chunk_columns(body) is chunk_columns(body), "the second read is the cached one"
    present, values = chunk_columns(body).values["l"]
    assert present is not None and list(present) == [True, False, True]
    assert values[0] == 1 and math.isnan(values[2])
    cache = ChunkCache(max_values=20)
    for k in range(5):  # 3 steps x (steps, walls, one metric) = 9 numbers each
        cache.put((k,), decode_chunk(body))
    assert cache.get((4,)) is not None and cache.get((3,)) is not None
    assert cache.get((0,)) is None, "the least recently used left first"

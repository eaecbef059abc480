"""The SDK while the NSML server is unreachable: backoff, the bounded report buffer,
idempotent retries, and what it says. A fake clock and sleep: nothing here really waits."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from nsml.sdk import (
    Backoff,
    Retrier,
    ServerUnreachable,
    Transient,
    _Reporter,
    encode_batch,
    format_duration,
    report_buffer,
    retry_timeout,
)


@dataclass
class Clock:
    """Monotonic time that moves only when the code under test sleeps."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.sleeps.append(s)
        self.now += s


@dataclass
class Said:
    lines: list[str] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        self.lines.append(line)


def retrier(clock: Clock, said: Said, timeout: float = 600.0, rng: float = 1.0) -> Retrier:
    return Retrier(
        timeout, clock=clock, sleep=clock.sleep, backoff=Backoff(rng=lambda: rng), say=said
    )


def failing(times: int, result: Any = "ok") -> Any:
    calls = {"n": 0}

    def attempt() -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            raise Transient("connection refused")
        return result

    attempt.calls = calls  # type: ignore[attr-defined]
    return attempt


# ---- backoff ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "rng", "delay"),
    [
        (0, 1.0, 0.5),
        (0, 0.0, 0.25),
        (1, 1.0, 1.0),
        (3, 1.0, 4.0),
        (4, 1.0, 8.0),
        (5, 1.0, 10.0),  # capped: a server that is back is found within seconds
        (60, 0.0, 5.0),  # capped, and jittered down to half of the cap at most
    ],
)
def test_the_backoff_doubles_up_to_its_cap_with_jitter(
    attempt: int, rng: float, delay: float
) -> None:
    assert Backoff(rng=lambda: rng).delay(attempt) == pytest.approx(delay)


def test_a_server_back_after_a_restart_is_reached_without_the_caller_noticing() -> None:
    clock, said = Clock(), Said()
    attempt = failing(4)
    assert retrier(clock, said).call("the upload of checkpoint 3", attempt) == "ok"
    assert attempt.calls["n"] == 5
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0]
    assert said.lines == [
        "[nsml] the NSML server is unreachable (connection refused); retrying the upload of "
        "checkpoint 3 for up to 10 min",
        "[nsml] the NSML server answered again after 8 s: the upload of checkpoint 3 went through",
    ]


def test_nothing_is_said_when_the_first_attempt_goes_through() -> None:
    clock, said = Clock(), Said()
    assert retrier(clock, said).call("x", failing(0)) == "ok"
    assert said.lines == [] and clock.sleeps == []


def test_the_retries_give_up_after_the_timeout_saying_how_to_wait_longer() -> None:
    clock, said = Clock(), Said()
    start = clock.now
    with pytest.raises(ServerUnreachable) as e:
        retrier(clock, said, timeout=120).call("the download of checkpoint 1", failing(10**6))
    assert clock.now - start == pytest.approx(120), "never sleeps past the deadline"
    assert max(clock.sleeps) <= 10
    assert "did not answer for 2 min" in str(e.value) and "NSML_RETRY_TIMEOUT" in str(e.value)
    assert len(said.lines) == 1, "said once, not at every attempt"


def test_a_refusal_is_not_retried() -> None:
    clock, said = Clock(), Said()

    def refused() -> Any:
        raise PermissionError("403")

    with pytest.raises(PermissionError):
        retrier(clock, said).call("x", refused)
    assert clock.sleeps == [] and said.lines == []


@pytest.mark.parametrize(
    ("env", "timeout", "buffer"),
    [
        ({}, 600.0, 1_000_000),
        ({"NSML_RETRY_TIMEOUT": "30", "NSML_REPORT_BUFFER": "500"}, 30.0, 500),
        ({"NSML_RETRY_TIMEOUT": "soon", "NSML_REPORT_BUFFER": "-1"}, 600.0, 1_000_000),
    ],
)
def test_the_retry_timeout_and_the_buffer_bound_come_from_the_environment(
    env: dict[str, str], timeout: float, buffer: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert retry_timeout(env) == timeout and report_buffer(env) == buffer
    if "soon" in env.values():
        assert "ignoring NSML_RETRY_TIMEOUT='soon'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0 s"), (59, "59 s"), (600, "10 min"), (3900, "1 h 5 min")]
)
def test_durations_read_as_a_person_says_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# ---- the report buffer and its sender --------------------------------------------------------


class Response:
    def __init__(self, status: int, body: Any) -> None:
        self.status_code = status
        self._body = body
        self.text = json.dumps(body)

    def json(self) -> Any:
        return self._body


@dataclass
class FakeServer:
    """Stores batches as the NSML server does: once per batch id."""

    down: bool = False
    lose_answers: int = 0
    refuse_with: int = 0
    stored: dict[str, list[int]] = field(default_factory=dict)
    bodies: list[str] = field(default_factory=list)

    def url(self, suffix: str) -> str:
        return "http://nsml.invalid/api/sessions/u/_/1" + suffix

    def call(self, method: str, url: str, **kw: Any) -> Response:
        if self.down:
            raise Transient("connection refused")
        body = kw["data"]
        self.bodies.append(body)
        if self.refuse_with:
            return Response(self.refuse_with, {"message": "Session u/_/1 has ended (stopped)"})
        batch = json.loads(body)
        self.stored.setdefault(batch["batch"], batch["steps"])
        if self.lose_answers:
            self.lose_answers -= 1
            raise Transient("connection reset")  # stored, but the answer never came
        return Response(200, {"accepted": len(batch["steps"])})

    def steps(self) -> list[int]:
        return sorted(s for steps in self.stored.values() for s in steps)


def reporter(
    server: FakeServer, clock: Clock, said: Said, *, max_buffer: int = 1000, timeout: float = 60
) -> _Reporter:
    return _Reporter(
        server,  # type: ignore[arg-type]
        max_buffer=max_buffer,
        timeout_s=timeout,
        clock=clock,
        sleep=clock.sleep,
        backoff=Backoff(rng=lambda: 1.0),
        say=said,
    )


def add(rep: _Reporter, steps: range) -> None:
    rep.thread = object()  # type: ignore[assignment]  # no background thread: the test sends
    for i in steps:
        rep.add(i, {"loss": 1.0 / (i + 1)})


def test_a_batch_whose_answer_was_lost_is_sent_again_byte_for_byte_and_stored_once() -> None:
    server, clock, said = FakeServer(lose_answers=1), Clock(), Said()
    rep = reporter(server, clock, said)
    add(rep, range(50))
    with pytest.raises(Transient):
        rep.send_pending()
    add(rep, range(50, 60))  # more points arrive meanwhile: they go in a later batch
    assert rep.send_pending() == 60
    assert server.bodies[0] == server.bodies[1], "the retry repeats the batch as it was"
    assert len(server.stored) == 2 and server.steps() == list(range(60))


def test_reports_wait_for_the_server_within_the_bound_and_nothing_is_dropped_or_said() -> None:
    server, clock, said = FakeServer(down=True), Clock(), Said()
    rep = reporter(server, clock, said, max_buffer=100)
    add(rep, range(100))
    with pytest.raises(Transient):
        rep.send_pending()
    server.down = False
    rep.flush()
    assert server.steps() == list(range(100))
    assert not any("dropped" in line for line in said.lines), said.lines


def test_past_the_bound_the_oldest_points_are_dropped_and_that_is_said() -> None:
    server, clock, said = FakeServer(down=True), Clock(), Said()
    rep = reporter(server, clock, said, max_buffer=100)
    add(rep, range(250))
    full = [line for line in said.lines if "buffer is full" in line]
    assert full == [
        "[nsml] the report buffer is full (100 points) while the NSML server is unreachable; "
        "dropping the oldest points until it answers ($NSML_REPORT_BUFFER sets the bound)"
    ]
    server.down = False
    rep.flush()
    assert server.steps() == list(range(150, 250)), "the newest 100 points are kept"
    assert said.lines[-1] == (
        "[nsml] 150 report points (steps 0-149) were dropped: the buffer was full while the "
        "NSML server was unreachable"
    )


def test_the_flush_at_exit_waits_for_a_restarting_server() -> None:
    server, clock, said = FakeServer(down=True), Clock(), Said()
    rep = reporter(server, clock, said, timeout=600)
    add(rep, range(5))
    back_at = clock.now + 45  # the hub restarts the service 45 s later
    real_sleep = clock.sleep

    def sleep(s: float) -> None:
        real_sleep(s)
        server.down = clock.now < back_at

    rep.sleep = sleep
    rep.flush()
    assert server.steps() == list(range(5))
    assert 45 <= clock.now - (back_at - 45) <= 45 + 10
    assert said.lines[0].startswith("[nsml] the NSML server is unreachable (connection refused)")
    assert said.lines[1] == (
        "[nsml] waiting up to 10 min for the NSML server to take the last 5 report points"
    )
    assert said.lines[-1].startswith("[nsml] the NSML server answered again after")


def test_the_flush_gives_up_after_its_timeout_and_says_what_was_not_sent() -> None:
    server, clock, said = FakeServer(down=True), Clock(), Said()
    rep = reporter(server, clock, said, timeout=60)
    add(rep, range(7))
    start = clock.now
    rep.flush()
    assert clock.now - start == pytest.approx(60)
    assert said.lines[-1] == "[nsml] 7 report points were not sent (connection refused)"


def test_an_ended_session_stops_the_reports_at_once_without_retrying() -> None:
    server, clock, said = FakeServer(refuse_with=409), Clock(), Said()
    rep = reporter(server, clock, said)
    add(rep, range(30))
    rep.flush()
    assert clock.sleeps == [] and len(server.bodies) == 1
    assert said.lines == [
        "[nsml] the NSML server takes no more reports from this session (Session u/_/1 has "
        "ended (stopped)); 30 report points were not stored"
    ]
    add(rep, range(30, 40))
    assert rep.unsent() == 0, "nothing more is kept"
    rep.flush()
    assert len(server.bodies) == 1, "nothing more is sent"


def test_batches_are_valid_json_with_non_finite_values_as_strings() -> None:
    body = encode_batch(
        [(0, 1.0, {"loss": math.nan}), (1, 2.0, {"loss": math.inf, "acc": -math.inf})], "p/1"
    )

    def refuse(token: str) -> Any:
        raise AssertionError(f"{token} is not JSON")

    data = json.loads(body, parse_constant=refuse)
    assert data == {
        "batch": "p/1",
        "steps": [0, 1],
        "walls": [1.0, 2.0],
        "values": {"loss": ["nan", "inf"], "acc": [None, "-inf"]},
    }

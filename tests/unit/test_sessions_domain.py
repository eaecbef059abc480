"""Sessions without a server: names, commands, environment, exit classification, report
parsing, the artifact store, code snapshots with .nsmlignore, failure mail."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import tarfile
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from nsml.snapshot import IgnoreRules, SnapshotError, build_archive, collect, safe_extract
from nsml_server.artifacts import ArtifactError, ArtifactStore, validate_code_path
from nsml_server.db import Database, check_schema
from nsml_server.notify import Notifier, SMTPSettings, failure_message
from nsml_server.sessions import (
    SessionError,
    args_diff,
    classify_exit,
    create_session,
    dataset_key,
    hash_token,
    ingest_points,
    last_traceback,
    metric_series,
    mint_token,
    pair_args,
    parse_columns,
    parse_points,
    session_command,
    session_env,
    validate_checkpoint,
    validate_entry,
)

# ---- names, commands, environment -------------------------------------------------------------


@pytest.mark.parametrize(
    ("datasets", "key"),
    [
        ([], "_"),
        (["mnist"], "mnist"),
        (["mnist@3", "cifar"], "mnist"),
        (["imagenet-1k@12"], "imagenet-1k"),
    ],
)
def test_the_session_name_takes_the_first_dataset(datasets: list[str], key: str) -> None:
    assert dataset_key(datasets) == key


@pytest.mark.parametrize(
    ("entry", "command"),
    [
        ("train.py", ["python", "-u", "train.py", "--lr", "0.1"]),
        ("scripts/run.sh", ["bash", "scripts/run.sh", "--lr", "0.1"]),
        ("job", ["./job", "--lr", "0.1"]),
    ],
)
def test_the_entry_point_decides_the_interpreter(entry: str, command: list[str]) -> None:
    assert session_command(entry, ["--lr", "0.1"]) == command


@pytest.mark.parametrize("entry", ["/etc/passwd", "../x.py", "a/../../x.py", "", "."])
def test_an_entry_point_outside_the_snapshot_is_refused(entry: str) -> None:
    with pytest.raises(SessionError) as e:
        validate_entry(entry)
    assert e.value.status == 400


def test_entry_points_are_normalised() -> None:
    assert validate_entry("./src//train.py") == "src/train.py"


def test_the_container_environment_names_every_dataset_and_the_checkpoint_to_load() -> None:
    env = session_env(
        name="alice/mnist/3",
        session_id=7,
        api_url="http://127.0.0.1:8090/services/nsml/api/",
        token="nsmls_7_x",
        datasets=["mnist@2", "cifar"],
        node="node-a",
        gpu_ids=["2", "3"],
        load_from="alice/mnist/1/4",
        attempt=1,
    )
    assert env["NSML_SESSION"] == "alice/mnist/3"
    assert env["NSML_DATASET_PATH"] == "/data/mnist"
    assert json.loads(env["NSML_DATASET_PATHS"]) == {"mnist": "/data/mnist", "cifar": "/data/cifar"}
    assert env["NSML_DATASETS"] == "mnist@2,cifar"
    assert env["NSML_LOAD_FROM"] == "alice/mnist/1/4"
    assert env["NSML_GPU_IDS"] == "2,3" and env["PYTHONUNBUFFERED"] == "1"
    bare = session_env(
        name="a/_/1",
        session_id=1,
        api_url="u",
        token="t",
        datasets=[],
        node="n",
        gpu_ids=[],
        load_from=None,
        attempt=2,
    )
    assert bare["NSML_DATASET_PATH"] == "" and "NSML_LOAD_FROM" not in bare


def test_session_tokens_are_random_and_only_their_hash_is_kept() -> None:
    a, ha = mint_token(5)
    b, hb = mint_token(5)
    assert a.startswith("nsmls_5_") and a != b and ha != hb
    assert hash_token(a) == ha and a not in ha


@pytest.mark.parametrize("name", ["3", "epoch-3", "best.v2", "a@b+c"])
def test_good_checkpoint_names(name: str) -> None:
    assert validate_checkpoint(name) == name


@pytest.mark.parametrize("name", ["", "-x", "a/b", "x" * 129, "a b", ".."])
def test_bad_checkpoint_names_are_400(name: str) -> None:
    with pytest.raises(SessionError) as e:
        validate_checkpoint(name)
    assert e.value.status == 400


# ---- how a session ended ---------------------------------------------------------------------

TRACEBACK = """epoch 1
Traceback (most recent call last):
  File "/nsml/code/train.py", line 9, in <module>
    inner()
  File "/nsml/code/train.py", line 6, in inner
    raise ValueError("boom")
ValueError: boom
"""


@pytest.mark.parametrize(
    ("kw", "state", "reason", "words"),
    [
        ({"exit_code": 0}, "completed", "completed", "exit code 0"),
        (
            {"exit_code": 1, "log_tail": TRACEBACK},
            "failed",
            "exit_code",
            "code 1: ValueError: boom",
        ),
        ({"exit_code": 2}, "failed", "exit_code", "exit code 2."),
        ({"exit_code": 137, "oom_killed": True}, "oom_killed", "oom_killed", "512 MiB memory"),
        ({"exit_code": 143, "stop_requested": True}, "stopped", "stopped", "on request"),
        (
            {"exit_code": 137, "oom_killed": True, "stop_requested": True},
            "stopped",
            "stopped",
            "on request",
        ),
        ({"exit_code": None, "error": "no such file"}, "failed", "exit_code", "no such file"),
    ],
)
def test_an_ended_container_is_classified(
    kw: dict[str, object], state: str, reason: str, words: str
) -> None:
    args: dict[str, object] = {
        "exit_code": None,
        "oom_killed": False,
        "stop_requested": False,
        "memory_mib": 512,
    }
    args.update(kw)
    out = classify_exit(**args)  # type: ignore[arg-type]
    assert (out.state, out.reason) == (state, reason)
    assert words in out.message, out.message


def test_the_oom_message_suggests_more_memory() -> None:
    out = classify_exit(exit_code=137, oom_killed=True, stop_requested=False, memory_mib=2048)
    assert "2 GiB memory limit" in out.message and "--memory 4G" in out.message


def test_the_last_traceback_is_found_even_with_chained_exceptions() -> None:
    chained = (
        TRACEBACK
        + "\nDuring handling of the above exception, another exception occurred:\n\n"
        + TRACEBACK.replace("ValueError: boom", "KeyError: 'x'")
    )
    tb = last_traceback(chained)
    assert tb is not None and tb.splitlines()[-1] == "KeyError: 'x'"
    assert last_traceback("all fine\n") is None


def test_argument_diffs_pair_options_with_their_values() -> None:
    assert pair_args(["--lr", "0.1", "--fast", "--epochs", "3", "data", "-x=1"]) == [
        "--lr 0.1",
        "--fast",
        "--epochs 3",
        "data",
        "-x=1",
    ]
    d = args_diff(
        ["--lr", "0.1", "--epochs", "3"], ["--lr", "0.01", "--epochs", "3"], "a/_/1", "a/_/2"
    )
    assert "--- a/_/1" in d and "-" + "--lr 0.1" in d and "+--lr 0.01" in d
    assert " --epochs 3" in d
    assert args_diff(["x"], ["x"]) == ""


# ---- report points ---------------------------------------------------------------------------


def test_row_points_continue_the_step_and_keep_non_finite_values() -> None:
    pts = parse_points(
        [[None, 1.0, {"loss": 1}], [None, 2.0, {"loss": float("nan")}], [10, 3.0, {"acc": 0.5}]],
        next_step=4,
    )
    assert [p[0] for p in pts] == [4, 5, 10]
    assert pts[0][2] == {"loss": 1.0} and math.isnan(pts[1][2]["loss"] or 0.0)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"steps": [0], "walls": [1.0]}, "send {"),
        ({"steps": [0.5], "walls": [1.0], "values": {}}, "steps must be integers"),
        ({"steps": [True], "walls": [1.0], "values": {}}, "steps must be integers"),
        ({"steps": [0, 1], "walls": [1.0], "values": {}}, "walls must be 2 numbers"),
        ({"steps": [0], "walls": [float("inf")], "values": {}}, "finite"),
        ({"steps": [0], "walls": [1.0], "values": {"x": [1, 2]}}, "list of 1 numbers"),
        ({"steps": [0], "walls": [1.0], "values": {"x": ["1"]}}, "not a number"),
        ({"steps": [0], "walls": [1.0], "values": {"x y": [1]}}, "metric name"),
        ({"steps": [0], "walls": [1.0], "values": {}, "more": 1}, "unknown field"),
    ],
)
def test_bad_column_batches_are_refused(data: dict[str, object], words: str) -> None:
    with pytest.raises(SessionError) as e:
        parse_columns(data)
    assert e.value.status == 400 and words in e.value.message, e.value.message


def test_reports_are_stored_per_batch_and_read_back_as_series(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    check_schema(db.engine, db.url)
    now = datetime(2026, 1, 1)
    with db.session() as s:
        row = create_session(
            s,
            user="u",
            datasets=[],
            values={"code_digest": "0" * 64, "entry": "t.py", "image": "i", "resources": {}},
            now=now,
        )
        cols = {"steps": [0, 1], "walls": [1.0, 2.0], "values": {"loss": [0.5, None]}}
        raw = json.dumps(cols)
        assert ingest_points(s, row, json.loads(raw), now, raw).accepted == 2
        s.refresh(row)
        nan_point = {"points": [[None, 3.0, {"loss": float("nan"), "acc": 1}]]}
        assert ingest_points(s, row, nan_point, now).accepted == 1
        s.refresh(row)
        assert row.last_step == 2 and row.points == 3
        assert row.last_metrics == {"loss": "nan", "acc": 1.0}
        series = metric_series(s, row)
        assert series["loss"].steps == [0, 2] and series["loss"].values == [0.5, "nan"]
        assert series["acc"].steps == [2] and series["acc"].walls == [3.0]
        assert list(metric_series(s, row, names=["acc"])) == ["acc"]
        assert metric_series(s, row, since_step=1)["loss"].steps == [2]
        assert ingest_points(s, row, {"steps": [], "walls": [], "values": {}}, now).accepted == 0
    db.dispose()


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"not": "a list"}, "must be a list"),
        ([[0, 1.0]], "expected [step, time"),
        ([["a", 1.0, {}]], "not an integer"),
        ([[True, 1.0, {}]], "not an integer"),
        ([[0, "now", {}]], "time 'now'"),
        ([[0, 1.0, {"x": "1"}]], "not a number"),
        ([[0, 1.0, {"bad name!": 1}]], "metric name"),
        ([[0, 1.0, {f"m{i}": 1 for i in range(300)}]], "at most 256"),
    ],
)
def test_bad_points_are_refused_naming_the_point(raw: object, words: str) -> None:
    with pytest.raises(SessionError) as e:
        parse_points(raw, 0)
    assert e.value.status == 400 and words in e.value.message, e.value.message


# ---- the artifact store ----------------------------------------------------------------------


def tar_of(members: dict[str, bytes], *, gz: bool = False, mode: int = 0o644) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture()
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def ingest(store: ArtifactStore, data: bytes, **limits: int) -> str:
    path = store.tmp_dir / "upload"
    path.write_bytes(data)
    limits.setdefault("max_bytes", 1 << 20)
    limits.setdefault("max_files", 100)
    return store.ingest_code(path, **limits).digest


def test_the_same_files_are_one_snapshot_and_share_blobs(store: ArtifactStore) -> None:
    files = {"train.py": b"print(1)\n", "lib/util.py": b"X = 1\n"}
    a = ingest(store, tar_of(files))
    b = ingest(store, tar_of(dict(reversed(list(files.items()))), gz=True))
    assert a == b
    c = ingest(store, tar_of({**files, "train.py": b"print(2)\n"}))
    assert c != a
    blobs = [p for p in store.blobs_dir.rglob("*") if p.is_file()]
    assert len(blobs) == 3, "lib/util.py is stored once"
    assert [f.path for f in store.code(a).files] == ["lib/util.py", "train.py"]


def test_a_snapshot_is_materialised_as_writable_copies(
    store: ArtifactStore, tmp_path: Path
) -> None:
    digest = ingest(store, tar_of({"run": b"#!/bin/sh\n"}, mode=0o755))
    digest2 = ingest(store, tar_of({"a/b/c.py": b"x"}))
    dest = tmp_path / "work"
    store.materialize_code(digest, dest)
    assert os.access(dest / "run", os.X_OK)
    store.materialize_code(digest2, dest)
    assert not (dest / "run").exists(), "materialising replaces the folder"
    (dest / "a" / "b" / "c.py").write_text("changed")
    blob = store.blob_path(store.code(digest2).files[0].sha256)
    assert blob.read_bytes() == b"x", "the session's copy is not the stored blob"
    assert (dest / "a" / "b").stat().st_mode & 0o777 == 0o777


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ({"../evil.py": b""}, "leaves its folder"),
        ({"/abs.py": b""}, "absolute path"),
        ({}, "empty"),
    ],
)
def test_bad_snapshots_are_refused(
    store: ArtifactStore, members: dict[str, bytes], words: str
) -> None:
    with pytest.raises(ArtifactError) as e:
        ingest(store, tar_of(members))
    assert e.value.status == 400 and words in e.value.message


def test_links_and_oversized_snapshots_are_refused(store: ArtifactStore) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ArtifactError, match="not a regular file"):
        ingest(store, buf.getvalue())
    with pytest.raises(ArtifactError) as e:
        ingest(store, tar_of({"a": b"x" * 100, "b": b"y" * 100}), max_bytes=150)
    assert e.value.status == 413 and ".nsmlignore" in e.value.message
    with pytest.raises(ArtifactError) as e:
        ingest(store, tar_of({"a": b"", "b": b""}), max_files=1)
    assert e.value.status == 413
    with pytest.raises(ArtifactError, match="not a readable tar"):
        ingest(store, b"garbage")
    assert not list(store.tmp_dir.glob("blob-*")), "nothing half-written is left"


def test_code_paths_are_normalised() -> None:
    assert validate_code_path("./a//b.py") == "a/b.py"
    with pytest.raises(ArtifactError):
        validate_code_path("a\\b")


def test_blob_writers_refuse_past_their_limit_and_leave_nothing(store: ArtifactStore) -> None:
    w = store.writer(4, "checkpoint")
    w.write(b"1234")
    with pytest.raises(ArtifactError) as e:
        w.write(b"5")
    assert e.value.status == 413 and "checkpoint" in e.value.message
    assert not list(store.tmp_dir.iterdir())


def test_code_diffs_show_changed_text_and_name_binary_files(store: ArtifactStore) -> None:
    a = ingest(store, tar_of({"train.py": b"lr = 0.1\n", "w.bin": b"\x00\xff", "old.py": b""}))
    b = ingest(store, tar_of({"train.py": b"lr = 0.01\n", "w.bin": b"\xff\x00", "new.py": b"1"}))
    changes = {c.path: c for c in store.diff_code(a, b)}
    assert {p: c.change for p, c in changes.items()} == {
        "new.py": "added",
        "old.py": "removed",
        "train.py": "changed",
        "w.bin": "changed",
    }
    diff = changes["train.py"].diff or ""
    assert "-lr = 0.1\n" in diff and "+lr = 0.01\n" in diff
    assert changes["w.bin"].diff is None
    assert "No newline at end of file" in (changes["new.py"].diff or "")


# ---- code snapshots on the client ------------------------------------------------------------

IGNORE_CASES = [
    # (patterns, path, is_dir, ignored)
    (["*.bin"], "data/w.bin", False, True),
    (["*.bin", "!keep.bin"], "keep.bin", False, False),
    (["/build"], "build", True, True),
    (["/build"], "src/build", True, False),
    (["logs/"], "logs", True, True),
    (["logs/"], "logs", False, False),
    (["docs/*.md"], "docs/a.md", False, True),
    (["docs/*.md"], "docs/sub/a.md", False, False),
    (["**/cache"], "a/b/cache", True, True),
    (["data/**"], "data/x/y", False, True),
    (["a/**/z"], "a/z", False, True),
    (["a/**/z"], "a/b/c/z", False, True),
    (["file?.txt"], "file1.txt", False, True),
    (["[!a]x"], "bx", False, True),
    (["[!a]x"], "ax", False, False),
    (["# comment", ""], "# comment", False, False),
    (["\\#hash"], "#hash", False, True),
]


@pytest.mark.parametrize(("patterns", "path", "is_dir", "ignored"), IGNORE_CASES)
def test_nsmlignore_follows_gitignore(
    patterns: list[str], path: str, is_dir: bool, ignored: bool
) -> None:
    assert IgnoreRules(patterns).ignored(path, is_dir) is ignored


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "code"
    (root / "src").mkdir(parents=True)
    (root / "src" / "train.py").write_text("print('hi')\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / "data").mkdir()
    (root / "data" / "big.npy").write_bytes(b"\0" * 5000)
    (root / "link.py").symlink_to(root / "src" / "train.py")
    (root / "outside.txt").symlink_to("/etc/hostname")
    return root


def test_a_folder_snapshot_honours_nsmlignore_and_defaults(folder: Path) -> None:
    (folder / ".nsmlignore").write_text("data/\n")
    snap = collect(folder)
    assert snap.paths == [".nsmlignore", "link.py", "run.sh", "src/train.py"]
    assert any("outside.txt" in s for s in snap.skipped)
    executable = {f[0]: f[3] for f in snap.files}
    assert executable["run.sh"] and not executable["src/train.py"]


def test_a_folder_over_the_limit_names_its_largest_files(folder: Path) -> None:
    with pytest.raises(SnapshotError) as e:
        collect(folder, max_bytes=1000)
    assert "data/big.npy" in str(e.value) and ".nsmlignore" in str(e.value)
    with pytest.raises(SnapshotError, match="files to upload"):
        collect(folder, max_files=2)


def test_archives_are_reproducible_and_a_cell_replaces_the_file(
    folder: Path, tmp_path: Path
) -> None:
    (folder / ".nsmlignore").write_text("data/\n")
    one = build_archive(collect(folder))
    two = build_archive(collect(folder))
    try:
        with tarfile.open(one) as t1, tarfile.open(two) as t2:
            assert [(m.name, m.mtime, m.mode) for m in t1] == [
                (m.name, m.mtime, m.mode) for m in t2
            ]
    finally:
        one.unlink()
        two.unlink()
    cell = build_archive(collect(folder, extra={"src/train.py": b"print('cell')\n"}))
    try:
        out = tmp_path / "out"
        with tarfile.open(cell) as tar:
            safe_extract(tar, out)
        assert (out / "src" / "train.py").read_text() == "print('cell')\n"
    finally:
        cell.unlink()


# ---- failure mail ----------------------------------------------------------------------------


class SMTPSink:
    """A minimal SMTP server on loopback that keeps the messages it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.messages: list[tuple[str, list[str], str]] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                self.session(f)

    def session(self, f: io.BufferedRWPair) -> None:
        def say(line: str) -> None:
            f.write(line.encode() + b"\r\n")
            f.flush()

        say("220 sink ready")
        sender, rcpts = "", []
        while line := f.readline().decode():
            cmd = line.strip().upper()
            if cmd.startswith(("EHLO", "HELO")):
                say("250 sink")
            elif cmd.startswith("MAIL FROM:"):
                sender = line.strip()[10:]
                say("250 ok")
            elif cmd.startswith("RCPT TO:"):
                rcpts.append(line.strip()[8:])
                say("250 ok")
            elif cmd == "DATA":
                say("354 go ahead")
                body = []
                while (data := f.readline().decode()).rstrip("\r\n") != ".":
                    body.append(data)
                self.messages.append((sender, rcpts, "".join(body)))
                say("250 queued")
            elif cmd == "QUIT":
                say("221 bye")
                return
            else:
                say("250 ok")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def smtp() -> Iterator[SMTPSink]:
    sink = SMTPSink()
    yield sink
    sink.close()


def test_a_failure_is_mailed_with_the_end_of_the_log(smtp: SMTPSink) -> None:
    settings = SMTPSettings(
        host="127.0.0.1", port=smtp.port, sender="nsml@lab.org", to_template="{user}@lab.org"
    )
    Notifier(settings)("alice", "alice/mnist/3", "oom_killed", "Out of memory.", "step 9\nKilled\n")
    assert len(smtp.messages) == 1
    sender, rcpts, body = smtp.messages[0]
    assert sender == "<nsml@lab.org>" and rcpts == ["<alice@lab.org>"]
    assert "Subject: [nsml] alice/mnist/3 oom killed" in body
    assert "Out of memory." in body and "Killed" in body and "nsml logs alice/mnist/3" in body


def test_mail_is_off_without_a_host_and_a_dead_server_costs_only_a_log_line() -> None:
    Notifier(SMTPSettings())("a", "a/_/1", "failed", "x", "")  # no host: nothing happens
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    Notifier(SMTPSettings(host="127.0.0.1", port=port, timeout_s=2))(
        "a", "a/_/1", "failed", "x", ""
    )


def test_the_failure_message_is_plain_text() -> None:
    msg = failure_message(
        SMTPSettings(base_url="http://hub"), "bob", "bob/_/2", "failed", "Boom.", ""
    )
    assert msg["To"] == "bob" and "Hub: http://hub" in msg.get_content()


# ---- serving logs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "lines", "expected"),
    [
        (b"a\nb\nc\n", 1, b"c\n"),
        (b"a\nb\nc\n", 2, b"b\nc\n"),
        (b"a\nb\nc", 1, b"c"),
        (b"a\nb\nc\n", 10, b"a\nb\nc\n"),
        (b"a\nb\nc\n", 0, b""),
        (b"", 3, b""),
        (b"x" * 100_000 + b"\nlast\n", 1, b"last\n"),
    ],
)
def test_the_tail_of_a_log_starts_at_a_line(
    tmp_path: Path, text: bytes, lines: int, expected: bytes
) -> None:
    from nsml_server.api.sessions import _tail_offset

    path = tmp_path / "log"
    path.write_bytes(text)
    assert text[_tail_offset(path, len(text), lines) :] == expected


@pytest.mark.parametrize(
    ("data", "keep"),
    [(b"abc", 3), ("é".encode() + b"x", 3), ("é".encode()[:1], 0), (b"a" + "€".encode()[:2], 1)],
)
def test_a_log_chunk_never_ends_inside_a_character(data: bytes, keep: int) -> None:
    from nsml_server.api.sessions import _utf8_boundary

    assert _utf8_boundary(data) == keep

"""``nsml pull``: every failure is one line on stderr and exit code 2, and leaves nothing at
the destination. A small HTTP server on loopback plays the API's checkpoint download."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nsml.cli import main


def tar_of(*members: tarfile.TarInfo | tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


GOOD = tar_of(("state.json", b'{"epoch": 3}'), ("sub/w.bin", b"weights"))


@dataclass
class Stored:
    """One checkpoint as the fake API serves it."""

    body: bytes
    sha: str | None = None  # X-Checkpoint-SHA256 (default: the body's)
    length: int | None = None  # Content-Length (default: the body's; more = a cut download)


@dataclass
class FakeAPI:
    url: str = ""
    checkpoints: dict[str, Stored] = field(default_factory=dict)


@pytest.fixture()
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAPI]:
    fake = FakeAPI()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            name = self.path.split("?")[0].rsplit("/", 1)[-1]
            c = fake.checkpoints.get(name)
            if c is None:
                data = json.dumps({"message": f"no checkpoint {name!r}", "reason": "not_found"})
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(c.length or len(c.body)))
            self.send_header("X-Checkpoint-SHA256", c.sha or hashlib.sha256(c.body).hexdigest())
            self.end_headers()
            self.wfile.write(c.body)
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/api/"
    monkeypatch.setenv("NSML_API_URL", fake.url)
    monkeypatch.setenv("NSML_TOKEN", "t")
    yield fake
    server.shutdown()
    server.server_close()


def pull(dest: Path | str, ref: str = "u/_/1/3") -> tuple[int, str, str]:
    import contextlib

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["pull", ref, str(dest)])
    return code, out.getvalue(), err.getvalue()


def test_a_checkpoint_is_pulled_whole_into_its_folder(api: FakeAPI, tmp_path: Path) -> None:
    api.checkpoints["3"] = Stored(GOOD)
    code, out, err = pull(tmp_path)
    assert (code, err) == (0, "")
    where = Path(out.strip())
    assert where == tmp_path / "u___1" / "3"
    assert (where / "sub" / "w.bin").read_bytes() == b"weights"
    assert sorted(p.name for p in (tmp_path / "u___1").iterdir()) == ["3"], "no leftovers"


#: (case, what the server holds, words of the one line)
DAMAGED = [
    ("bytes that do not match the recorded SHA-256", Stored(GOOD, sha="0" * 64), "is damaged"),
    ("not an archive", Stored(b"garbage" * 300), "not a tar archive"),
    (
        "a symbolic link to /etc/shadow",
        Stored(tar_of(link("shadow", tarfile.SYMTYPE, "/etc/shadow"))),
        "'shadow' is a symbolic link (to '/etc/shadow')",
    ),
    (
        "a hard link to /etc/shadow",
        Stored(tar_of(link("shadow", tarfile.LNKTYPE, "/etc/shadow"))),
        "'shadow' is a hard link",
    ),
    ("a path that climbs out", Stored(tar_of(("../escape", b"x"))), "'../escape' leaves"),
    ("an absolute path", Stored(tar_of(("/abs", b"x"))), "'/abs' has an absolute path"),
    ("an archive cut short", Stored(GOOD[:700]), "cut short"),
    ("a download cut short", Stored(GOOD, length=len(GOOD) + 5000), "broke"),
]


@pytest.mark.parametrize(
    ("stored", "words"), [pytest.param(st, w, id=case) for case, st, w in DAMAGED]
)
def test_a_damaged_checkpoint_fails_pull_in_one_line_and_leaves_nothing(
    api: FakeAPI, tmp_path: Path, stored: Stored, words: str
) -> None:
    api.checkpoints["3"] = stored
    dest = tmp_path / "dest"
    dest.mkdir()
    code, out, err = pull(dest)
    assert code == 2 and out == "", (out, err)
    assert err.startswith("nsml: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err, err
    assert list(dest.iterdir()) == [], "nothing left, not even the session's folder"
    assert not (tmp_path / "escape").exists() and not Path("/abs").exists()


def test_a_full_disk_fails_pull_in_one_line_and_leaves_nothing(
    api: FakeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.checkpoints["3"] = Stored(GOOD)
    real = tarfile.copyfileobj

    def full(src: Any, dst: Any, length: Any = None, *args: Any, **kw: Any) -> None:
        real(src, dst, min(length or 0, 3), *args, **kw)  # a few bytes, then no more space
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile, "copyfileobj", full)
    dest = tmp_path / "dest"
    dest.mkdir()
    code, _, err = pull(dest)
    assert code == 2 and err.count("\n") == 1, err
    assert "No space left on device" in err and "nothing was written" in err, err
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(
    ("dest", "words"),
    [
        pytest.param("/proc/self", "Cannot create /proc/self/u___1", id="/proc/self"),
        pytest.param("{tmp}/a-file", "Cannot create {tmp}/a-file/u___1", id="under a file"),
        pytest.param("{tmp}/taken", "already exists", id="the folder exists"),
    ],
)
def test_a_destination_that_cannot_be_written_fails_pull_in_one_line(
    api: FakeAPI, tmp_path: Path, dest: str, words: str
) -> None:
    api.checkpoints["3"] = Stored(GOOD)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "taken" / "u___1" / "3").mkdir(parents=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, _, err = pull(dest.format(tmp=tmp_path))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert words.format(tmp=tmp_path) in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_missing_checkpoint_or_server_fails_pull_in_one_line(
    api: FakeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = pull(tmp_path, "u/_/1/nope")
    assert code == 2 and err == "nsml: no checkpoint 'nope'\n", err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("NSML_API_URL", "http://127.0.0.1:9/api/")
    code, _, err = pull(tmp_path)
    assert code == 2 and err.count("\n") == 1 and "Cannot reach the NSML API" in err, err
    assert list(tmp_path.iterdir()) == []

"""Content addresses are not capabilities: the server's rules for what a hash lets a user do.

A push may skip a blob only when the pusher may already read a version that lists it; the
answer to a push never depends on what the store holds for others; a code snapshot may be
run only by whoever uploaded it, can read a session that runs it, or is an admin. Run on a
real SQLite database and a real blob store, without a hub.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from nsml_datasets import BlobStore, Entry, Manifest
from nsml_server.api.base import APIError
from nsml_server.artifacts import may_run_code, record_code_upload
from nsml_server.datasets import Caller, DatasetService
from nsml_server.db import Database, check_schema
from nsml_server.models import CodeUpload
from nsml_server.sessions import create_session
from tests.unit.conftest import sha

NOW = datetime(2026, 1, 1)

OWNER = Caller("vic", groups=frozenset({"vision"}))
MEMBER = Caller("mia", groups=frozenset({"vision"}))
OUTSIDER = Caller("eve", groups=frozenset({"speech"}))
ADMIN = Caller("root", is_admin=True)


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    check_schema(database.engine, database.url)
    return database


@pytest.fixture()
def svc(tmp_path: Path, db: Database) -> Iterator[DatasetService]:
    service = DatasetService(
        db,
        BlobStore(tmp_path / "store", durable=False),
        None,
        node_name="node-a",
        now=lambda: NOW,
        max_file_bytes=1 << 30,
        max_files=1000,
    )
    yield service
    service.close()


def manifest(files: dict[str, bytes]) -> dict[str, Any]:
    return Manifest(Entry(p, len(d), sha(d)) for p, d in files.items()).to_dict()


def push(
    svc: DatasetService,
    c: Caller,
    name: str,
    files: dict[str, bytes],
    test: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Push a version as the client does: begin, send what is missing, commit."""
    out = svc.begin(c, name, manifest(files), manifest(test) if test else None)
    by_sha = {sha(d): d for d in [*files.values(), *(test or {}).values()]}
    up, tup = svc.uploads_of(c, name, out.upload_id)
    for b in out.missing:
        u = up if b.blake3 in up.manifest.blobs() else tup
        assert u is not None
        u.put(io.BytesIO(by_sha[b.blake3]), b.blake3)
    return svc.commit(c, name, out.upload_id).model_dump()


def share(svc: DatasetService, name: str, visibility: str, team: str | None = None) -> None:
    fields = {"visibility", "team"} if team else {"visibility"}
    svc.patch(
        OWNER,
        name,
        fields=fields,
        visibility=visibility,
        team=team,
        metric=None,
        higher_is_better=None,
    )


def missing_of(svc: DatasetService, c: Caller, name: str, files: dict[str, bytes]) -> set[str]:
    return {b.blake3 for b in svc.begin(c, name, manifest(files), None).missing}


# ---- which blobs a push may skip ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("visibility", "pusher", "split", "may_skip"),
    [
        pytest.param("private", OWNER, "", True, id="the owner's own private files"),
        pytest.param("private", OUTSIDER, "", False, id="another user's private files"),
        pytest.param("team", MEMBER, "", True, id="a team dataset's files, by a member"),
        pytest.param("team", OUTSIDER, "", False, id="a team dataset's files, by an outsider"),
        pytest.param("public", OUTSIDER, "", True, id="a public dataset's files, by anyone"),
        pytest.param("public", OWNER, "test", True, id="a hidden test split, by who pushed it"),
        pytest.param("public", OUTSIDER, "test", False, id="a hidden test split, by a user"),
        pytest.param("private", ADMIN, "test", True, id="a hidden test split, by an admin"),
        pytest.param("private", ADMIN, "", True, id="a private dataset's files, by an admin"),
    ],
)
def test_a_push_may_skip_a_stored_blob_only_when_the_pusher_may_read_a_version_listing_it(
    svc: DatasetService, visibility: str, pusher: Caller, split: str, may_skip: bool
) -> None:
    train, hidden = os.urandom(3000), os.urandom(2000)
    push(svc, OWNER, "source", {"train.bin": train}, {"answers.bin": hidden})
    if visibility != "private":
        share(svc, "source", visibility, "vision" if visibility == "team" else None)
    target = hidden if split else train
    name = "source" if pusher is OWNER else f"copy-{pusher.name}"
    missing = missing_of(svc, pusher, name, {"mine.bin": b"new bytes", "theirs.bin": target})
    assert sha(b"new bytes") in missing, "new content is always sent"
    assert (sha(target) not in missing) is may_skip


def test_the_answer_for_an_unreadable_stored_blob_is_the_answer_for_one_stored_nowhere(
    svc: DatasetService,
) -> None:
    secret, nowhere = os.urandom(5000), os.urandom(5000)
    push(svc, OWNER, "secret", {"secret.bin": secret})

    def answers(data: bytes) -> list[Any]:
        name = f"probe-{sha(data)[:8]}"
        files = {"x.bin": data}
        out = svc.begin(OUTSIDER, name, manifest(files), None)
        (up, _) = svc.uploads_of(OUTSIDER, name, out.upload_id)
        up.put(io.BytesIO(data[:1234]), sha(data))  # a partial send, then a resume
        again = svc.begin(OUTSIDER, name, manifest(files), None)
        seen: list[Any] = []
        for o in (out, again, svc.status(OUTSIDER, name, out.upload_id)):
            seen.append(
                [(b.size, b.offset, b.blake3 == sha(data)) for b in o.missing]
                + [o.missing_bytes, o.files, o.bytes, o.resumed]
            )
        with pytest.raises(APIError) as e:
            svc.commit(OUTSIDER, name, out.upload_id)
        seen.append((e.value.status_code, e.value.error_reason, _scrub(e.value.message, out, data)))
        up.put(io.BytesIO(data[1234:]), sha(data), offset=1234)
        version = svc.commit(OUTSIDER, name, out.upload_id)
        seen.append((version.new_bytes, version.bytes, version.files))
        return seen

    held = answers(secret)
    assert held == answers(nowhere)
    assert held[-1][0] == 5000, "new_bytes: what the pusher could not read before"


def _scrub(message: str, out: Any, data: bytes) -> str:
    return message.replace(out.upload_id, "ID").replace(sha(data), "SHA")


def test_new_bytes_count_what_the_pusher_could_not_read_before(svc: DatasetService) -> None:
    files = {f"f{i}.bin": os.urandom(1000 + i) for i in range(5)}
    assert push(svc, OWNER, "mine", files)["new_bytes"] == sum(len(d) for d in files.values())
    files["f2.bin"] = os.urandom(4321)
    assert push(svc, OWNER, "mine", files)["new_bytes"] == 4321
    assert push(svc, OWNER, "mine", files)["new_bytes"] == 0
    # Another user who sends the same bytes brought all of them, whatever the store held.
    assert push(svc, OUTSIDER, "copy", {"f2.bin": files["f2.bin"]})["new_bytes"] == 4321


def test_a_new_version_of_ones_own_dataset_reads_one_manifest_to_skip_its_blobs(
    svc: DatasetService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The common case stays fast: the versions of the dataset being pushed are searched
    first and the search stops once every blob is found."""
    for k in range(3):
        push(svc, OUTSIDER, f"public-{k}", {"x.bin": os.urandom(100)})
        svc.patch(
            OUTSIDER,
            f"public-{k}",
            fields={"visibility"},
            visibility="public",
            team=None,
            metric=None,
            higher_is_better=None,
        )
    files = {f"f{i}.bin": os.urandom(500) for i in range(50)}
    for _ in range(3):
        push(svc, OWNER, "mine", files)
    svc._blob_sets.clear()
    loaded: list[str] = []
    real = svc.store.load_manifest
    monkeypatch.setattr(svc.store, "load_manifest", lambda d: loaded.append(d) or real(d))
    files["f7.bin"] = os.urandom(500)
    assert missing_of(svc, OWNER, "mine", files) == {sha(files["f7.bin"])}
    assert len(loaded) == 1, "only the latest version's manifest was read"
    loaded.clear()
    again = missing_of(svc, OWNER, "mine", {**files, "g.bin": b"g"})
    assert again == {sha(b"g"), sha(files["f7.bin"])}
    assert loaded == [], "parsed manifests are kept"


# ---- code snapshots ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "is_admin", "allowed"),
    [
        pytest.param("ann", False, True, id="the user who uploaded it"),
        pytest.param("bob", False, False, id="another user who learned its digest"),
        pytest.param("cat", False, True, id="a user who can read a public session running it"),
        pytest.param("dan", False, True, id="a user whose own session runs it"),
        pytest.param("root", True, True, id="an admin"),
    ],
)
def test_a_code_snapshot_may_be_run_by_its_uploader_readers_of_a_session_and_admins(
    db: Database, who: str, is_admin: bool, allowed: bool
) -> None:
    digest, public_digest, dans = "a" * 64, "b" * 64, "c" * 64
    with db.session() as s:
        record_code_upload(s, "ann", digest, NOW)
        record_code_upload(s, "ann", digest, NOW)  # idempotent
        for user, code, visibility in (("ann", public_digest, "public"), ("dan", dans, "private")):
            create_session(
                s,
                user=user,
                datasets=[],
                values={
                    "code_digest": code,
                    "entry": "train.py",
                    "args": [],
                    "image": "img",
                    "resources": {},
                    "visibility": visibility,
                },
                now=NOW,
            )
    wanted = {"cat": public_digest, "dan": dans}.get(who, digest)
    with db.session() as s:
        assert may_run_code(s, who, is_admin, wanted) is allowed
        assert may_run_code(s, "bob", False, dans) is False, "a private session's code"


def test_after_the_upgrade_users_of_existing_sessions_still_run_their_code(
    tmp_path: Path,
) -> None:
    from sqlalchemy import text

    from nsml_server.db import upgrade

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    upgrade(url, "0004")
    old = Database(url)
    with old.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO sessions (name, user_name, dataset_key, number, state, visibility, "
                "code_digest, entry, args, image, datasets, resources, gpu_ids, log_base, "
                "stop_requested, attempt, memo, last_metrics, points, created) VALUES "
                "('ann/_/1', 'ann', '_', 1, 'completed', 'private', :d, 'train.py', '[]', "
                "'img', '[]', '{}', '[]', 0, 0, 1, '', '{}', 0, :t)"
            ),
            {"d": "a" * 64, "t": NOW},
        )
    upgrade(url)
    with old.session() as s:
        assert s.get(CodeUpload, ("a" * 64, "ann")) is not None, "recorded as ann's upload"
        assert may_run_code(s, "ann", False, "a" * 64)
        assert not may_run_code(s, "bob", False, "a" * 64)
    old.engine.dispose()

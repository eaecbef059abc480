"""Content addresses are not capabilities: a hash names bytes, it never grants them.

Tried as an attacker would, on the real hub: a second user who learned the BLAKE3 hash and
size of a file in another user's private dataset (or in a hidden test split), or the digest
of another user's code snapshot, names it in every request that takes a hash. They are told
to send the bytes (and told exactly what a hash that exists nowhere gets), they never get the
bytes back, and their code never runs. Meanwhile the owner's new versions, public datasets
and team datasets are still skipped without sending a byte.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import requests

from nsml_datasets.local import LocalChannel, LocalError
from tests.integration.hubproc import HubProcess
from tests.integration.test_datasets import (
    User,
    blob_bytes,
    manifest_of,
    sha,
    store_dir,
    tree,
    user,
)
from tests.integration.test_hub import assert_json_error
from tests.integration.test_sessions import cli_for, status, wait_state

pytestmark = [pytest.mark.hub, pytest.mark.docker]


def scrub(answer: Any, *secrets: str) -> Any:
    """*answer* (JSON) with the given hashes, ids and digests replaced by a placeholder."""
    text = json.dumps(answer, sort_keys=True)
    for s in secrets:
        text = text.replace(s, "<X>")
    return json.loads(text)


def begin(u: User, name: str, files: dict[str, bytes], **extra: Any) -> requests.Response:
    return u.api("POST", f"datasets/{name}/uploads", json={"manifest": manifest_of(files), **extra})


def probe(u: User, name: str, files: dict[str, bytes], target: bytes) -> list[Any]:
    """Everything *u* is told while trying to claim *target* by its hash without its bytes:
    the upload's answer, its resume, its status, a commit, a wrong-bytes PUT and pack, the
    status after them. Hashes, ids and digests are scrubbed so that answers compare."""
    r = begin(u, name, files)
    assert r.status_code == 201, r.text
    up = r.json()
    base = f"datasets/{name}/uploads/{up['upload_id']}"
    hide = (sha(target), up["upload_id"], up["digest"], name)
    seen: list[Any] = [r.status_code, scrub(up, *hide)]
    again = begin(u, name, files)
    seen += [again.status_code, scrub(again.json(), *hide)]
    seen.append(scrub(u.api("GET", base).json(), *hide))
    commit = u.api("POST", f"{base}/commit")
    seen += [commit.status_code, scrub(commit.json(), *hide)]
    wrong = os.urandom(len(target))
    put = u.api("PUT", f"{base}/blobs/{sha(target)}", data=wrong)
    seen += [put.status_code, scrub(put.json(), *hide, sha(wrong))]
    pack = u.api("POST", f"{base}/pack", data=f"{sha(target)} {len(target)}\n".encode() + wrong)
    seen += [pack.status_code, scrub(pack.json(), *hide, sha(wrong))]
    half = u.api("PUT", f"{base}/blobs/{sha(target)}", data=wrong[: len(wrong) // 2])
    seen += [half.status_code, scrub(half.json(), *hide)]
    seen.append(scrub(u.api("GET", base).json(), *hide))
    commit = u.api("POST", f"{base}/commit")
    seen += [commit.status_code, scrub(commit.json(), *hide)]
    assert u.api("DELETE", base).status_code == 204
    return seen


def victim_dataset(owner: User, work: Path, name: str) -> tuple[Path, Path]:
    """A private dataset with a hidden test split, pushed by *owner*: (train, test) folders."""
    train, test = work / f"{name}-train", work / f"{name}-test"
    for folder, files in (
        (train, {"secret.bin": os.urandom(300_000), "notes.txt": os.urandom(700)}),
        (test, {"labels.csv": os.urandom(900), "images.bin": os.urandom(2 << 20)}),
    ):
        folder.mkdir(parents=True)
        for rel, data in files.items():
            (folder / rel).write_bytes(data)
    owner.nsml(
        "dataset", "push", name, str(train), "--test-split", str(test), "--transport", "http"
    )
    return train, test


# ---- datasets over HTTP ----------------------------------------------------------------------


def test_another_users_private_file_or_hidden_split_named_by_hash_must_be_sent_and_never_leaks(
    hub: HubProcess, work: Path
) -> None:
    victim, thief = user(hub, "ca-victim"), user(hub, "ca-thief")
    train, test = victim_dataset(victim, work, "ca-private")
    before = blob_bytes(hub)
    stolen = {
        "private file": (train / "secret.bin").read_bytes(),
        "private small file": (train / "notes.txt").read_bytes(),
        "hidden split file": (test / "images.bin").read_bytes(),
        "hidden split small file": (test / "labels.csv").read_bytes(),
    }
    for what, target in stolen.items():
        nowhere = os.urandom(len(target))
        files = {"loot.bin": target, "mine.txt": b"the thief's own file"}
        claimed = probe(thief, "ca-loot", files, target)
        ghost = probe(thief, "ca-loot", {**files, "loot.bin": nowhere}, nowhere)
        assert claimed == ghost, f"{what}: the answers tell a stored hash from one stored nowhere"
        missing = claimed[1]["missing"]
        assert {"blake3": "<X>", "size": len(target), "offset": 0} in missing, (what, missing)
        assert claimed[5] == 409 and claimed[6]["reason"] == "upload_incomplete", what
        assert claimed[7] == claimed[9] == 400 and claimed[8]["reason"] == "integrity", what
        assert claimed[-2] == 409, f"{what}: wrong bytes do not complete the upload"
    assert_json_error(thief.api("GET", "datasets/ca-loot"), 404, "not_found")
    assert blob_bytes(hub) == before, "nothing the thief sent was stored"

    # Pulls by hash: the victim's version and the thief's own answer 404 for those hashes,
    # exactly as for a hash that exists nowhere.
    own = work / "own"
    own.mkdir()
    (own / "a.txt").write_bytes(b"the thief's own dataset")
    thief.nsml("dataset", "push", "ca-own", str(own))
    for target in stolen.values():
        nowhere = sha(os.urandom(64))
        for version in ("ca-private/versions/1", "ca-own/versions/1"):
            got = assert_json_error(
                thief.api("GET", f"datasets/{version}/blobs/{sha(target)}"), 404, "not_found"
            )
            ghost = assert_json_error(
                thief.api("GET", f"datasets/{version}/blobs/{nowhere}"), 404, "not_found"
            )
            assert got["message"].replace(sha(target), "X") == ghost["message"].replace(
                nowhere, "X"
            )
            pack = thief.api("POST", f"datasets/{version}/pack", json={"blobs": [sha(target)]})
            assert_json_error(pack, 404, "not_found")
    # Even the owner reads no hidden split file by its hash (only admins do).
    hidden = sha(stolen["hidden split file"])
    assert_json_error(
        victim.api("GET", f"datasets/ca-private/versions/1/blobs/{hidden}"), 404, "not_found"
    )
    r = victim.api("POST", "datasets/ca-private/versions/1/pack", json={"blobs": [hidden]})
    assert_json_error(r, 404, "not_found")
    r = victim.api(
        "POST", "datasets/ca-private/versions/1/pack", json={"blobs": [hidden], "split": "test"}
    )
    assert_json_error(r, 403, "forbidden")
    admin = User(hub, "admin", hub.user_token("admin"))
    r = admin.api("GET", f"datasets/ca-private/versions/1/blobs/{hidden}?split=test")
    assert r.status_code == 200 and r.content == stolen["hidden split file"]


def test_a_user_who_sends_the_bytes_pushes_them_and_the_store_keeps_one_copy(
    hub: HubProcess, work: Path
) -> None:
    """Possession is proven by sending the bytes: then the push completes, and the store,
    which already held them, does not grow."""
    victim, other = user(hub, "ca-holder"), user(hub, "ca-also-holder")
    train, _ = victim_dataset(victim, work, "ca-common")
    mine = work / "mine"
    mine.mkdir()
    (mine / "same.bin").write_bytes((train / "secret.bin").read_bytes())
    before = blob_bytes(hub)
    out = other.json("dataset", "push", "ca-mine", str(mine), "--transport", "http")
    assert out["sent_bytes"] == 300_000, "the bytes were sent"
    assert out["new_bytes"] == 300_000, "new to its pusher, whatever the store held"
    assert blob_bytes(hub) == before, "stored once"
    assert list((store_dir(hub) / "tmp").iterdir()) == []
    other.nsml("dataset", "pull", "ca-mine", str(work / "back"))
    assert tree(work / "back") == tree(mine)


def test_an_owners_new_version_public_and_team_datasets_are_skipped_without_sending(
    hub: HubProcess, work: Path
) -> None:
    owner = user(hub, "ca-sharer", groups=("ca-team",))
    member = user(hub, "ca-member", groups=("ca-team",))
    outsider = user(hub, "ca-outsider")
    folder = work / "shared"
    folder.mkdir()
    for i in range(20):
        (folder / f"f{i:02}.bin").write_bytes(os.urandom(50_000 + i))
    owner.nsml("dataset", "push", "ca-shared", str(folder), "--transport", "http")

    # The owner's next version sends only the changed file.
    (folder / "f07.bin").write_bytes(os.urandom(1234))
    out = owner.json("dataset", "push", "ca-shared", str(folder), "--transport", "http")
    assert (out["sent_bytes"], out["new_bytes"]) == (1234, 1234)

    files = {"copy.bin": (folder / "f03.bin").read_bytes(), "own.txt": b"own"}

    def must_send(u: User) -> set[str]:
        r = begin(u, f"ca-copy-{u.name}", files)
        assert r.status_code in (200, 201), r.text
        return {b["blake3"] for b in r.json()["missing"]}

    theirs = sha(files["copy.bin"])
    assert theirs in must_send(member) and theirs in must_send(outsider), "private"
    owner.nsml("dataset", "share", "ca-shared", "--team", "ca-team")
    assert must_send(member) == {sha(b"own")}, "a team member may skip the team's files"
    assert theirs in must_send(outsider), "an outsider may not"
    owner.nsml("dataset", "share", "ca-shared", "--public")
    assert must_send(outsider) == {sha(b"own")}, "anyone may skip a public dataset's files"
    # The upload begun while the files were private completes once its own file is sent.
    r = begin(outsider, "ca-copy-ca-outsider", files)
    assert r.status_code == 200 and r.json()["resumed"], r.text
    base = f"datasets/ca-copy-ca-outsider/uploads/{r.json()['upload_id']}"
    assert outsider.api("PUT", f"{base}/blobs/{sha(b'own')}", data=b"own").json()["complete"]
    version = outsider.api("POST", f"{base}/commit")
    assert version.status_code == 201 and version.json()["new_bytes"] == 3, version.text
    outsider.nsml("dataset", "pull", "ca-copy-ca-outsider", str(work / "copy"))
    assert {p: c for p, (c, _) in tree(work / "copy").items()} == files


# ---- datasets over the local transport -------------------------------------------------------


def test_over_the_local_transport_a_hash_claims_nothing_and_opens_nothing(
    hub: HubProcess, work: Path
) -> None:
    victim, thief = user(hub, "ca-local-victim"), user(hub, "ca-local-thief")
    train, test = victim_dataset(victim, work, "ca-local-private")
    secret = (train / "secret.bin").read_bytes()
    hidden = (test / "images.bin").read_bytes()
    mine = work / "mine.txt"
    mine.write_bytes(b"the thief's own bytes")

    grant = thief.api("POST", "dataset-store/local", json={}).json()
    with LocalChannel(grant["socket"], grant["key"], grant["uid"]) as ch:
        fd = os.open(mine, os.O_RDONLY)
        try:
            # A hint naming the victim's blob is not a claim: the server hashes what it got.
            got = ch.ingest([(fd, "mine.txt", sha(secret))])
            assert got == [(sha(b"the thief's own bytes"), 21)]
        finally:
            os.close(fd)
        assert ch.place() == (1, 21)
        with pytest.raises(LocalError, match="not part of the version this key reads"):
            ch.open([sha(secret)])
    # The key proves only what was handed over: the victim's hashes are still to be sent.
    for target in (secret, hidden):
        files = {"loot.bin": target, "mine.txt": mine.read_bytes()}
        r = begin(thief, "ca-local-loot", files, local_key=grant["key"])
        assert r.status_code == 201, r.text
        assert [b["blake3"] for b in r.json()["missing"]] == [sha(target)]
        base = f"datasets/ca-local-loot/uploads/{r.json()['upload_id']}"
        assert_json_error(thief.api("POST", f"{base}/commit"), 409, "upload_incomplete")
        assert thief.api("DELETE", base).status_code == 204
    # A key for a version the thief cannot read is refused, so no descriptor is handed out.
    r = thief.api("POST", "dataset-store/local", json={"dataset": "ca-local-private"})
    assert_json_error(r, 404, "not_found")
    r = thief.nsml(
        "dataset", "pull", "ca-local-private", str(work / "t"), "--transport", "local", check=False
    )
    assert r.returncode == 2 and not (work / "t").exists()

    # Whoever holds the bytes proves it by handing the file over: the push completes and
    # the store keeps one copy.
    copy = work / "copy"
    copy.mkdir()
    (copy / "secret-too.bin").write_bytes(secret)
    before = blob_bytes(hub)
    out = thief.json("dataset", "push", "ca-local-copy", str(copy), "--transport", "local")
    assert out["ref"] == "ca-local-copy@1" and out["sent_bytes"] == 0
    assert out["new_bytes"] == len(secret) and blob_bytes(hub) == before


# ---- code snapshots and checkpoints -----------------------------------------------------------

JOB_PY = """
import os, sys, time
import nsml

mode = sys.argv[1]
if mode == "save":
    def save(folder):
        with open(os.path.join(folder, "content.txt"), "w") as f:
            f.write(sys.argv[2])
    nsml.bind(save=save)
    nsml.save("c")
    print("saved", sys.argv[2], flush=True)
elif mode == "wait":
    time.sleep(600)
print("ran", mode, flush=True)
"""


def code_archive(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_another_users_code_digest_is_answered_as_an_unknown_one_and_never_runs(
    hub: HubProcess, work: Path
) -> None:
    alice, bob = hub.user_token("ca-coder"), hub.user_token("ca-code-thief")
    r = hub.nsml("POST", "code", alice, data=code_archive({"job.py": JOB_PY}))
    assert r.status_code == 201, r.text
    digest = r.json()["digest"]
    unknown = "0" * 64

    def start(token: str, code: str, **extra: Any) -> requests.Response:
        body = {"code": code, "entry": "job.py", "args": ["run"], "memory": "256M", **extra}
        return hub.nsml("POST", "sessions", token, json=body)

    for entry in ("job.py", "no-such-file.py"):
        got = assert_json_error(start(bob, digest, entry=entry), 404, "not_found")
        ghost = assert_json_error(start(bob, unknown, entry=entry), 404, "not_found")
        assert got["message"].replace(digest, "X") == ghost["message"].replace(unknown, "X")
    assert hub.nsml("GET", "sessions", bob).json()["sessions"] == [], "nothing ran"

    # The owner runs it.
    r = start(alice, digest)
    assert r.status_code == 201, r.text
    nsml = cli_for(hub, alice, work)
    name = r.json()["name"]
    assert wait_state(nsml, name)["state"] == "completed"
    # A private session is not forked by others; once public it is, and then its code may be
    # named by whoever can read the session.
    assert_json_error(hub.nsml("POST", f"sessions/{name}/fork", bob, json={}), 403, "forbidden")
    assert hub.nsml("PATCH", f"sessions/{name}", alice, json={"visibility": "public"}).ok
    assert start(bob, digest).status_code == 201
    assert hub.nsml("PATCH", f"sessions/{name}", alice, json={"visibility": "private"}).ok
    # Whoever uploads the same files (holds the code) gets the same digest and runs it.
    carol = hub.user_token("ca-code-twin")
    assert start(carol, digest).status_code == 404
    again = hub.nsml("POST", "code", carol, data=code_archive({"job.py": JOB_PY}))
    assert again.json()["digest"] == digest
    assert start(carol, digest).status_code == 201
    admin = hub.user_token("admin")
    assert start(admin, digest).status_code == 201, "admins may"
    for token in (bob, carol, admin):
        for s in hub.nsml("GET", "sessions", token).json()["sessions"]:
            wait_state(cli_for(hub, token, work), s["name"])


def test_a_forked_sessions_token_loads_only_the_checkpoint_of_the_session_it_came_from(
    hub: HubProcess, work: Path
) -> None:
    """The child of a fork may load the parent's checkpoint; if the parent is removed and a
    new session takes its name, that session's checkpoints are not the child's to read."""
    alice, bob = hub.user_token("ca-ckpt-owner"), hub.user_token("ca-ckpt-forker")
    project = work / "proj"
    project.mkdir()
    (project / "job.py").write_text(JOB_PY)
    a, b = cli_for(hub, alice, project), cli_for(hub, bob, project)
    parent = a("run", "--memory", "256M", "job.py", "--", "save", "old").stdout.strip()
    assert wait_state(a, parent)["state"] == "completed"
    assert hub.nsml("PATCH", f"sessions/{parent}", alice, json={"visibility": "public"}).ok
    child = b("fork", f"{parent}/c", "--", "wait").stdout.strip()
    wait_state(b, child, ("running",))
    try:
        env = dict(
            line.split("=", 1)
            for line in b("exec", child, "--", "env").stdout.splitlines()
            if "=" in line
        )
        api, token = env["NSML_API_URL"].rstrip("/"), env["NSML_TOKEN"]

        def load() -> requests.Response:
            return requests.get(
                f"{api}/sessions/{parent}/checkpoints/c",
                headers={"Authorization": f"token {token}"},
                timeout=30,
            )

        assert load().status_code == 200, "the checkpoint it was started from"
        a("rm", parent)
        again = a("run", "--memory", "256M", "job.py", "--", "save", "new").stdout.strip()
        assert again == parent, "the name is taken again"
        assert wait_state(a, again)["state"] == "completed"
        assert_json_error(load(), 403, "forbidden")
        assert status(a, again)["visibility"] == "private"
    finally:
        b("stop", child, "--wait")

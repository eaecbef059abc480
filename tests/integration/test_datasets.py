"""Datasets through the real client, the real NSML server and its store: push, pull, share.

Every test runs the ``nsml`` CLI as a user would (a subprocess with the user's hub token)
against the session's hub, and checks the store's files on disk where a claim is about bytes.
Dataset names carry the test's own prefix: the hub (and its store) is shared by the session.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest
import requests

from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_hub import assert_json_error

pytestmark = [pytest.mark.hub, pytest.mark.docker]

NSML = str(Path(sys.executable).parent / "nsml")
MANIFEST_FORMAT = "nsml-dataset-manifest/2"


# ---- helpers ----------------------------------------------------------------------------------


@dataclass
class User:
    """One hub user with a token, running ``nsml`` and calling the API."""

    hub: HubProcess
    name: str
    token: str

    def nsml(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [NSML, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"nsml {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.nsml(*args, "--json").stdout)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
        env.update(NSML_API_URL=self.hub.nsml_api + "/", NSML_TOKEN=self.token)
        return env

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        return self.hub.nsml(method, path, self.token, **kw)


def user(hub: HubProcess, name: str, groups: tuple[str, ...] = ()) -> User:
    token = hub.user_token(name)
    for g in groups:
        if hub.admin("GET", f"/groups/{g}").status_code == 404:
            hub.admin("POST", f"/groups/{g}").raise_for_status()
        hub.admin("POST", f"/groups/{g}/users", json={"users": [name]}).raise_for_status()
    if groups:
        token = hub.user_token(name)  # a fresh token: the service caches user models per token
    return User(hub, name, token)


def make_folder(root: Path, n_small: int = 40, large: tuple[int, ...] = (3 << 20,)) -> Path:
    """A folder of small files in sub-folders, a few large ones, an executable and a duplicate."""
    root.mkdir(parents=True)
    for i in range(n_small):
        p = root / f"part{i % 4}" / f"f{i:03}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(os.urandom(100 + 37 * i))
    for i, size in enumerate(large):
        (root / f"big{i}.bin").write_bytes(os.urandom(size))
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    shutil.copy(root / "part0" / "f000.txt", root / "copy-of-f000.txt")
    (root / "empty").write_bytes(b"")
    return root


def tree(root: Path) -> dict[str, tuple[bytes, bool]]:
    """Every file's content and executable bit, by relative path."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), bool(p.stat().st_mode & stat.S_IXUSR))
        for p in root.rglob("*")
        if p.is_file()
    }


def store_dir(hub: HubProcess) -> Path:
    return hub.state_dir / "datasets" / "store"


def blob_bytes(hub: HubProcess) -> int:
    """Bytes under the store's blobs/, measured on disk."""
    return sum(p.stat().st_size for p in (store_dir(hub) / "blobs").rglob("*") if p.is_file())


def sha(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def manifest_of(files: dict[str, bytes]) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "entries": [
            {"path": p, "size": len(d), "blake3": sha(d), "executable": False}
            for p, d in sorted(files.items())
        ],
    }


def readable_blobs(u: User) -> set[str]:
    """Every blob of every version *u* may read (what a push of theirs need not send)."""
    blobs: set[str] = set()
    for d in u.json("dataset", "ls"):
        for v in u.json("dataset", "info", d["name"])["version_list"]:
            m = u.api("GET", f"datasets/{d['name']}/versions/{v['version']}/manifest").json()
            blobs.update(e["blake3"] for e in m["entries"])
    return blobs


def gc_now(hub: HubProcess) -> dict[str, Any]:
    r = hub.nsml("POST", "dataset-store/gc", hub.user_token("admin"), json={"older_than_s": 0})
    assert r.status_code == 200, r.text
    return dict(r.json())


# ---- push, versions, dedup ----------------------------------------------------------------------


def test_a_second_push_with_one_file_changed_stores_only_that_files_bytes(
    hub: HubProcess, work: Path
) -> None:
    alice = user(hub, "ds-alice")
    folder = make_folder(work / "v", n_small=60, large=(2 << 20, 3 << 20))
    first = alice.nsml("dataset", "push", "dedup-mnist", str(folder), "--transport", "http")
    assert first.stdout.strip() == "dedup-mnist@1", first.stdout

    before = blob_bytes(hub)
    changed = folder / "part1" / "f005.txt"
    changed.write_bytes(os.urandom(4321))
    out = alice.json("dataset", "push", "dedup-mnist", str(folder), "--transport", "http")
    after = blob_bytes(hub)

    assert out["ref"] == "dedup-mnist@2"
    assert after - before == 4321, "the store grew by exactly the changed file"
    assert out["new_bytes"] == 4321 and out["sent_bytes"] == 4321
    assert out["bytes"] > 5 << 20

    # The same folder again is a new version that stores nothing.
    again = alice.json("dataset", "push", "dedup-mnist", str(folder), "--transport", "http")
    assert again["ref"] == "dedup-mnist@3" and again["new_bytes"] == again["sent_bytes"] == 0
    assert blob_bytes(hub) == after


def test_ls_info_pull_and_rm(hub: HubProcess, work: Path) -> None:
    alice = user(hub, "ds-lister")
    folder = make_folder(work / "src")
    assert alice.nsml("dataset", "push", "lip-data", str(folder)).stdout.strip() == "lip-data@1"
    (folder / "part2" / "new.txt").write_bytes(b"version two")
    assert alice.nsml("dataset", "push", "lip-data", str(folder)).stdout.strip() == "lip-data@2"

    listed = {d["name"]: d for d in alice.json("dataset", "ls")}
    d = listed["lip-data"]
    assert d["owner"] == "ds-lister" and d["scope"] == "mine" and d["visibility"] == "private"
    assert d["versions"] == 2 and d["latest"] == 2
    assert d["bytes"] == sum(len(c) for c, _ in tree(folder).values())
    assert alice.json("dataset", "ls", "--scope", "public") == [] or "lip-data" not in {
        x["name"] for x in alice.json("dataset", "ls", "--scope", "public")
    }
    table = alice.nsml("dataset", "ls").stdout
    assert "lip-data" in table and "private" in table and "LAST ACCESS" in table

    info = alice.json("dataset", "info", "lip-data")
    assert [v["ref"] for v in info["version_list"]] == ["lip-data@1", "lip-data@2"]
    assert info["version_list"][1]["new_bytes"] == len(b"version two")
    one = alice.json("dataset", "info", "lip-data@1")
    assert one["ref"] == "lip-data@1" and one["files"] == len(tree(folder)) - 1

    # Pull the latest: the same files, contents and executable bits; last access recorded.
    pulled = alice.nsml("dataset", "pull", "lip-data", str(work / "out"))
    assert pulled.stdout.strip().startswith("lip-data@2 -> ")
    assert tree(work / "out") == tree(folder)
    assert alice.json("dataset", "info", "lip-data")["last_access"] is not None
    # An older version by its number.
    alice.nsml("dataset", "pull", "lip-data@1", str(work / "out1"))
    assert "part2/new.txt" not in tree(work / "out1")
    # A destination that is not empty is refused; nothing is changed there.
    r = alice.nsml("dataset", "pull", "lip-data", str(work / "out"), check=False)
    assert r.returncode == 2 and "already exists" in r.stderr

    assert alice.nsml("dataset", "rm", "lip-data@1").stdout.strip() == "removed lip-data@1"
    info = alice.json("dataset", "info", "lip-data")
    assert [v["version"] for v in info["version_list"]] == [2]
    r = alice.nsml("dataset", "pull", "lip-data@1", str(work / "gone"), check=False)
    assert r.returncode == 2 and "has no version 1" in r.stderr and not (work / "gone").exists()
    # Versions are never reused: the next push is @3.
    assert alice.nsml("dataset", "push", "lip-data", str(folder)).stdout.strip() == "lip-data@3"
    out = alice.json("dataset", "rm", "lip-data")
    assert out["dataset_removed"] is True and out["versions"] == [2, 3]
    assert "lip-data" not in {x["name"] for x in alice.json("dataset", "ls")}


@pytest.mark.parametrize("transport", ["http", "local"])
def test_pull_verifies_every_file_against_its_hash(
    hub: HubProcess, work: Path, transport: str
) -> None:
    alice = user(hub, "ds-verifier")
    folder = make_folder(work / "src", n_small=5, large=(2 << 20,))
    name = f"verify-me-{transport}"
    alice.nsml("dataset", "push", name, str(folder), "--transport", transport)
    # Corrupt the stored blob of the large file (as a failing disk would).
    blob = store_dir(hub) / "blobs"
    digest = sha((folder / "big0.bin").read_bytes())
    path = blob / digest[:2] / digest[2:]
    mode = path.stat().st_mode
    path.chmod(0o644)
    original = path.read_bytes()
    try:
        path.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])  # never the same byte
        r = alice.nsml(
            "dataset", "pull", name, str(work / "out"), "--transport", transport, check=False
        )
        assert r.returncode == 2, r.stdout
        assert "big0.bin" in r.stderr and "corrupt" in r.stderr, r.stderr
        assert not (work / "out").exists(), "a failed pull leaves nothing"
        assert not [p for p in work.iterdir() if p.name.startswith(".out.partial")]
    finally:
        path.write_bytes(original)
        path.chmod(stat.S_IMODE(mode))
    alice.nsml("dataset", "pull", name, str(work / "out"), "--transport", transport)
    assert tree(work / "out") == tree(folder)


def test_the_local_transport_pushes_and_pulls_on_the_servers_machine(
    hub: HubProcess, work: Path
) -> None:
    alice, bob = user(hub, "ds-local-alice"), user(hub, "ds-local-bob")
    folder = make_folder(work / "v", n_small=300, large=(5 << 20,))
    blobs = store_dir(hub) / "blobs"
    stored = {p.parent.name + p.name for p in blobs.rglob("*") if p.is_file()}
    before, readable = blob_bytes(hub), readable_blobs(alice)
    out = alice.json("dataset", "push", "local-data", str(folder))
    assert out["ref"] == "local-data@1" and out["transport"] == "local"
    assert out["sent_bytes"] == 0, "no byte went through HTTP"
    new = {sha(c): len(c) for c, _ in tree(folder).values() if sha(c) not in stored}
    assert blob_bytes(hub) - before == sum(new.values()), "the store keeps one copy of each"
    unread = {sha(c): len(c) for c, _ in tree(folder).values()}
    for blob in readable:
        unread.pop(blob, None)
    assert out["new_bytes"] == sum(unread.values()), "what alice could not read before"

    # One file changed: the store grows by exactly its bytes; unchanged files are not copied.
    (folder / "part2" / "f006.txt").write_bytes(os.urandom(4321))
    before = blob_bytes(hub)
    out = alice.json("dataset", "push", "local-data", str(folder), "--transport", "local")
    assert out["ref"] == "local-data@2" and out["new_bytes"] == 4321
    assert blob_bytes(hub) - before == 4321
    assert alice.json("dataset", "info", "local-data@2")["new_bytes"] == 4321
    assert list((store_dir(hub) / "tmp").iterdir()) == []

    # Pulled back through descriptors: the same files and executable bits, the user's own.
    alice.nsml("dataset", "pull", "local-data", str(work / "back"), "--transport", "local")
    assert tree(work / "back") == tree(folder)
    (work / "back" / "run.sh").write_bytes(b"mine now")  # a writable copy, not the store's
    assert alice.json("dataset", "info", "local-data@2")["files"] == len(tree(folder))

    # Another user gets no key for a private dataset, and so no descriptor.
    r = bob.nsml(
        "dataset", "pull", "local-data", str(work / "bob"), "--transport", "local", check=False
    )
    assert r.returncode == 2 and "No dataset 'local-data'" in r.stderr, r.stderr
    assert not (work / "bob").exists()
    r2 = bob.api("POST", "dataset-store/local", json={"dataset": "local-data"})
    assert r2.status_code == 404 and r2.json()["reason"] == "not_found"
    assert bob.api("POST", "dataset-store/local", json={"bogus": 1}).status_code == 400
    # A push cannot claim another user's (or a made-up) key's stored bytes as its own.
    manifest = alice.api("GET", "datasets/local-data/versions/2/manifest").json()
    alice_key = alice.api("POST", "dataset-store/local", json={}).json()["key"]
    for key in (alice_key, "made-up"):
        r3 = bob.api(
            "POST", "datasets/bob-data/uploads", json={"manifest": manifest, "local_key": key}
        )
        assert r3.status_code == 403 and "local_key" in r3.json()["message"], r3.text
    r = alice.nsml(
        "dataset", "push", "x", str(folder), "--transport", "carrier-pigeon", check=False
    )
    assert r.returncode == 2 and "invalid choice" in r.stderr


# ---- visibility -------------------------------------------------------------------------------


def test_another_user_cannot_list_pull_or_read_a_private_dataset_until_it_is_public(
    hub: HubProcess, work: Path
) -> None:
    owner, other = user(hub, "ds-owner"), user(hub, "ds-other")
    folder = make_folder(work / "src", n_small=5, large=())
    owner.nsml("dataset", "push", "secret-data", str(folder))
    manifest = owner.api("GET", "datasets/secret-data/versions/1/manifest").json()
    a_blob = manifest["entries"][0]["blake3"]

    assert "secret-data" not in {d["name"] for d in other.json("dataset", "ls")}
    r = other.nsml("dataset", "pull", "secret-data", str(work / "stolen"), check=False)
    assert r.returncode == 2 and "No dataset 'secret-data' that you can read" in r.stderr
    assert not (work / "stolen").exists()
    # The API answers exactly as for a dataset that does not exist (no existence leak).
    for path in (
        "datasets/secret-data",
        "datasets/secret-data/versions/1",
        "datasets/secret-data/versions/1/manifest",
        f"datasets/secret-data/versions/1/blobs/{a_blob}",
    ):
        missing = assert_json_error(other.api("GET", path), 404, "not_found")
        ghost = assert_json_error(
            other.api("GET", path.replace("secret-data", "no-such-data")), 404, "not_found"
        )
        assert missing["message"].replace("secret-data", "X") == ghost["message"].replace(
            "no-such-data", "X"
        )
    pack = other.api("POST", "datasets/secret-data/versions/1/pack", json={"blobs": [a_blob]})
    assert_json_error(pack, 404, "not_found")
    # Nor can they mount it: a placement naming it is refused and nothing is queued.
    r = other.api("POST", "placements", json={"holder": "nb", "datasets": ["secret-data"]})
    assert "secret-data" in assert_json_error(r, 404, "not_found")["message"]
    assert other.api("GET", "placements").json()["placements"] == []
    # Nor push a version into the name, nor learn more than that it is taken.
    r = other.nsml("dataset", "push", "secret-data", str(folder), check=False)
    assert r.returncode == 2 and "taken by another user" in r.stderr

    owner.nsml("dataset", "share", "secret-data", "--public")
    listed = {d["name"]: d for d in other.json("dataset", "ls")}
    assert listed["secret-data"]["scope"] == "public"
    other.nsml("dataset", "pull", "secret-data", str(work / "shared"))
    assert tree(work / "shared") == tree(folder)
    # Public means readable, not writable.
    r = other.nsml("dataset", "push", "secret-data", str(folder), check=False)
    assert r.returncode == 2 and "belongs to ds-owner" in r.stderr
    assert_json_error(other.api("DELETE", "datasets/secret-data"), 403, "forbidden")
    assert_json_error(
        other.api("PATCH", "datasets/secret-data", json={"visibility": "private"}),
        403,
        "forbidden",
    )

    owner.nsml("dataset", "share", "secret-data", "--private")
    assert "secret-data" not in {d["name"] for d in other.json("dataset", "ls")}
    # Admins see everything.
    admin = User(hub, "admin", hub.user_token("admin"))
    assert {d["name"]: d for d in admin.json("dataset", "ls")}["secret-data"]["scope"] == "admin"


def test_a_team_shares_through_a_hub_group(hub: HubProcess, work: Path) -> None:
    owner = user(hub, "ds-lead", groups=("ds-vision",))
    member = user(hub, "ds-member", groups=("ds-vision",))
    outsider = user(hub, "ds-outsider", groups=("ds-speech",))
    folder = make_folder(work / "src", n_small=3, large=())
    owner.nsml("dataset", "push", "team-data", str(folder))

    r = owner.nsml("dataset", "share", "team-data", "--team", "ds-speech", check=False)
    assert r.returncode == 2 and "not a member of the group 'ds-speech'" in r.stderr
    assert owner.nsml("dataset", "share", "team-data", "--team", "ds-vision").stdout.strip() == (
        "team-data: team (team ds-vision)"
    )
    seen = {d["name"]: d for d in member.json("dataset", "ls", "--scope", "team")}
    assert seen["team-data"]["scope"] == "team" and seen["team-data"]["team"] == "ds-vision"
    member.nsml("dataset", "pull", "team-data", str(work / "m"))
    assert tree(work / "m") == tree(folder)

    assert "team-data" not in {d["name"] for d in outsider.json("dataset", "ls")}
    r = outsider.nsml("dataset", "pull", "team-data", str(work / "o"), check=False)
    assert r.returncode == 2 and "that you can read" in r.stderr


# ---- interrupted pushes -----------------------------------------------------------------------


def _kill_push_midway(alice: User, hub: HubProcess, name: str, folder: Path) -> None:
    """Start ``nsml dataset push`` and SIGKILL it once blob bytes are arriving at the server."""
    uploads = store_dir(hub) / "uploads"
    before = set(uploads.iterdir())
    proc = subprocess.Popen(
        [
            *(NSML, "dataset", "push", name, str(folder)),
            *("--no-progress", "--workers", "1", "--transport", "http"),
        ],
        env=alice.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:

        def receiving() -> bool:
            for up in set(uploads.iterdir()) - before:
                parts = list((up / "parts").glob("*"))
                if any(p.stat().st_size > 0 for p in parts):
                    return True
            return proc.poll() is not None

        wait_for(receiving, timeout=120, interval=0.005, what="the push's first bytes")
        assert proc.poll() is None, "the push ended before it could be killed; use more data"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def test_a_killed_push_leaves_no_version_resumes_and_gc_leaves_no_orphan(
    hub: HubProcess, work: Path
) -> None:
    alice = user(hub, "ds-killer")
    folder = make_folder(work / "src", n_small=20, large=(48 << 20, 48 << 20, 48 << 20))
    _kill_push_midway(alice, hub, "killed-data", folder)

    # No version is visible: not listed, no info, nothing to pull or mount.
    assert "killed-data" not in {d["name"] for d in alice.json("dataset", "ls")}
    r = alice.nsml("dataset", "info", "killed-data", check=False)
    assert r.returncode == 2 and "No dataset 'killed-data'" in r.stderr

    # Running the same push again resumes it: less than everything is sent.
    total = sum(len(c) for c, _ in tree(folder).values())
    out = alice.json("dataset", "push", "killed-data", str(folder), "--transport", "http")
    assert out["ref"] == "killed-data@1"
    assert 0 < out["sent_bytes"] < total, (out["sent_bytes"], total)
    alice.nsml("dataset", "pull", "killed-data", str(work / "back"))
    assert tree(work / "back") == tree(folder)

    # Killed again with other content, then collected: nothing of it stays in the store.
    other = make_folder(work / "other", n_small=10, large=(48 << 20, 48 << 20, 48 << 20))
    _kill_push_midway(alice, hub, "killed-data", other)
    assert alice.json("dataset", "info", "killed-data")["versions"] == 1
    report = gc_now(hub)
    assert report["uploads_removed"] >= 1 and report["missing_live"] == []
    store = store_dir(hub)
    assert list((store / "uploads").iterdir()) == []
    assert list((store / "tmp").iterdir()) == []
    # Every blob left is named by a live version's manifest: no orphan.
    live: set[str] = set()
    for m in (store / "manifests").glob("*.json"):
        live.update(e["blake3"] for e in json.loads(m.read_bytes())["entries"])
    on_disk = {p.parent.name + p.name for p in (store / "blobs").rglob("*") if p.is_file()}
    assert on_disk == live
    for content, _ in tree(other).values():
        if len(content) > 1000:
            assert sha(content) not in on_disk
    # The version that was committed is intact.
    alice.nsml("dataset", "pull", "killed-data@1", str(work / "again"))
    assert tree(work / "again") == tree(folder)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("../escape", id="dot-dot"),
        pytest.param("a/b", id="slash"),
        pytest.param(".hidden", id="leading dot"),
        pytest.param("with space", id="space"),
        pytest.param("x" * 65, id="65 characters"),
        pytest.param("naïve", id="not ASCII"),
    ],
)
def test_bad_dataset_names_are_refused(hub: HubProcess, work: Path, name: str) -> None:
    alice = user(hub, "ds-namer")
    folder = make_folder(work / "src", n_small=1, large=())
    before = set((store_dir(hub) / "uploads").iterdir())
    r = alice.nsml("dataset", "push", name, str(folder), check=False)
    assert (
        r.returncode == 2 and "invalid dataset name" in r.stderr and "letters, digits" in (r.stderr)
    )
    assert set((store_dir(hub) / "uploads").iterdir()) == before
    # The API refuses it too, with a JSON error.
    r2 = alice.api(
        "POST",
        f"datasets/{requests.utils.quote(name, safe='')}/uploads",
        json={"manifest": manifest_of({"a": b"a"})},
    )
    assert r2.status_code in (400, 404), r2.text
    assert set(r2.json()) == {"message", "reason"}


def _unsafe_symlink(root: Path) -> str:
    (root / "link").symlink_to("/etc/passwd")
    return "link"


def _unsafe_dir_symlink(root: Path) -> str:
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to("../..")
    return "sub/up"


def _fifo(root: Path) -> str:
    os.mkfifo(root / "pipe")
    return "pipe"


def _device(root: Path) -> str:
    os.mknod(root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    return "null"


def _too_large(root: Path) -> str:
    with open(root / "huge.bin", "wb") as f:
        f.truncate((100 << 30) + 1)  # sparse: one byte over the server's 100 GiB limit
    return "huge.bin"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        pytest.param(_unsafe_symlink, "outside the pushed folder", id="symlink leaving the folder"),
        pytest.param(_unsafe_dir_symlink, "outside the pushed folder", id="symlink to a parent"),
        pytest.param(_fifo, "FIFO", id="named pipe"),
        pytest.param(_device, "character device", id="device file"),
        pytest.param(_too_large, "over the limit", id="file over the size limit"),
    ],
)
def test_a_folder_with_an_unsafe_entry_is_refused_naming_it(
    hub: HubProcess, work: Path, make: Any, words: str
) -> None:
    alice = user(hub, "ds-unsafe")
    folder = make_folder(work / "src", n_small=3, large=())
    bad = make(folder)
    before = (blob_bytes(hub), set((store_dir(hub) / "uploads").iterdir()))
    r = alice.nsml("dataset", "push", "unsafe-data", str(folder), check=False, timeout=120)
    assert r.returncode == 2, r.stdout
    assert repr(bad) in r.stderr and words in r.stderr, r.stderr
    assert (blob_bytes(hub), set((store_dir(hub) / "uploads").iterdir())) == before
    assert "unsafe-data" not in {d["name"] for d in alice.json("dataset", "ls")}


@pytest.mark.parametrize(
    ("path", "words"),
    [
        pytest.param("../../etc/passwd", "'..' would leave the dataset folder", id="dot-dot"),
        pytest.param("/etc/passwd", "absolute path", id="absolute"),
        pytest.param("a/./b", "empty or '.' components", id="dot component"),
        pytest.param("bad\\name", "backslashes", id="backslash"),
    ],
)
def test_a_manifest_with_an_unsafe_path_is_refused_naming_it(
    hub: HubProcess, path: str, words: str
) -> None:
    alice = user(hub, "ds-crafter")
    m = manifest_of({"ok.txt": b"ok"})
    m["entries"].append({"path": path, "size": 1, "blake3": sha(b"x"), "executable": False})
    r = alice.api("POST", "datasets/crafted/uploads", json={"manifest": m})
    body = assert_json_error(r, 400, "unsafe_path")
    assert repr(path) in body["message"] and words in body["message"]


def test_bad_uploads_are_refused_with_json_errors_and_store_nothing(hub: HubProcess) -> None:
    alice, bob = user(hub, "ds-uploader"), user(hub, "ds-intruder")
    good, other = os.urandom(5000), os.urandom(300)
    files = {"good.bin": good, "other.bin": other}
    r = alice.api("POST", "datasets/bad-uploads/uploads", json={"manifest": manifest_of(files)})
    assert r.status_code == 201, r.text
    up = r.json()
    assert {b["blake3"] for b in up["missing"]} == {sha(good), sha(other)}
    base = f"datasets/bad-uploads/uploads/{up['upload_id']}"
    before = blob_bytes(hub)

    # Bytes that do not hash to the name in the URL.
    r = alice.api("PUT", f"{base}/blobs/{sha(good)}", data=os.urandom(5000))
    assert "corrupt" in assert_json_error(r, 400, "integrity")["message"]
    # More bytes than the blob has.
    r = alice.api("PUT", f"{base}/blobs/{sha(other)}", data=other + b"!")
    assert "more than its 300 bytes" in assert_json_error(r, 400, "integrity")["message"]
    # A blob the upload does not list.
    r = alice.api("PUT", f"{base}/blobs/{sha(b'stranger')}", data=b"stranger")
    assert_json_error(r, 404, "not_found")
    # An offset that is not where the blob stands.
    r = alice.api("PUT", f"{base}/blobs/{sha(good)}", params={"offset": 100}, data=good[100:])
    assert "resume there" in assert_json_error(r, 409, "bad_offset")["message"]
    # Not a BLAKE3, not an upload id.
    assert_json_error(alice.api("PUT", f"{base}/blobs/xyz", data=b"x"), 400, "bad_request")
    assert_json_error(
        alice.api("POST", "datasets/bad-uploads/uploads/nope/commit"), 400, "bad_request"
    )
    # An unknown upload, and someone else's.
    unknown = "0" * 32
    assert_json_error(
        alice.api("POST", f"datasets/bad-uploads/uploads/{unknown}/commit"), 404, "not_found"
    )
    assert_json_error(bob.api("GET", base), 404, "not_found")
    assert_json_error(bob.api("PUT", f"{base}/blobs/{sha(good)}", data=good), 404, "not_found")
    # A malformed pack; a pack with a wrong blob stores nothing of it.
    assert_json_error(alice.api("POST", f"{base}/pack", data=b"garbage\n"), 400, "bad_request")
    bad_pack = f"{sha(other)} 300\n".encode() + os.urandom(300)
    assert_json_error(alice.api("POST", f"{base}/pack", data=bad_pack), 400, "integrity")
    # Commit before every blob arrived.
    r = alice.api("POST", f"{base}/commit")
    assert "not uploaded yet" in assert_json_error(r, 409, "upload_incomplete")["message"]
    assert blob_bytes(hub) == before, "nothing of the bad requests was stored"
    assert_json_error(
        alice.api("GET", "datasets/bad-uploads"), 404, "not_found"
    )  # still no version

    # Then the right bytes, resumed halfway, and the commit.
    r = alice.api("PUT", f"{base}/blobs/{sha(good)}", data=good[:2000])
    assert r.json() == {"blake3": sha(good), "size": 5000, "received": 2000, "complete": False}
    again = alice.api("POST", "datasets/bad-uploads/uploads", json={"manifest": manifest_of(files)})
    assert again.status_code == 200 and again.json()["upload_id"] == up["upload_id"]
    assert {b["blake3"]: b["offset"] for b in again.json()["missing"]}[sha(good)] == 2000
    r = alice.api("PUT", f"{base}/blobs/{sha(good)}", params={"offset": 2000}, data=good[2000:])
    assert r.json()["complete"] is True
    pack = f"{sha(other)} 300\n".encode() + other
    assert alice.api("POST", f"{base}/pack", data=pack).json()["stored"] == 1
    r = alice.api("POST", f"{base}/commit")
    assert r.status_code == 201 and r.json()["ref"] == "bad-uploads@1"
    assert blob_bytes(hub) == before + 5300


def test_packs_and_blobs_larger_than_what_the_server_gathers_at_once(hub: HubProcess) -> None:
    """The server parses a pack and writes a blob in batches of several MiB: blobs that
    straddle two batches, a body sent in odd-sized pieces, and a pack cut inside a blob."""
    alice = user(hub, "ds-packer")
    rng = random.Random(7)
    small = {f"s/{i:04}.bin": os.urandom(rng.randrange(1, 900_000)) for i in range(50)}
    large = os.urandom((9 << 20) + 12345)
    cut = os.urandom(700_000)
    files = {**small, "large.bin": large, "cut.bin": cut}
    r = alice.api("POST", "datasets/big-packs/uploads", json={"manifest": manifest_of(files)})
    assert r.status_code == 201, r.text
    base = f"datasets/big-packs/uploads/{r.json()['upload_id']}"
    before = blob_bytes(hub)

    def pieces(data: bytes, size: int) -> Iterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    # A pack that ends inside its last blob: 400, and that blob is not stored.
    body = b"".join(f"{sha(d)} {len(d)}\n".encode() + d for d in list(small.values())[:3])
    body += f"{sha(cut)} {len(cut)}\n".encode() + cut[:1000]
    r = alice.api("POST", f"{base}/pack", data=body)
    assert "ends inside a blob" in assert_json_error(r, 400, "bad_request")["message"]
    assert not (store_dir(hub) / "blobs" / sha(cut)[:2] / sha(cut)[2:]).exists()

    # Every small blob in one pack of over 16 MiB, sent in pieces of 100,003 bytes.
    body = b"".join(f"{sha(d)} {len(d)}\n".encode() + d for d in [*small.values(), cut])
    assert len(body) > 2 * (8 << 20)
    r = alice.api("POST", f"{base}/pack", data=pieces(body, 100_003))
    assert r.status_code == 200, r.text
    assert r.json()["blobs"] == len(small) + 1
    # A 9 MiB blob in pieces of 65,537 bytes.
    r = alice.api("PUT", f"{base}/blobs/{sha(large)}", data=pieces(large, 65_537))
    assert r.json() == {
        "blake3": sha(large),
        "size": len(large),
        "received": len(large),
        "complete": True,
    }
    r = alice.api("POST", f"{base}/commit")
    assert r.status_code == 201, r.text
    assert blob_bytes(hub) == before + sum(len(d) for d in files.values())
    for d in files.values():
        assert (store_dir(hub) / "blobs" / sha(d)[:2] / sha(d)[2:]).read_bytes() == d


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "reason"),
    [
        pytest.param("GET", "datasets?scope=everyone", None, 400, "bad_request", id="bad scope"),
        pytest.param("GET", "datasets/x/versions/01", None, 400, "bad_request", id="version 01"),
        pytest.param("GET", "datasets/x/versions/-1", None, 400, "bad_request", id="version -1"),
        pytest.param(
            "DELETE", "datasets/x/versions/latest", None, 400, "bad_request", id="rm latest"
        ),
        pytest.param(
            "POST",
            "datasets/x/uploads",
            {"manifest": {"format": "zip"}},
            400,
            "bad_request",
            id="not a manifest",
        ),
        pytest.param(
            "POST",
            "datasets/x/uploads",
            {"manifest": {}, "colour": 1},
            400,
            "bad_request",
            id="unknown field",
        ),
        pytest.param(
            "POST",
            "datasets/x/uploads",
            {
                "manifest": {
                    "format": MANIFEST_FORMAT,
                    "entries": [{"path": "huge", "size": (100 << 30) + 1, "blake3": "a" * 64}],
                }
            },
            400,
            "too_large",
            id="file over the limit",
        ),
        pytest.param(
            "POST",
            "datasets/x/uploads",
            {
                "manifest": {
                    "format": MANIFEST_FORMAT,
                    "entries": [{"path": "a", "size": 1, "blake3": "A" * 64}],
                }
            },
            400,
            "bad_request",
            id="hash not lowercase hex",
        ),
        pytest.param(
            "PATCH",
            "datasets/x",
            {"visibility": "world"},
            400,
            "bad_request",
            id="unknown visibility",
        ),
        pytest.param(
            "POST", "dataset-store/gc", {"older_than_s": 0}, 403, "forbidden", id="gc by a user"
        ),
        pytest.param(
            "POST",
            "placements",
            {"holder": "h", "datasets": ["x@0"]},
            400,
            "bad_request",
            id="version 0 in a placement",
        ),
    ],
)
def test_bad_requests_are_json_errors(
    hub: HubProcess, method: str, path: str, body: Any, status: int, reason: str
) -> None:
    alice = user(hub, "ds-badreq")
    r = alice.api(method, path, json=body) if body is not None else alice.api(method, path)
    assert_json_error(r, status, reason)


# ---- placements name concrete versions --------------------------------------------------------


def test_a_placement_resolves_datasets_to_versions_with_their_bytes(
    hub: HubProcess, work: Path
) -> None:
    alice = user(hub, "ds-placer")
    folder = make_folder(work / "src", n_small=3, large=(1 << 20,))
    alice.nsml("dataset", "push", "placed-data", str(folder))
    (folder / "more.bin").write_bytes(os.urandom(1000))
    alice.nsml("dataset", "push", "placed-data", str(folder))
    v2 = alice.json("dataset", "info", "placed-data@2")
    r = alice.api(
        "POST",
        "placements",
        json={
            "holder": "ds-job",
            "cpu": 0.1,
            "memory": "64M",
            "datasets": ["placed-data"],
            "wait_s": 10,
        },
    )
    assert r.status_code == 201, r.text
    placed = r.json()
    try:
        assert placed["request"]["datasets"] == [
            {"ref": "placed-data@2", "bytes": v2["bytes"], "digest": v2["digest"]}
        ]
        # In use: it cannot be removed while the placement holds it.
        r = alice.api("DELETE", "datasets/placed-data/versions/2")
        assert "in use by ds-placer:ds-job" in assert_json_error(r, 409, "in_use")["message"]
        # An older version that nothing uses can go.
        assert alice.api("DELETE", "datasets/placed-data/versions/1").status_code == 200
    finally:
        alice.api("DELETE", f"placements/{placed['id']}")
    assert alice.api("DELETE", "datasets/placed-data").status_code == 200
    r = alice.api("POST", "placements", json={"holder": "ds-job2", "datasets": ["placed-data@1"]})
    assert "placed-data" in assert_json_error(r, 404, "not_found")["message"]
    assert [
        p for p in alice.api("GET", "placements").json()["placements"] if p["holder"] == "ds-job2"
    ] == []


def test_the_openapi_document_lists_the_dataset_endpoints(hub: HubProcess) -> None:
    from openapi_spec_validator import validate

    doc = requests.get(f"{hub.nsml_api}/openapi.json", timeout=10).json()
    validate(doc)
    assert {
        "/datasets",
        "/datasets/{name}",
        "/datasets/{name}/uploads",
        "/datasets/{name}/uploads/{upload_id}/blobs/{blake3}",
        "/datasets/{name}/uploads/{upload_id}/commit",
        "/datasets/{name}/versions/{version}/manifest",
        "/datasets/{name}/versions/{version}/blobs/{blake3}",
        "/placements/{id}/mounts",
    } <= set(doc["paths"])


# ---- leaderboard settings and the hidden test split -------------------------------------------


def test_a_hidden_test_split_is_stored_apart_and_only_admins_read_it(
    hub: HubProcess, work: Path
) -> None:
    owner, other = user(hub, "ds-board-owner"), user(hub, "ds-board-other")
    admin = User(hub, "admin", hub.user_token("admin"))
    train = make_folder(work / "train", n_small=6, large=(1 << 20,))
    test = work / "test"
    (test / "labels").mkdir(parents=True)
    (test / "labels" / "answers.csv").write_bytes(b"id,label\n1,cat\n2,dog\n")
    (test / "images.bin").write_bytes(os.urandom(300_000))
    r = owner.nsml("dataset", "push", "board-data", str(train), "--metric", "acc", check=False)
    assert r.returncode == 2 and "higher metric is better" in r.stderr
    out = owner.json(
        "dataset",
        "push",
        "board-data",
        str(train),
        "--test-split",
        str(test),
        "--metric",
        "accuracy",
        "--higher-is-better",
    )
    assert out["ref"] == "board-data@1"
    assert out["test_split"] == {"digest": None, "files": None, "bytes": None}, "hidden from users"

    info = owner.json("dataset", "info", "board-data")
    assert info["leaderboard"] == {"metric": "accuracy", "higher_is_better": True}
    seen = admin.json("dataset", "info", "board-data@1")["test_split"]
    assert seen["files"] == 2 and seen["bytes"] == sum(len(c) for c, _ in tree(test).values())
    assert seen["digest"] != out["digest"], "the split has its own manifest"
    assert (store_dir(hub) / "manifests" / f"{seen['digest']}.json").exists()
    main = owner.api("GET", "datasets/board-data/versions/1/manifest").json()
    assert {e["path"] for e in main["entries"]} == set(tree(train))

    # Users never read the split, not even the owner of a public dataset.
    owner.nsml("dataset", "share", "board-data", "--public")
    for u in (owner, other):
        r = u.nsml(
            "dataset", "pull", "board-data", str(work / f"t-{u.name}"), "--test-split", check=False
        )
        assert r.returncode == 2 and "hidden" in r.stderr, r.stderr
        assert_json_error(
            u.api("GET", "datasets/board-data/versions/1/manifest", params={"split": "test"}),
            403,
            "forbidden",
        )
        split_blob = sha((test / "images.bin").read_bytes())
        assert_json_error(
            u.api("GET", f"datasets/board-data/versions/1/blobs/{split_blob}"), 404, "not_found"
        )
        assert_json_error(
            u.api(
                "GET",
                f"datasets/board-data/versions/1/blobs/{split_blob}",
                params={"split": "test"},
            ),
            403,
            "forbidden",
        )
        # A pull of the version brings the training files only.
        u.nsml("dataset", "pull", "board-data", str(work / f"p-{u.name}"))
        assert tree(work / f"p-{u.name}") == tree(train)

    # Never mounted: the node's copy for a placement holds the training files only.
    placed = owner.api(
        "POST",
        "placements",
        json={
            "holder": "board-job",
            "cpu": 0.1,
            "memory": "64M",
            "datasets": ["board-data"],
            "wait_s": 20,
        },
    ).json()
    try:
        r = owner.api("POST", f"placements/{placed['id']}/mounts", params={"wait_s": 30})
        assert r.status_code == 200, r.text
        (m,) = r.json()["mounts"]
        assert tree(Path(m["host_path"])) == tree(train)
    finally:
        owner.api("DELETE", f"placements/{placed['id']}")

    # Admins (the evaluator) can.
    admin.nsml("dataset", "pull", "board-data@1", str(work / "split"), "--test-split")
    assert tree(work / "split") == tree(test)

    # The settings change on their own; a later version without a split has none.
    r = owner.api(
        "PATCH", "datasets/board-data", json={"metric": "loss", "higher_is_better": False}
    )
    assert r.json()["leaderboard"] == {"metric": "loss", "higher_is_better": False}
    v2 = owner.json("dataset", "push", "board-data", str(train))
    assert v2["ref"] == "board-data@2" and v2["test_split"] is None
    r = admin.nsml(
        "dataset", "pull", "board-data@2", str(work / "nosplit"), "--test-split", check=False
    )
    assert r.returncode == 2 and "has no hidden test split" in r.stderr

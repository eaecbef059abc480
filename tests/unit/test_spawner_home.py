"""Every user's home: its name, where it is mounted, who owns it, and that no one else gets it.

Pure builders of NSMLSpawner (``nsml_spawner.spec``) and the spawner's naming, compared as whole
values. The real volume, the real container and the browser are in
``tests/integration/test_homes.py`` and ``tests/browser/test_homes.py``.
"""

from __future__ import annotations

import re
import string
from types import SimpleNamespace
from typing import Any

import pytest

from nsml_spawner.spec import (
    HOME_INIT_SCRIPT,
    Home,
    home_for,
    home_init_container,
    home_labels,
    notebook_container,
)
from tests.unit.test_spawner_spec import HOST, Engine, allocation, create, options, settings

VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*\Z")


def spawner(name: str, **config: Any) -> Any:
    from traitlets.config import Config

    from nsml_spawner import NSMLSpawner

    cfg = Config()
    cfg.NSMLSpawner.prefix = "nsml-nb"  # as the hub config names the deployment
    for key, value in config.items():
        setattr(cfg.NSMLSpawner, key, value)
    return NSMLSpawner(config=cfg, user=SimpleNamespace(name=name, url=f"/user/{name}/"))


def test_a_home_volume_is_mounted_read_write_at_the_image_home() -> None:
    home = home_for("nsml-nb-home-alice")
    args = notebook_container(
        options(), allocation(), Engine("node-a", None), settings(), home=home
    )
    assert args.create == create()
    assert args.host_config == {
        **HOST,
        "binds": {"nsml-nb-home-alice": {"bind": "/home/jovyan", "mode": "rw"}},
    }


def test_a_shared_folder_is_mounted_the_same_way() -> None:
    home = home_for("/mnt/nfs/homes/alice", "/home/jovyan")
    args = notebook_container(options(), allocation(), Engine("a", None), settings(), home=home)
    assert args.host_config["binds"] == {
        "/mnt/nfs/homes/alice": {"bind": "/home/jovyan", "mode": "rw"}
    }


def test_an_operator_volume_at_the_home_path_wins_over_the_home() -> None:
    theirs = {"jupyterhub-user-alice": {"bind": "/home/jovyan/", "mode": "rw"}}
    home = home_for("nsml-nb-home-alice")
    args = notebook_container(
        options(), allocation(), Engine("a", None), settings(binds=theirs), home=home
    )
    assert args.host_config["binds"] == theirs


def test_other_binds_are_kept_next_to_the_home() -> None:
    shared = {"/srv/shared": {"bind": "/home/jovyan/shared", "mode": "ro"}}
    args = notebook_container(
        options(),
        allocation(),
        Engine("a", None),
        settings(binds=shared),
        home=home_for("nsml-nb-home-alice"),
    )
    assert args.host_config["binds"] == {
        "nsml-nb-home-alice": {"bind": "/home/jovyan", "mode": "rw"},
        **shared,
    }


@pytest.mark.parametrize(
    ("source", "kind", "node_local"),
    [
        ("nsml-nb-home-alice", "volume", True),
        ("jupyterhub-user-a.b_c", "volume", True),
        ("/mnt/nfs/homes/alice", "path", False),
    ],
)
def test_a_home_is_a_volume_on_a_node_or_a_shared_folder(
    source: str, kind: str, node_local: bool
) -> None:
    home = home_for(source)
    assert (home.kind, home.node_local) == (kind, node_local)


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("/mnt/nfs/homes/../../etc", id="a path that climbs out"),
        pytest.param("/mnt//homes/a", id="an empty path component"),
        pytest.param("/", id="the root"),
        pytest.param("bad name", id="a space in a volume name"),
        pytest.param("-leading", id="a volume name starting with a dash"),
        pytest.param("a/b", id="a relative path"),
        pytest.param("", id="empty"),
    ],
)
def test_a_home_that_is_neither_a_volume_name_nor_a_clean_path_is_refused(source: str) -> None:
    with pytest.raises(ValueError, match="expected a Docker volume name"):
        home_for(source)


TRICKY = [
    "alice",
    "a-b",
    "a_b",
    "a.b",
    "a-2db",
    "bob@example.org",
    "../../etc",
    "über",
    "日本",
    "a b",
    "-",
    "x" * 100,
]


def test_every_user_gets_a_distinct_valid_volume_no_other_user_can_name() -> None:
    names = {u: spawner(u)._home_of_user().source for u in TRICKY}
    assert len(set(names.values())) == len(TRICKY), names  # no two users share a home
    for user, name in names.items():
        assert VOLUME_NAME.match(name), (user, name)
        assert name.startswith("nsml-nb-home-")
        rest = name[len("nsml-nb-home-") :]
        assert set(rest) <= set(string.ascii_lowercase + string.digits + "-"), (user, name)
    assert names["alice"] == "nsml-nb-home-alice"


def test_every_user_gets_a_folder_of_their_own_under_the_shared_root() -> None:
    for user in TRICKY:
        home = spawner(user, home_volume="/mnt/nfs/homes/{username}")._home_of_user()
        parent, _, leaf = home.source.rpartition("/")
        assert parent == "/mnt/nfs/homes" and leaf not in ("", ".", ".."), (user, home)


def test_the_deployment_prefix_keeps_two_hubs_on_one_engine_apart() -> None:
    a = spawner("alice", prefix="lab-a")
    b = spawner("alice", prefix="lab-b")
    assert a._home_of_user().source == "lab-a-home-alice"
    assert b._home_of_user().source == "lab-b-home-alice"


def test_no_home_when_switched_off_or_when_docker_volumes_mount_the_home() -> None:
    assert spawner("alice", home_volume="")._home_of_user() is None
    from traitlets.config import Config

    from nsml_spawner import NSMLSpawner

    cfg = Config()
    cfg.DockerSpawner.volumes = {"jupyterhub-user-{username}": "/home/jovyan"}
    theirs = NSMLSpawner(config=cfg, user=SimpleNamespace(name="alice", url="/user/alice/"))
    assert theirs._home_of_user() is None


def test_a_bad_home_template_is_a_configuration_error_for_the_admin() -> None:
    from jupyterhub.spawner import SpawnException

    with pytest.raises(SpawnException) as e:
        spawner("alice", home_volume="/mnt/../{username}")._home_of_user()
    assert e.value.status_code == 500 and "tell an admin" in str(e.value.message)


def test_the_home_node_is_preferred_only_for_node_local_homes() -> None:
    s = spawner("alice")
    s._home = s._home_of_user()
    s.home_node = "node-b"
    assert s._home_preference() == "node-b"
    shared = spawner("alice", home_volume="/mnt/nfs/homes/{username}")
    shared._home = shared._home_of_user()
    shared.home_node = "node-b"
    assert shared._home_preference() is None


def test_home_labels_name_the_deployment_and_the_user() -> None:
    assert home_labels("nsml-nb", "alice") == {
        "org.jupyter.service": "jupyterhub",
        "nsml.kind": "home",
        "nsml.deployment": "nsml-nb",
        "nsml.user": "alice",
    }


def test_a_new_home_is_prepared_as_root_without_network_from_the_image_home() -> None:
    home = Home("nsml-nb-home-alice", "/home/jovyan", 1000, 100)
    create_kw, host_kw = home_init_container(home, "img:1", "nsml-nb-alice-home", {"a": "b"})
    assert create_kw == {
        "image": "img:1",
        "name": "nsml-nb-alice-home",
        "entrypoint": ["python3", "-c", HOME_INIT_SCRIPT],
        "command": ["/mnt/nsml-home", "/home/jovyan", "1000", "100"],
        "user": "0:0",
        "labels": {"a": "b"},
        "network_disabled": True,
    }
    assert host_kw == {"binds": {"nsml-nb-home-alice": {"bind": "/mnt/nsml-home", "mode": "rw"}}}


def run_init(home: Any, skel: Any) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", HOME_INIT_SCRIPT, str(home), str(skel), "1000", "100"],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def open_tmp() -> Any:
    """A scratch folder that every user may traverse (pytest's own is private to root), as
    the container's mount point is."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="nsml-home-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


needs_root = pytest.mark.skipif(
    not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0,
    reason="the home preparation runs as root (it gives the home to uid 1000)",
)


@needs_root
def test_a_new_home_gets_the_image_home_files_and_the_notebook_user_as_owner(
    open_tmp: Any,
) -> None:
    tmp_path = open_tmp
    skel = tmp_path / "skel"
    (skel / ".jupyter").mkdir(parents=True)
    (skel / ".bashrc").write_text("# skeleton\n")
    (skel / ".jupyter" / "config.json").write_text("{}")
    home = tmp_path / "home"
    home.mkdir()
    out = run_init(home, skel)
    assert (out.returncode, out.stdout.strip()) == (0, "new"), out.stderr
    assert (home / ".bashrc").read_text() == "# skeleton\n"
    for path in (home, home / ".bashrc", home / ".jupyter", home / ".jupyter" / "config.json"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (1000, 100), path


@needs_root
def test_a_home_with_files_is_left_as_it_is(open_tmp: Any) -> None:
    tmp_path = open_tmp
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    __import__("os").chown(home, 1000, 100)
    out = run_init(home, tmp_path / "no-skeleton")
    assert (out.returncode, out.stdout.strip()) == (0, "ready"), out.stderr
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]
    assert (home / "notes.txt").stat().st_uid == 0  # not re-owned: only a new home is


@needs_root
def test_a_home_the_notebook_user_cannot_write_is_refused_saying_why(open_tmp: Any) -> None:
    tmp_path = open_tmp
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    (home / "someone-elses").write_text("x")
    out = run_init(home, tmp_path)
    assert out.returncode == 3
    assert out.stdout.strip().endswith("and user 1000 cannot write it")
    assert "owned by uid 0" in out.stdout


VOLUME = Home("nsml-nb-home-alice")
REASON = (
    "placed on node-a; not on node-b, which holds the home folder: Insufficient gpu: "
    "requested 1, free 0 on node-b"
)


@pytest.mark.parametrize(
    ("home", "previous", "node", "created", "reason", "message", "kept_on"),
    [
        pytest.param(
            VOLUME,
            None,
            "node-a",
            True,
            "placed on node-a",
            "Mounted your home folder (volume nsml-nb-home-alice, at /home/jovyan) on node-a "
            "(new, kept when the server stops)",
            "node-a",
            id="a first server: a new home on its node",
        ),
        pytest.param(
            VOLUME,
            "node-a",
            "node-a",
            False,
            "placed on node-a",
            "Mounted your home folder (volume nsml-nb-home-alice, at /home/jovyan) on node-a "
            "(kept from before)",
            "node-a",
            id="back home: the files from before",
        ),
        pytest.param(
            VOLUME,
            "node-b",
            "node-a",
            True,
            REASON,
            "Your home folder is on node-b, but this server runs on node-a (Insufficient gpu: "
            "requested 1, free 0 on node-b). It gets a new, empty home folder kept on node-a; "
            "your files on node-b are there again when your server next runs on node-b.",
            "node-b",
            id="the home node is full: said why, and the home stays where the files are",
        ),
        pytest.param(
            VOLUME,
            "node-b",
            "node-a",
            False,
            REASON,
            "Your home folder is on node-b, but this server runs on node-a (Insufficient gpu: "
            "requested 1, free 0 on node-b). It gets the separate home folder kept on node-a; "
            "your files on node-b are there again when your server next runs on node-b.",
            "node-b",
            id="away again: the separate home from the last time",
        ),
        pytest.param(
            VOLUME,
            "node-a",
            "node-a",
            True,
            "placed on node-a",
            "Made a new, empty home folder (volume nsml-nb-home-alice, at /home/jovyan) on "
            "node-a: the one it held is gone (removed by an admin?)",
            "node-a",
            id="the volume was removed by an operator",
        ),
        pytest.param(
            Home("/mnt/nfs/homes/alice"),
            "node-b",
            "node-a",
            True,
            "placed on node-a",
            "Mounted your home folder (folder /mnt/nfs/homes/alice, at /home/jovyan): it is on a "
            "shared filesystem and kept",
            "node-b",
            id="a shared folder: the same everywhere",
        ),
    ],
)
def test_what_the_start_says_about_the_home(
    home: Home,
    previous: str | None,
    node: str,
    created: bool,
    reason: str,
    message: str,
    kept_on: str | None,
) -> None:
    from nsml_spawner.spec import home_news

    assert home_news(home, previous, node, created, reason) == (message, kept_on)

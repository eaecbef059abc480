"""Leaderboards end to end on the real hub and Docker engine: real evaluation containers.

Three users train on a dataset whose hidden split holds ten inputs (public x0-x5, private
x6-x9) and their labels; each model flips the labels it is told to. They submit; the
evaluations run their code without network on the inputs only, and the server scores them.
"""

from __future__ import annotations

import json
import secrets
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.integration.conftest import wait_for
from tests.integration.hubproc import HubProcess
from tests.integration.test_hub import assert_json_error
from tests.integration.test_sessions import Cli, cli_for, wait_state

pytestmark = [pytest.mark.hub, pytest.mark.docker]

TRAIN_PY = r"""
import argparse, json, os, socket, sys
import nsml

p = argparse.ArgumentParser()
p.add_argument("--flip", default="")
p.add_argument("--mode", default="ok")
p.add_argument("--port", type=int, default=0)
a = p.parse_args()
state = {}

def save(folder):
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump(state, f)

def load(folder):
    with open(os.path.join(folder, "model.json")) as f:
        state.update(json.load(f))

def scan(marker):
    hits = []
    for root, dirs, files in os.walk("/"):
        if root in ("/proc", "/sys", "/dev"):
            dirs[:] = []
            continue
        for name in files:
            path = os.path.join(root, name)
            try:
                if os.path.islink(path) or os.path.getsize(path) > 50_000_000:
                    continue
                with open(path, "rb") as f:
                    if marker in f.read():
                        hits.append(path)
            except OSError:
                pass
    nets = []
    for host, port in (("127.0.0.1", state["port"]), ("localhost", state["port"])):
        s = socket.socket()
        s.settimeout(3)
        try:
            s.connect((host, port))
            nets.append(f"{host}:{port} connected")
        except OSError as e:
            nets.append(f"{host}:{port} {type(e).__name__}")
        finally:
            s.close()
    return hits, nets

def infer(path):
    if state["mode"] == "slow":
        import time
        time.sleep(600)
    if state["mode"] == "crash":
        raise ValueError("the model exploded on input x3")
    if state["mode"] == "scan":
        hits, nets = scan(b"NSML-" + b"SECRET-")  # never whole in this file
        raise RuntimeError(f"scan hits={len(hits)} nets={nets}")
    out = {}
    for name in sorted(os.listdir(path)):
        y = int(open(os.path.join(path, name)).read()) % 2
        out[name] = 1 - y if name in state["flip"] else y
    return out

if a.mode == "noinfer":
    nsml.bind(save=save, load=load)
else:
    nsml.bind(save=save, load=load, infer=infer)
state.update(flip=[x for x in a.flip.split(",") if x], mode=a.mode, port=a.port)
nsml.save("final")
print("trained")
"""


@pytest.fixture(scope="module")
def board(hub: HubProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A public dataset with a hidden test split (public and private labels), metric accuracy."""
    work = tmp_path_factory.mktemp("board")
    name = f"lb{secrets.token_hex(3)}"
    (work / "train").mkdir()
    (work / "train" / "readme.txt").write_text("training data\n")
    inputs = work / "inputs"
    inputs.mkdir()
    for i in range(10):
        (inputs / f"x{i}").write_text(str(i))
    (work / "labels.csv").write_text("id,label\n" + "".join(f"x{i},{i % 2}\n" for i in range(6)))
    (work / "private.csv").write_text(
        "id,label\n" + "".join(f"x{i},{i % 2}\n" for i in range(6, 10))
    )
    project = work / "project"
    project.mkdir()
    (project / "train.py").write_text(TRAIN_PY)
    owner = cli_for(hub, hub.user_token("lb-owner"), project)
    owner(
        "dataset",
        "push",
        name,
        str(work / "train"),
        "--test-inputs",
        str(inputs),
        "--test-labels",
        str(work / "labels.csv"),
        "--private-labels",
        str(work / "private.csv"),
        "--metric",
        "accuracy",
    )
    owner("dataset", "share", name, "--public")
    return {"name": name, "project": project, "owner": owner, "work": work}


def submit(nsml: Cli, session: str, *extra: str, check: bool = True) -> dict[str, Any]:
    r = nsml("submit", session, "--wait", "--json", *extra, check=check)
    return dict(json.loads(r.stdout)) if r.stdout.strip() else {"stderr": r.stderr}


def trained(nsml: Cli, dataset: str, *args: str) -> str:
    name = nsml("run", "-d", dataset, "train.py", "--", *args).stdout.strip()
    st = wait_state(nsml, name, timeout=180)
    assert st["state"] == "completed", st
    return name


def test_ranks_ties_private_part_limit_and_failures(hub: HubProcess, board: dict[str, Any]) -> None:
    ds, project = board["name"], board["project"]
    alice = cli_for(hub, hub.user_token("lb-alice"), project)
    bob = cli_for(hub, hub.user_token("lb-bob"), project)
    carol = cli_for(hub, hub.user_token("lb-carol"), project)
    # alice: every public label right, every private one wrong; bob and carol: half the
    # public ones wrong, every private one right.
    a = trained(alice, ds, "--flip", "x6,x7,x8,x9")
    b = trained(bob, ds, "--flip", "x0,x1,x2")
    c = trained(carol, ds, "--flip", "x3,x4,x5")
    sa = submit(alice, a)
    assert sa["state"] == "scored" and sa["score"] == 1.0, sa
    assert sa["private_score"] is None, "hidden while the board is open"
    assert sa["checkpoint"] == "final" and sa["dataset"] == f"{ds}@1"
    sb = submit(bob, f"{b}/final")
    assert (sb["state"], sb["score"]) == ("scored", 0.5), sb
    sc = submit(carol, c)
    assert (sc["state"], sc["score"]) == ("scored", 0.5), sc

    shown = json.loads(carol("leaderboard", ds, "--json").stdout)
    assert [(r["rank"], r["user"], r["score"]) for r in shown["rows"]] == [
        (1, "lb-alice", 1.0),
        (2, "lb-bob", 0.5),  # a tie goes to the earlier submission
        (3, "lb-carol", 0.5),
    ]
    assert [r["mine"] for r in shown["rows"]] == [False, False, True]
    assert all(r["private_score"] is None for r in shown["rows"])
    assert shown["has_private"] and not shown["closed"]
    text = carol("leaderboard", ds).stdout
    assert "accuracy (higher is better)" in text and "lb-alice" in text

    # A crashing infer fails with its reason and last lines; it is not ranked.
    crash = trained(bob, ds, "--mode", "crash")
    failed = bob("submit", crash, "--wait", check=False)
    assert failed.returncode == 1, failed
    assert "failed: infer failed (exit code 1): ValueError: the model exploded on input x3" in (
        failed.stdout
    )
    listed = json.loads(bob("submissions", "--json").stdout)
    assert [s["state"] for s in listed] == ["scored", "failed"]
    assert ", in infer\n" in listed[1]["message"], "the traceback's last lines come along"
    rows = json.loads(bob("leaderboard", ds, "--all", "--json").stdout)["rows"]
    assert [r["user"] for r in rows] == ["lb-alice", "lb-bob", "lb-carol"]

    # The daily limit holds and says when the next submission is allowed.
    board["owner"]("dataset", "board", ds, "--daily-limit", "2")
    refused = bob("submit", b, check=False)
    assert refused.returncode == 2
    assert "in the last 24 hours, its limit; the next is allowed at 20" in refused.stderr
    assert refused.stderr.strip().endswith("UTC."), refused.stderr
    ok = alice("submit", a, "--json")  # alice has one of her two left
    assert json.loads(ok.stdout)["state"] in ("queued", "running", "scored")

    # Closing the board shows the private part and ranks by it.
    board["owner"]("dataset", "board", ds, "--close")
    wait_for(
        lambda: all(
            s["state"] in ("scored", "failed")
            for s in json.loads(alice("submissions", "--json").stdout)
        ),
        120,
        0.5,
        "alice's second evaluation",
    )
    closed = json.loads(carol("leaderboard", ds, "--json").stdout)
    assert closed["closed"]
    assert [(r["user"], r["score"], r["public_score"]) for r in closed["rows"]] == [
        ("lb-bob", 1.0, 0.5),
        ("lb-carol", 1.0, 0.5),
        ("lb-alice", 0.0, 1.0),
    ]
    late = carol("submit", c, check=False)
    assert late.returncode == 2 and "is closed" in late.stderr


def test_the_labels_are_out_of_reach_of_submitted_code(
    hub: HubProcess, board: dict[str, Any]
) -> None:
    """An infer that searches its whole filesystem for the labels' marker and tries the
    network finds nothing and connects nowhere; the marker appears nowhere its submitter
    can read."""
    work, project = board["work"], board["project"]
    marker = f"NSML-SECRET-{secrets.token_hex(8)}"
    name = f"lbs{secrets.token_hex(3)}"
    inputs = work / "secret-inputs"
    inputs.mkdir()
    (inputs / "x0").write_text("0")
    (work / "secret.csv").write_text(f"id,label\nx0,{marker}\n")
    owner = board["owner"]
    owner(
        "dataset",
        "push",
        name,
        str(work / "train"),
        "--test-inputs",
        str(inputs),
        "--test-labels",
        str(work / "secret.csv"),
        "--metric",
        "accuracy",
    )
    owner("dataset", "share", name, "--public")
    mallory = cli_for(hub, hub.user_token("lb-mallory"), project)
    port = urlsplit(hub.nsml_api).port
    assert port is not None
    # The session itself reaches the API on this port (it saved its checkpoint there).
    session = trained(mallory, name, "--mode", "scan", "--port", str(port))
    out = mallory("submit", session, "--wait", "--json", check=False)
    sub = json.loads(out.stdout)
    assert sub["state"] == "failed", sub
    assert "RuntimeError: scan hits=0 nets=" in sub["message"], sub["message"]
    assert "connected" not in sub["message"], "no connection from an evaluation"
    readable = [
        out.stdout,
        out.stderr,
        mallory("submissions", "--json").stdout,
        mallory("leaderboard", name, "--json").stdout,
        mallory("logs", session).stdout,
        hub.nsml("GET", f"submissions/{sub['id']}", hub.user_token("lb-mallory")).text,
    ]
    for text in readable:
        assert marker not in text


def test_who_cannot_read_the_dataset_cannot_see_or_submit(
    hub: HubProcess, board: dict[str, Any]
) -> None:
    ds = board["name"]
    owner = board["owner"]
    owner("dataset", "share", ds, "--private")
    try:
        token = hub.user_token("lb-stranger")
        r = hub.nsml("GET", f"datasets/{ds}/leaderboard", token)
        assert_json_error(r, 404)
        r = hub.nsml("POST", "submissions", token, json={"session": "lb-alice/" + ds + "/1"})
        assert_json_error(r, 404)
        r = hub.nsml("GET", "submissions/1", token)
        assert_json_error(r, 404)
        # The owner still sees it.
        assert hub.nsml("GET", f"datasets/{ds}/leaderboard", hub.user_token("lb-owner")).ok
    finally:
        owner("dataset", "share", ds, "--public")


SCORER = r"""
import csv, sys
pred = {r["id"]: r["prediction"] for r in csv.DictReader(open(sys.argv[1]))}
gold = {r["id"]: r["label"] for r in csv.DictReader(open(sys.argv[2]))}
print("scoring", len(gold), "ids")
print(100 * sum(pred[k] == v for k, v in gold.items()) / len(gold))
"""


def test_a_custom_scorer_a_missing_infer_and_the_time_limit(
    hub: HubProcess, board: dict[str, Any]
) -> None:
    work, project, owner = board["work"], board["project"], board["owner"]
    name = f"lbc{secrets.token_hex(3)}"
    (work / "score.py").write_text(SCORER)
    owner(
        "dataset",
        "push",
        name,
        str(work / "train"),
        "--test-inputs",
        str(work / "inputs"),
        "--test-labels",
        str(work / "labels.csv"),
        "--private-labels",
        str(work / "private.csv"),
    )
    shown = owner(
        "dataset", "board", name, "--scorer", str(work / "score.py"), "--higher-is-better"
    ).stdout
    assert f"{name}: custom (higher is better)" in shown
    owner("dataset", "share", name, "--public")
    dora = cli_for(hub, hub.user_token("lb-dora"), project)
    s = trained(dora, name, "--flip", "x0,x6")
    sub = submit(dora, s)
    # One of the six public ids wrong; one of the four private ones (hidden while open).
    assert (sub["state"], sub["score"]) == ("scored", pytest.approx(500 / 6)), sub
    assert "scoring" not in json.dumps(sub), "the scorer's output is never shown"

    noinfer = trained(dora, name, "--mode", "noinfer")
    sub = submit(dora, noinfer, check=False)
    assert sub["state"] == "failed"
    assert sub["message"].startswith("the program ended without predictions: call nsml.bind(")

    owner("dataset", "board", name, "--timeout", "10")
    slow = trained(dora, name, "--mode", "slow")
    sub = submit(dora, slow, check=False)
    assert sub["state"] == "failed"
    assert sub["message"] == "the evaluation took longer than the dataset's limit of 10 s"

"""Leaderboard verbs of the ``nsml`` CLI (the ``%nsml`` magics use the same parsers):
``submit``, ``submissions``, ``leaderboard``, and ``dataset board`` for the owner's rules."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import _args
from ._fmt import ago, print_json, text_table
from .client import Client

#: Seconds between looks at a submission that ``submit --wait`` follows.
POLL_S = 1.0
#: An option not given (None is a value: no limit, GPUs as the session).
_UNSET: Any = object()

SUBMISSION_COLUMNS = [
    ("id", "ID"),
    ("dataset", "DATASET"),
    ("session", "SESSION"),
    ("checkpoint", "CHECKPOINT"),
    ("state", "STATE"),
    ("score", "SCORE"),
    ("when", "SUBMITTED"),
]
BOARD_COLUMNS = [
    ("rank", "#"),
    ("user", "USER"),
    ("session", "SESSION"),
    ("checkpoint", "CHECKPOINT"),
    ("score", "SCORE"),
    ("when", "SUBMITTED"),
]


def score_text(x: float | None) -> str | None:
    """A score as shown: up to 6 significant digits; None for no score."""
    if x is None or not math.isfinite(x):
        return None
    return f"{x:.6g}"


def split_ref(ref: str) -> tuple[str, str | None]:
    """``USER/DATASET/N[/CHECKPOINT]`` as the session and the checkpoint (or None)."""
    parts = ref.strip("/").split("/")
    if len(parts) == 3:
        return ref.strip("/"), None
    if len(parts) == 4 and parts[3]:
        return "/".join(parts[:3]), parts[3]
    raise _args.UsageProblem(
        f"{ref!r} is not a session USER/DATASET/N or one of its checkpoints "
        "USER/DATASET/N/CHECKPOINT"
    )


def submission_line(sub: dict[str, Any]) -> str:
    """One line about a submission: its state, then its score or why it failed."""
    head = f"submission {sub['id']} of {sub['session']}/{sub['checkpoint']} to {sub['dataset']}"
    if sub["state"] == "scored":
        text = f"{head}: scored {score_text(sub['score'])}"
        if sub.get("private_score") is not None:
            text += f" (private {score_text(sub['private_score'])})"
        return text
    if sub["state"] in ("failed", "stopped"):
        return f"{head}: {sub['state']}: {sub.get('message') or 'no reason given'}"
    return f"{head}: {sub['state']}"


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    session, checkpoint = split_ref(args.session)
    body: dict[str, Any] = {"session": session}
    if checkpoint is not None:
        body["checkpoint"] = checkpoint
    sub = client.request("POST", "submissions", body)
    if args.wait:
        while sub["state"] in ("queued", "running"):
            time.sleep(POLL_S)
            sub = client.request("GET", f"submissions/{sub['id']}")
    if args.json:
        print_json(sub)
    else:
        print(submission_line(sub))
    return 1 if sub["state"] in ("failed", "stopped") else 0


def cmd_submissions(client: Client, args: argparse.Namespace) -> int:
    params = {"dataset": args.dataset} if args.dataset else {}
    subs = client.request("GET", "submissions", **params)["submissions"]
    if args.json:
        print_json(subs)
        return 0
    rows = [{**s, "score": score_text(s["score"]), "when": ago(s["submitted"])} for s in subs]
    print(text_table(rows, SUBMISSION_COLUMNS))
    for s in subs:
        if s["state"] in ("failed", "stopped"):
            print(f"{s['id']}: {(s.get('message') or '').splitlines()[0]}")
    return 0


def board_rows(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The leaderboard's rows as shown (scores formatted, times relative)."""
    rows = []
    for r in board["rows"]:
        row = {**r, "score": score_text(r["score"]), "when": ago(r["submitted"])}
        if board["closed"] and board["has_private"]:
            row["public"] = score_text(r["public_score"])
        rows.append(row)
    return rows


def board_title(board: dict[str, Any]) -> str:
    order = "higher is better" if board["higher_is_better"] else "lower is better"
    text = f"{board['dataset']}: {board['metric'] or 'no metric'} ({order})"
    if board["closed"]:
        text += ", closed" + (": ranked by the private part" if board["has_private"] else "")
    elif board["has_private"]:
        text += "; a private part is scored and shown when the board closes"
    if board["daily_limit"] is not None:
        text += f"; {board['daily_limit']} submissions per user in 24 hours"
    return text


def cmd_leaderboard(client: Client, args: argparse.Namespace) -> int:
    board = client.request(
        "GET", f"datasets/{quote(args.dataset, safe='')}/leaderboard", all="1" if args.all else "0"
    )
    if args.json:
        print_json(board)
        return 0
    columns = list(BOARD_COLUMNS)
    if board["closed"] and board["has_private"]:
        columns.insert(5, ("public", "PUBLIC"))
    print(board_title(board))
    print(text_table(board_rows(board), columns))
    return 0


def _limit(text: str) -> int | None:
    if text in ("none", "off"):
        return None
    return _args.integer(0, 10_000, "a number of submissions (or 'none')")(text)


def _eval_gpus(text: str) -> int | None:
    if text == "session":
        return None
    return _args.integer(0, 64, "a number of GPUs (or 'session')")(text)


def cmd_board(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.metric is not None:
        body["metric"] = args.metric
    if args.higher_is_better is not None:
        body["higher_is_better"] = args.higher_is_better
    if args.daily_limit is not _UNSET:
        body["daily_limit"] = args.daily_limit
    if args.timeout is not None:
        body["eval_timeout_s"] = args.timeout
    if args.gpus is not _UNSET:
        body["eval_gpus"] = args.gpus
    if args.closed is not None:
        body["closed"] = args.closed
    if args.scorer is not None:
        try:
            body["scorer"] = Path(args.scorer).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise _args.UsageProblem(f"cannot read --scorer {args.scorer!r}: {e}") from None
        body.setdefault("metric", "custom")
    name = quote(args.name, safe="")
    if body:
        client.request("PATCH", f"datasets/{name}", body)
    board = client.request("GET", f"datasets/{name}/leaderboard")
    if args.json:
        print_json({k: v for k, v in board.items() if k != "rows"})
    else:
        print(board_title(board))
        gpus = "as the session had" if board["eval_gpus"] is None else board["eval_gpus"]
        print(f"evaluations: at most {board['eval_timeout_s']} s, GPUs {gpus}")
    return 0


def add_board_verbs(sub: argparse._SubParsersAction[_args.Parser]) -> None:
    """``submit``, ``submissions`` and ``leaderboard``."""

    def verb(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=fn)
        return sp

    sp = verb(
        "submit",
        cmd_submit,
        "submit a session's checkpoint (default: its latest) to its dataset's leaderboard: "
        "the platform runs its infer on the hidden test inputs, without network, and scores it",
    )
    sp.add_argument("session", help="USER/DATASET/N or USER/DATASET/N/CHECKPOINT")
    sp.add_argument(
        "--wait", action="store_true", help="wait for the score (exit 1 if the evaluation fails)"
    )
    sp = verb("submissions", cmd_submissions, "list my submissions and their scores")
    sp.add_argument("--dataset", help="only those to this dataset")
    sp = verb(
        "leaderboard",
        cmd_leaderboard,
        "a dataset's leaderboard: each user's best (ties go to the earlier submission)",
    )
    sp.add_argument("dataset", help="the dataset's name")
    sp.add_argument("--all", action="store_true", help="every submission, not each user's best")


def add_board_action(dataset_sub: argparse._SubParsersAction[_args.Parser]) -> None:
    """``nsml dataset board NAME``: show or set the leaderboard's rules (its owner)."""
    help = (
        "show or set NAME's leaderboard rules (owner): metric, daily limit, evaluation time "
        "and GPUs, close or reopen"
    )
    sp = dataset_sub.add_parser("board", help=help, description=help)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_board)
    sp.add_argument("name", help="the dataset")
    sp.add_argument(
        "--metric",
        help="accuracy, macro_f1, roc_auc (higher is better), mse, rmse or mae (lower is better)",
    )
    order = sp.add_mutually_exclusive_group()
    order.add_argument(
        "--higher-is-better", dest="higher_is_better", action="store_true", default=None
    )
    order.add_argument("--lower-is-better", dest="higher_is_better", action="store_false")
    sp.add_argument(
        "--daily-limit",
        type=_limit,
        default=_UNSET,
        metavar="N",
        help="submissions per user in any 24 hours ('none': no limit)",
    )
    sp.add_argument(
        "--timeout",
        type=_args.integer(10, 7 * 24 * 3600, "a number of seconds"),
        metavar="SECONDS",
        help="an evaluation's time limit",
    )
    sp.add_argument(
        "--gpus",
        type=_eval_gpus,
        default=_UNSET,
        metavar="N",
        help="GPUs of an evaluation ('session': as the submitted session had)",
    )
    sp.add_argument(
        "--scorer",
        metavar="FILE.py",
        help="a custom scoring script (metric 'custom'; say --higher-is-better or "
        "--lower-is-better): run as `python score.py PREDICTIONS LABELS` without network, "
        "with only those files, it prints the score of LABELS' ids on its last line",
    )
    state = sp.add_mutually_exclusive_group()
    state.add_argument(
        "--close",
        dest="closed",
        action="store_true",
        default=None,
        help="take no more submissions; show and rank by the private part",
    )
    state.add_argument("--reopen", dest="closed", action="store_false", help="open it again")

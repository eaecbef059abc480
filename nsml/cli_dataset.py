"""``nsml dataset push|ls|info|pull|rm|share|gc``: the dataset verbs of the CLI."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from . import _args
from . import datasets as ds
from ._fmt import ago, human, print_json
from .cli_board import add_board_action
from .client import Client, NSMLError

__all__ = ["add_dataset_verb", "human", "push_note"]

#: Requests in flight at once, at most (``--workers``).
MAX_WORKERS = 64
#: ``gc --older-than``, at most: ten years, in seconds.
MAX_AGE_S = 10 * 365 * 86400.0


def push_note(result: ds.PushResult) -> str:
    """What a push did, in plain words: files and size, how much of it was new, and how the
    bytes travelled."""
    v = result.version
    total, new = int(v["bytes"]), int(result.new_bytes)
    files = int(v["files"])
    text = f"{result.ref}: {files} file{'s' if files != 1 else ''}, {human(total)}"
    if new < total:
        text += f" ({human(new)} of it new; the rest was in versions you can read)"
    if result.transport == "local":
        text += "; the server read the files from this machine's disk (nothing was sent over "
        text += "the network)"
    else:
        text += f"; {human(result.sent_bytes)} sent over the network"
    return text


def cmd_push(client: Client, args: argparse.Namespace) -> int:
    if (args.test_inputs is None) != (args.test_labels is None):
        raise _args.UsageProblem("--test-inputs and --test-labels go together")
    if args.private_labels is not None and args.test_inputs is None:
        raise _args.UsageProblem("--private-labels goes with --test-inputs and --test-labels")
    if args.test_inputs is not None and args.test_split is not None:
        raise _args.UsageProblem(
            "give --test-split FOLDER or --test-inputs/--test-labels, not both"
        )
    with contextlib.ExitStack() as stack:
        test_split = args.test_split
        if args.test_inputs is not None:
            test_split = stack.enter_context(
                ds.staged_test_split(args.test_inputs, args.test_labels, args.private_labels)
            )
        return _push(client, args, test_split)


def _push(client: Client, args: argparse.Namespace, test_split: str | None) -> int:
    bar = ds.progress_bar((not args.no_progress and sys.stderr.isatty()) or args.progress)
    try:
        result = ds.push(
            client,
            args.name,
            args.folder,
            test_split=test_split,
            metric=args.metric,
            higher_is_better=args.higher_is_better,
            on_progress=bar,
            workers=args.workers,
            transport=args.transport,
        )
    except KeyboardInterrupt:
        print("nsml: push interrupted; run the same command again to resume it", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print_json(
            {
                **result.version,
                "sent_bytes": result.sent_bytes,
                "new_bytes": result.new_bytes,
                "transport": result.transport,
            }
        )
    else:
        # The result (NAME@k) alone on standard output, for scripts; the summary is a note
        # (standard error on a terminal; the cell's output in a notebook).
        print(result.ref)
        print(push_note(result), file=getattr(args, "notes", None) or sys.stderr)
    return 0


def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    items = ds.ls(client, args.scope)
    if args.json:
        print_json(items)
        return 0
    print(
        f"{'NAME':<28} {'OWNER':<14} {'SHARED':<16} {'VERS':>4} {'LATEST':>6} {'SIZE':>10} "
        "LAST ACCESS"
    )
    for d in items:
        shared = d["visibility"] + (f":{d['team']}" if d.get("team") else "")
        print(
            f"{d['name']:<28} {d['owner']:<14} {shared:<16} {d['versions']:>4} "
            f"{d['latest'] or '-':>6} {human(d['bytes']):>10} {ago(d['last_access'])}"
        )
    return 0


def cmd_info(client: Client, args: argparse.Namespace) -> int:
    out = ds.info(client, args.ref)
    if args.json:
        print_json(out)
        return 0
    if "version_list" not in out:
        _print_version(out)
        return 0
    board = out.get("leaderboard")
    print(
        f"{out['name']}  owner {out['owner']}, {out['visibility']}"
        + (f" (team {out['team']})" if out.get("team") else "")
    )
    if board:
        order = "higher" if board["higher_is_better"] else "lower"
        print(f"leaderboard: {board['metric']}, {order} is better")
    print(f"last access: {ago(out['last_access'])}")
    for v in out["version_list"]:
        _print_version(v)
    return 0


def _print_version(v: dict[str, Any]) -> None:
    split = " + hidden test split" if v.get("test_split") else ""
    print(
        f"  {v['ref']:<24} {v['files']:>7} files {human(v['bytes']):>10}  "
        f"(+{human(v['new_bytes'])} new)  by {v['created_by']} {ago(v['created'])}{split}"
    )


def cmd_pull(client: Client, args: argparse.Namespace) -> int:
    bar = ds.progress_bar((not args.no_progress and sys.stderr.isatty()) or args.progress)
    try:
        ref, dest = ds.pull(
            client,
            args.ref,
            args.folder,
            split="test" if args.test_split else "",
            on_progress=bar,
            workers=args.workers,
            transport=args.transport,
        )
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print_json({"ref": ref, "path": str(dest)})
    else:
        print(f"{ref} -> {dest}")
    return 0


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    out = ds.rm(client, args.ref)
    if args.json:
        print_json(out)
    else:
        gone = ", ".join(f"{out['name']}@{k}" for k in out["versions"]) or "no version"
        print(f"removed {gone}" + (f"; {out['name']} is gone" if out["dataset_removed"] else ""))
    return 0


def cmd_share(client: Client, args: argparse.Namespace) -> int:
    if args.team:
        out = ds.share(client, args.name, "team", args.team)
    else:
        out = ds.share(client, args.name, "public" if args.public else "private")
    if args.json:
        print_json(out)
    else:
        print(
            f"{out['name']}: {out['visibility']}"
            + (f" (team {out['team']})" if out.get("team") else "")
        )
    return 0


def cmd_gc(client: Client, args: argparse.Namespace) -> int:
    out = ds.gc(client, args.older_than)
    if args.json:
        print_json(out)
    else:
        print(
            f"removed {out['uploads_removed']} stale uploads, {out['blobs_removed']} blobs "
            f"({human(out['bytes_freed'])}), {out['tmp_removed']} temporary files"
        )
    return 0


def add_dataset_verb(sub: argparse._SubParsersAction[_args.Parser]) -> None:
    """Add ``nsml dataset ...`` to the CLI's verbs."""
    p = sub.add_parser(
        "dataset",
        help="push, list, pull and share versioned datasets",
        description="Datasets: push a folder once as NAME@k (only what you cannot already read "
        "is sent; one copy of each file is stored), mount it in sessions and notebook servers "
        "read-only under /data/NAME, share it.",
    )
    verbs = p.add_subparsers(dest="dataset_verb", metavar="ACTION")
    verbs.required = True

    def action(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = verbs.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(fn=_guard(fn))
        return sp

    def progress_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
        sp.add_argument(
            "--progress", action="store_true", help="a progress bar even when not on a terminal"
        )
        sp.add_argument(
            "--workers",
            type=_args.integer(1, MAX_WORKERS, "a number of requests"),
            default=ds.DEFAULT_WORKERS,
            metavar="N",
            help=f"requests in flight at once, 1 to {MAX_WORKERS} (default {ds.DEFAULT_WORKERS})",
        )
        sp.add_argument(
            "--transport",
            choices=ds.TRANSPORTS,
            default="auto",
            help="local: on the server's machine, let the server read the files from this "
            "machine's disk (as fast as a local copy); http: send the bytes over the network; "
            "auto (default): local when the server offers it and answers, else http",
        )

    sp = action(
        "push",
        cmd_push,
        "upload FOLDER as the next version of NAME and print NAME@k; run it again to resume "
        "an interrupted push",
    )
    sp.add_argument("name", help="dataset name: letters, digits, '-', '_', '.' (max 64)")
    sp.add_argument("folder", help="the folder to push (symlinks leaving it are refused)")
    sp.add_argument(
        "--test-split",
        metavar="FOLDER",
        help="a hidden test split, stored apart: never mounted, pullable only by admins "
        "(for a leaderboard: inputs/ and labels.csv in it, or use --test-inputs)",
    )
    sp.add_argument(
        "--test-inputs",
        metavar="FOLDER",
        help="the leaderboard's hidden test inputs: an evaluation's infer reads them",
    )
    sp.add_argument(
        "--test-labels",
        metavar="FILE",
        help="their labels, a CSV file 'id,label' (id: an input's path under the inputs "
        "folder, or any name the predictions use); no user code ever reads it",
    )
    sp.add_argument(
        "--private-labels",
        metavar="FILE",
        help="labels of a private part of the inputs ('id,label'): scored apart and shown "
        "only when the board closes",
    )
    sp.add_argument(
        "--metric",
        help="the leaderboard's metric: accuracy, macro_f1, roc_auc, mse, rmse or mae "
        "(others need --higher-is-better or --lower-is-better)",
    )
    order = sp.add_mutually_exclusive_group()
    order.add_argument(
        "--higher-is-better", dest="higher_is_better", action="store_true", default=None
    )
    order.add_argument("--lower-is-better", dest="higher_is_better", action="store_false")
    progress_flags(sp)

    sp = action("ls", cmd_ls, "list the datasets you can read: yours, your teams', public ones")
    sp.add_argument("--scope", choices=["mine", "team", "public", "all"], default="all")

    sp = action("info", cmd_info, "a dataset and its versions (NAME), or one version (NAME@k)")
    sp.add_argument("ref", metavar="NAME[@k]")

    sp = action("pull", cmd_pull, "download NAME[@k] into a new FOLDER, verifying every file")
    sp.add_argument("ref", metavar="NAME[@k]")
    sp.add_argument("folder")
    sp.add_argument("--test-split", action="store_true", help="the hidden test split (admins)")
    progress_flags(sp)

    sp = action(
        "rm", cmd_rm, "remove NAME@k, or all of NAME; refused while a session or server uses it"
    )
    sp.add_argument("ref", metavar="NAME[@k]")

    sp = action("share", cmd_share, "who may read NAME: a team (a hub group), everyone, or you")
    sp.add_argument("name")
    who = sp.add_mutually_exclusive_group(required=True)
    who.add_argument("--team", metavar="GROUP", help="members of this JupyterHub group")
    who.add_argument("--public", action="store_true", help="every user")
    who.add_argument("--private", action="store_true", help="only you (and admins)")

    add_board_action(verbs)

    sp = action("gc", cmd_gc, "remove stale uploads and unreferenced files from the store (admin)")
    sp.add_argument(
        "--older-than",
        type=_args.seconds(0, MAX_AGE_S),
        default=24 * 3600,
        metavar="SECONDS",
        help="keep uploads idle for less than this, 0 to ten years (default one day)",
    )


def _guard(fn: Any) -> Any:
    """Turn an unexpected dataset-library error into the CLI's error line."""

    def run(client: Client, args: argparse.Namespace) -> int:
        from nsml_datasets import DatasetError

        try:
            return int(fn(client, args))
        except DatasetError as e:
            raise NSMLError(e.message, reason=e.reason) from None

    return run

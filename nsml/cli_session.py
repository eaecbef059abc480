"""The session verbs of the ``nsml`` CLI: thin formatting over :mod:`nsml.sessions`."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from typing import Any

from . import _args, sessions
from ._fmt import ago, args_table, human, print_json, text_table
from .client import Client
from .snapshot import NEAR_LIMIT, describe

Verb = Callable[[Client, argparse.Namespace], int]


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _metrics(m: dict[str, Any], most: int = 3) -> str:
    items = list(m.items())[:most]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float | int) else f"{k}={v}" for k, v in items)


def _gpus(st: dict[str, Any]) -> str:
    g = st["resources"]["gpus"]
    return f"{g:g}" if g else "-"


def start_run(
    client: Client,
    args: argparse.Namespace,
    cell: str | None = None,
    on_upload: Callable[[sessions.CodeUpload], None] | None = None,
) -> dict[str, Any]:
    """Start the session `nsml run` (or ``%nsml run``; *cell*: ``%%nsml run``) describes;
    *on_upload* is told what the code snapshot held once it is stored."""
    if args.team is not None and args.private:
        raise _args.UsageProblem(
            "nsml run: --team makes a team session; give --team or --private, not both"
        )
    return sessions.run(
        client,
        args.script,
        args.rest,
        folder=args.folder,
        cell=cell,
        gpus=args.gpus,
        gpu_models=args.gpu_model or [],
        datasets=args.dataset or [],
        cpu=args.cpu,
        memory=args.memory,
        image=args.image,
        memo=args.memo or "",
        public=args.public,
        private=args.private,
        team=args.team,
        restart_on_lost=args.restart_on_lost,
        on_upload=on_upload,
    )


def start_fork(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """Start the child session `nsml fork` (or ``%nsml fork``) describes."""
    return sessions.fork(
        client,
        args.session,
        args.rest if args.rest or args.no_args else None,
        gpus=args.gpus,
        cpu=args.cpu,
        memory=args.memory,
        image=args.image,
        memo=args.memo,
    )


def upload_note(up: sessions.CodeUpload) -> str:
    """What a code upload held, for a person: files and size, what was left out, and near
    the limit the biggest entries with the hint to list them in ``.nsmlignore``."""
    lines = [
        f"code: {up.files} file{'s' if up.files != 1 else ''}, {human(up.bytes)} uploaded"
        + (f" from {up.folder}" if up.folder else "")
    ]
    if up.skipped:
        shown = "; ".join(up.skipped[:5])
        more = f"; and {len(up.skipped) - 5} more" if len(up.skipped) > 5 else ""
        lines.append(f"  left out: {shown}{more}")
    if up.near_limit:
        used = []
        if up.bytes >= NEAR_LIMIT * up.max_bytes:
            used.append(f"{up.bytes / up.max_bytes:.0%} of the {human(up.max_bytes)} limit")
        if up.files >= NEAR_LIMIT * up.max_files:
            used.append(f"{up.files} of the {up.max_files} files allowed")
        lines.append(
            f"  close to the limit ({', '.join(used) or 'most of it'}); the biggest: "
            f"{describe(up.biggest)}. List what the session does not need in .nsmlignore "
            "(e.g. data/ or *.ckpt) and put data in a dataset."
        )
    return "\n".join(lines)


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    notes = getattr(args, "notes", None) or sys.stderr
    st = start_run(client, args, on_upload=lambda up: print(upload_note(up), file=notes))
    if args.json:
        print_json(st)
    else:
        print(st["name"])
    return 0


def gpu_use_text(st: dict[str, Any]) -> str:
    """A running session's current GPU use, ``gpu 87% 10.2G`` (mean utilisation over its GPUs,
    memory in use summed); empty when its GPUs report none (virtual ones never do)."""
    use = [g for g in st.get("gpu_use") or () if g.get("utilization_pct") is not None]
    if not use:
        return ""
    pct = sum(float(g["utilization_pct"]) for g in use) / len(use)
    mib = sum(int(g.get("memory_used_mib") or 0) for g in use)
    return f"gpu {pct:.0f}% {mib / 1024:.1f}G"


def cmd_ps(client: Client, args: argparse.Namespace) -> int:
    rows = sessions.ps(
        client,
        state="active" if args.active else args.state,
        all_users=args.all,
        teams=args.teams,
        dataset=args.dataset,
        limit=args.limit,
    )
    if args.json:
        print_json(rows)
        return 0
    print(
        f"{'NAME':<28} {'STATE':<10} {'GPUS':>4} {'NODE':<14} {'CREATED':>9} {'TIME':>8}  "
        "METRICS / MEMO"
    )
    for st in rows:
        extra = _metrics(st["last_metrics"])
        if st["state"] == "queued" and st.get("queue"):
            q = st["queue"]
            extra = f"#{q['position']} in queue: {q['reason']}"
        elif st["state"] in ("failed", "oom_killed", "lost") and st.get("message"):
            extra = st["message"]
        use = gpu_use_text(st)
        if use:
            extra = f"{use}  {extra}" if extra else use
        if st.get("memo"):
            extra = f"{extra}  [{st['memo']}]" if extra else f"[{st['memo']}]"
        print(
            f"{st['name']:<28} {st['state']:<10} {_gpus(st):>4} {st['node'] or '-':<14} "
            f"{ago(st['created'], '-'):>9} {_duration(st['duration_s']):>8}  {extra}"
        )
    return 0


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    st = sessions.status(client, args.session)
    if args.json:
        print_json(st)
    else:
        print(status_text(st))
    return 0


def status_text(st: dict[str, Any]) -> str:
    """A session's description (as ``sessions.status`` gives it) for a person, line by line."""
    res = st["resources"]
    lines = [
        f"{st['name']}: {st['state']}",
        f"  command   {st['entry']} {shlex.join(st['args'])}".rstrip(),
        f"  image     {st['image']}",
        f"  resources {res['gpus']:g} GPU, {res['cpu']:g} CPU, {res['memory_mib']} MiB"
        + (f", datasets {', '.join(st['datasets'])}" if st["datasets"] else ""),
        f"  node      {st['node'] or '-'}"
        + (f", GPUs {','.join(st['gpu_ids'])}" if st["gpu_ids"] else ""),
        f"  exit code {st['exit_code'] if st['exit_code'] is not None else '-'}",
        f"  created   {st['created']}  started {st['started'] or '-'}  "
        f"finished {st['finished'] or '-'}",
    ]
    if st.get("queue"):
        q = st["queue"]
        lines.append(f"  queue     #{q['position']}: {q['reason']}")
    elif st.get("message") and st["state"] != "completed":
        lines.append(f"  why       {st['message']}")
    if st["last_metrics"]:
        lines.append(f"  step {st['last_step']}: {_metrics(st['last_metrics'], 20)}")
    if st.get("parent"):
        lines.append(
            f"  forked from {st['parent']}"
            + (f" at checkpoint {st['parent_checkpoint']}" if st.get("parent_checkpoint") else "")
        )
    if st.get("attempt", 1) > 1 or st.get("restart_on_lost"):
        lines.append(
            f"  attempt   {st.get('attempt', 1)}"
            + (" (requeued if its node is lost)" if st.get("restart_on_lost") else "")
            + (f", loading {st['load_from']}" if st.get("load_from") else "")
        )
    if st.get("memo"):
        lines.append(f"  memo      {st['memo']}")
    return "\n".join(lines)


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    if args.json:
        print_json(sessions.logs(client, args.session, tail=args.tail))
        return 0
    if args.follow:
        for text in sessions.follow_logs(client, args.session, tail=args.tail):
            sys.stdout.write(text)
            sys.stdout.flush()
        return 0
    offset = 0
    tail = args.tail
    while True:
        chunk = sessions.logs(client, args.session, offset=offset, tail=tail)
        tail = None
        sys.stdout.write(chunk["text"])
        offset = chunk["next_offset"]
        if offset >= chunk["size"] or not chunk["text"]:
            return 0


def cmd_stop(client: Client, args: argparse.Namespace) -> int:
    st = sessions.stop(client, args.session)
    if args.wait:
        st = sessions.wait(client, st["name"])
    if args.json:
        print_json(st)
    else:
        print(
            f"{st['name']}: {st['state']}"
            + (" (stopping)" if st["stop_requested"] and st["state"] == "running" else "")
        )
    return 0


def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    for name in args.sessions:
        sessions.rm(client, name, force=args.force)
        print(f"removed {name}")
    return 0


def cmd_fork(client: Client, args: argparse.Namespace) -> int:
    st = start_fork(client, args)
    if args.json:
        print_json(st)
    else:
        print(st["name"])
    return 0


def cmd_resume(client: Client, args: argparse.Namespace) -> int:
    st = sessions.resume(client, args.session)
    if args.json:
        print_json(st)
    else:
        print(
            f"{st['name']}: {st['state']}" + (f" from {st['load_from']}" if st["load_from"] else "")
        )
    return 0


def diff_text(d: dict[str, Any]) -> str:
    """Two sessions' differences (as ``sessions.diff`` gives them) for a person: the
    arguments that differ as a table (name, A, B), other settings the same way, then the code
    as a unified diff."""
    a, b = str(d["a"]), str(d["b"])
    rows = [
        {"name": n, "a": va, "b": vb}
        for n, va, vb in args_table(d.get("args", {}).get("a", []), d.get("args", {}).get("b", []))
    ]
    for key, v in d["fields"].items():
        va, vb = v["a"], v["b"]
        if isinstance(va, dict) and isinstance(vb, dict):
            rows += [
                {"name": k, "a": _setting(va.get(k)), "b": _setting(vb.get(k))}
                for k in dict.fromkeys([*va, *vb])
                if va.get(k) != vb.get(k)
            ]
        else:
            rows.append({"name": key, "a": _setting(va), "b": _setting(vb)})
    out = []
    if rows:
        out.append(text_table(rows, [("name", "NAME"), ("a", a), ("b", b)]))
    for c in d["code"]:
        if c["diff"]:
            out.append(c["diff"].rstrip("\n"))
        else:
            out.append(f"{c['change']}: {c['path']} (binary or too large to compare)")
    if not out:
        return f"{a} and {b} run the same code with the same arguments"
    return "\n\n".join(out)


def _setting(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def cmd_diff(client: Client, args: argparse.Namespace) -> int:
    d = sessions.diff(client, args.a, args.b)
    if args.json:
        print_json(d)
    else:
        print(diff_text(d))
    return 0


def cmd_memo(client: Client, args: argparse.Namespace) -> int:
    st = sessions.memo(client, args.session, args.text)
    print(f"{st['name']}: {st['memo']}")
    return 0


def cmd_model(client: Client, args: argparse.Namespace) -> int:
    rows = sessions.model(client, args.session)
    if args.json:
        print_json(rows)
        return 0
    print(f"{'CHECKPOINT':<24} {'STEP':>8} {'SIZE':>10}  SAVED")
    for c in rows:
        step = c["step"] if c["step"] is not None else "-"
        print(f"{c['name']:<24} {step:>8} {c['size'] / 1e6:>8.2f}MB  {ago(c['created'], '-')}")
    return 0


def cmd_pull(client: Client, args: argparse.Namespace) -> int:
    print(sessions.pull(client, args.session, args.dest))
    return 0


def cmd_exec(client: Client, args: argparse.Namespace) -> int:
    if not args.rest:
        raise ValueError("give the command after --, e.g. nsml exec SESSION -- nvidia-smi")
    r = sessions.exec_in(client, args.session, args.rest, timeout_s=args.timeout)
    if args.json:
        print_json(r)
        return 0
    sys.stdout.write(r["output"])
    return int(r["exit_code"]) if 0 <= int(r["exit_code"]) < 256 else 1


def cmd_getid(client: Client, args: argparse.Namespace) -> int:
    print(sessions.getid(client, args.dataset))
    return 0


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    feed = sessions.events(client, since=args.since, all_users=args.all)
    if args.json:
        print_json(feed)
        return 0
    for e in feed["events"]:
        print(f"{e['id']:>6} {e['created'][:19]} {e['session']:<28} {e['kind']:<8} {e['message']}")
    return 0


def _resources(sp: argparse.ArgumentParser, defaults: bool) -> None:
    sp.add_argument(
        "--gpus",
        type=_args.gpus,
        default=0 if defaults else None,
        help=f"GPUs: 0, a fraction below 1, or a whole number up to {_args.MAX_GPUS}"
        + (" (default 0)" if defaults else ""),
    )
    sp.add_argument(
        "--cpu",
        type=_args.cpu,
        help=f"CPU cores, 0.001 to {_args.MAX_CPU} (default: the server's, 1)",
    )
    sp.add_argument(
        "--memory",
        type=_args.memory,
        help="memory limit, e.g. 8G or 512M, 1M to 1024T (default: the server's, 1G)",
    )
    sp.add_argument("--image", help="container image (default: the server's)")
    sp.add_argument("--memo", help="a note kept with the session")


def add_session_verbs(sub: argparse._SubParsersAction[_args.Parser]) -> None:
    """Add the session verbs to the ``nsml`` parser's subcommands."""

    def verb(name: str, fn: Verb, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            sp.set_defaults(json=False)
        sp.set_defaults(fn=fn)
        return sp

    sp = verb(
        "run",
        cmd_run,
        "start a session: upload this folder (honouring .nsmlignore) and run SCRIPT in the "
        "background; prints the new session's name. Script arguments go after --, e.g. "
        "nsml run train.py --gpus 2 -- --lr 0.1",
    )
    sp.add_argument("script", help="the entry point, relative to the folder (.py, .sh, ...)")
    _resources(sp, defaults=True)
    sp.add_argument(
        "-d", "--dataset", action="append", metavar="DATASET", help="mount a dataset (repeatable)"
    )
    sp.add_argument("--gpu-model", action="append", metavar="MODEL", help="acceptable GPU model")
    sp.add_argument("--folder", default=".", help="the code folder (default: the current one)")
    who = sp.add_mutually_exclusive_group()
    who.add_argument("--public", action="store_true", help="let every user read and fork it")
    who.add_argument(
        "--private",
        action="store_true",
        help="only you and admins read it (default unless a team pays for your work)",
    )
    sp.add_argument(
        "--team",
        metavar="TEAM",
        help="a team session of TEAM (a hub group of yours): its members read and fork it, "
        "its team admins may stop it (default: your billing team when that team pays)",
    )
    sp.add_argument(
        "--restart-on-lost",
        action="store_true",
        help="if its node is lost (engine or agent gone), queue it again on another node as "
        "its next attempt, loading its last checkpoint (nsml.save), instead of ending it lost",
    )

    sp = verb("ps", cmd_ps, "list your sessions, oldest first")
    sp.add_argument(
        "--state",
        choices=[*sessions.ACTIVE_STATES, *sessions.FINAL_STATES, "active"],
        help="only sessions in this state",
    )
    sp.add_argument("-a", "--active", action="store_true", help="only queued or running ones")
    sp.add_argument("--all", action="store_true", help="every user's sessions (admin)")
    sp.add_argument(
        "--teams", action="store_true", help="also your teams' team sessions (any owner)"
    )
    sp.add_argument("--dataset", help="only sessions named USER/DATASET/N")
    sp.add_argument(
        "--limit",
        type=_args.integer(1, sessions.MAX_LIST),
        metavar="N",
        help=f"the newest N, 1 to {sessions.MAX_LIST} (default 200)",
    )

    sp = verb("status", cmd_status, "one session: state, exit code, resources, metrics")
    sp.add_argument("session", help="USER/DATASET/N or DATASET/N")

    sp = verb("logs", cmd_logs, "a session's output (stdout and stderr)")
    sp.add_argument("session", help="USER/DATASET/N or DATASET/N")
    sp.add_argument("-f", "--follow", action="store_true", help="follow until the session ends")
    sp.add_argument(
        "-n",
        "--tail",
        type=_args.integer(0, sessions.MAX_TAIL_LINES, "a number of lines"),
        metavar="N",
        help=f"only the last N lines (0 to {sessions.MAX_TAIL_LINES})",
    )

    sp = verb(
        "stop",
        cmd_stop,
        "stop a session: SIGTERM, a grace period (the SDK saves a checkpoint), then SIGKILL",
    )
    sp.add_argument("session", help="USER/DATASET/N or DATASET/N")
    sp.add_argument("--wait", action="store_true", help="wait until it has stopped")

    sp = verb("rm", cmd_rm, "remove ended sessions with their logs, metrics and checkpoints", False)
    sp.add_argument("sessions", nargs="+", metavar="SESSION")
    sp.add_argument("-f", "--force", action="store_true", help="stop live sessions first")

    sp = verb(
        "fork",
        cmd_fork,
        "start a new session from SESSION[/CHECKPOINT] with the same code; new arguments go "
        "after -- (none: the parent's), e.g. nsml fork alice/mnist/3/2 -- --lr 0.01",
    )
    sp.add_argument("session", help="USER/DATASET/N[/CHECKPOINT]")
    _resources(sp, defaults=False)
    sp.add_argument("--no-args", action="store_true", help="run the child without arguments")

    sp = verb("resume", cmd_resume, "run a stopped session again from its last checkpoint")
    sp.add_argument("session", help="USER/DATASET/N or DATASET/N")

    sp = verb("diff", cmd_diff, "code and argument differences between two sessions")
    sp.add_argument("a", help="a session")
    sp.add_argument("b", help="another session")

    sp = verb("memo", cmd_memo, "set a session's memo", False)
    sp.add_argument("session")
    sp.add_argument("text", help="the memo ('' clears it)")

    sp = verb("model", cmd_model, "list a session's checkpoints")
    sp.add_argument("session", help="USER/DATASET/N or DATASET/N")

    for name in ("pull", "download"):
        sp = verb(
            name,
            cmd_pull,
            "download a checkpoint (SESSION/CHECKPOINT, or the newest) into "
            "DEST/USER_DATASET_N/CHECKPOINT (a new folder; nothing is left there on failure)",
            False,
        )
        sp.add_argument("session", help="USER/DATASET/N[/CHECKPOINT]")
        sp.add_argument("dest", nargs="?", default=".", help="folder (default: the current one)")

    sp = verb(
        "exec",
        cmd_exec,
        "run a command inside a running session's container, e.g. nsml exec SESSION -- ls",
    )
    sp.add_argument("session", help="USER/DATASET/N or DATASET/N")
    sp.add_argument(
        "--timeout",
        type=_args.seconds(0, sessions.MAX_EXEC_S, above=True),
        default=60,
        help=f"seconds, above 0 and up to {sessions.MAX_EXEC_S:g} (default 60)",
    )

    sp = verb(
        "getid",
        cmd_getid,
        "the current session's name (inside a session), else your newest session's",
        False,
    )
    sp.add_argument("--dataset", help="your newest session of this dataset")

    sp = verb("events", cmd_events, "your sessions' state changes and failures")
    sp.add_argument(
        "--since",
        type=_args.integer(0, sessions.MAX_ID, "an event id"),
        default=0,
        metavar="ID",
        help="only events after this id",
    )
    sp.add_argument("--all", action="store_true", help="every user's (admin)")

"""Dataset I/O through the real path: ``nsml dataset push/pull`` -> the NSML server, against
``cp -r``; and a notebook server's start with its dataset cached on the node against not.

Builds a folder of mixed file sizes under ``--workdir`` (default 1 GiB: half the bytes in
64 MiB files, 30 % in 1 MiB files, 20 % in files of 1-63 KiB, about 6,700 files), starts a
real hub (its ``nsml`` service keeps the store on the same filesystem) and a second
``nsml-server`` whose store is not durable, then measures, interleaved in the same run so that
every figure sees the same machine:

- ``cp -r`` of the folder (the reference) and ``cp -r`` + ``sync`` (the reference for a
  durable store, which syncs what it stores);
- **push**: the ``nsml dataset push`` command (hash every file, send what the server lacks,
  commit) into an empty store, through the hub's proxy (what a laptop uses) and straight to
  the service (what notebook servers and sessions use), durable; and straight to the
  non-durable server (comparable to ``cp -r``, which syncs nothing);
- **push v2**: the same folder with 1 % of its files changed: what is sent and stored;
- **pull**: ``nsml dataset pull`` (every file verified against its BLAKE3) into a new folder,
  through the proxy and straight;
- **notebook server start**: a real NSMLSpawner start (placement, container, server answers)
  with no dataset, with a dataset version not cached on the node (the server's cache fills it
  from the store by hard links), and with it already cached; and the dataset part alone
  (``POST placements/ID/mounts``), not cached and cached.

Each transfer runs right after its own reference copy, ``cp -r`` (``cp -r`` + ``sync`` for a
push into a durable store): the machine's speed drifts within a run, so a ratio is taken
between neighbours only. ``ratio`` is the median over ``--repeat`` runs of reference seconds /
transfer seconds (throughput relative to the reference; the target is >= 0.8). Before each
timed step, untimed, the files it reads are read once (page cache warm for every step alike)
and dirty pages are flushed (``sync``). CPU seconds are given for the client process and for
the server process.

    .venv/bin/python bench/dataset_io.py                      # 1 GiB, 3 runs
    .venv/bin/python bench/dataset_io.py --size 200M --repeat 2 --spawn-repeat 1

Writes ``bench/results/dataset_io.json`` and refreshes its own section of ``bench/README.md``
(between ``<!-- dataset_io:begin -->`` and ``<!-- dataset_io:end -->``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from spawn_latency import (  # noqa: E402
    ensure_user,
    spawn_to_ready,
    stop_and_wait,
    stop_everything,
)

from tests.integration.hubproc import HubProcess, ServerProcess  # noqa: E402

DEFAULT_OUT = BENCH / "results" / "dataset_io.json"
README = BENCH / "README.md"
BEGIN, END = "<!-- dataset_io:begin -->", "<!-- dataset_io:end -->"
NSML = str(Path(sys.executable).parent / "nsml")
IMAGE = os.environ.get("NSML_NOTEBOOK_IMAGE", "jupyter-nsml/singleuser:latest")


def parse_size(text: str) -> int:
    """``"1G"``, ``"200M"``, ``"512K"`` or a byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 1G, 200M, 4096")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


# -- the folder ----------------------------------------------------------------------------------


def make_folder(root: Path, size: int, seed: int = 1) -> dict[str, Any]:
    """Write a folder of *size* bytes of mixed file sizes, every file's content distinct."""
    rng = random.Random(seed)
    pool = os.urandom(8 << 20)
    root.mkdir(parents=True)
    large = max(1 << 20, min(64 << 20, size // 16))
    plan: list[tuple[str, int]] = []
    budget = {"large": size * 50 // 100, "medium": size * 30 // 100}
    budget["small"] = size - budget["large"] - budget["medium"]
    for i in range(max(1, budget["large"] // large)):
        plan.append((f"large/shard-{i:03}.bin", large))
    for i in range(max(1, budget["medium"] // (1 << 20))):
        plan.append((f"medium/{i // 200:02}/img-{i:05}.jpg", 1 << 20))
    left, i = budget["small"], 0
    while left > 0:
        n = min(left, rng.randrange(1 << 10, 64 << 10))
        plan.append((f"small/{i // 500:03}/rec-{i:06}.json", n))
        left -= n
        i += 1
    for rel, n in plan:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(rel.encode().ljust(64, b"\0")[: min(n, 64)])
            n -= min(n, 64)
            while n > 0:
                k = min(n, 1 << 20)
                off = rng.randrange(0, len(pool) - k + 1)
                f.write(pool[off : off + k])
                n -= k
    return {
        "bytes": sum(n for _, n in plan),
        "files": len(plan),
        "large_files": sum(1 for r, _ in plan if r.startswith("large/")),
        "large_file_bytes": large,
        "medium_files": sum(1 for r, _ in plan if r.startswith("medium/")),
        "small_files": sum(1 for r, _ in plan if r.startswith("small/")),
    }


def change_one_percent(root: Path, seed: int = 2) -> list[str]:
    """Rewrite 1 % of the files (at least one) with new content of the same size."""
    rng = random.Random(seed)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    picked = rng.sample(files, max(1, len(files) // 100))
    for p in picked:
        data = bytearray(p.read_bytes())
        data[:16] = os.urandom(min(16, len(data)))
        p.write_bytes(bytes(data))
    return [p.relative_to(root).as_posix() for p in picked]


# -- timing --------------------------------------------------------------------------------------


def prewarm(*folders: Path) -> None:
    """Read every file of *folders* so that the timed step finds them in the page cache."""
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                    while f.read(1 << 20):
                        pass


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process *pid* so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


Sample = dict[str, float]


def timed(
    cmd: list[str], *, env: dict[str, str] | None, warm: tuple[Path, ...], server: int | None
) -> tuple[Sample, str]:
    """Run *cmd*; wall seconds, its CPU seconds and the server's (pid *server*)."""
    prewarm(*warm)
    os.sync()
    c0, s0 = children_cpu(), proc_cpu(server) if server else 0.0
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    sample = {"seconds": wall, "client_cpu": children_cpu() - c0}
    if server:
        sample["server_cpu"] = proc_cpu(server) - s0
    return sample, r.stdout


# -- the system under test -----------------------------------------------------------------------


class Rig:
    """A hub (durable store, the local node, NSMLSpawner) and a non-durable second server."""

    def __init__(self, work: Path) -> None:
        state = work / "hub"
        state.mkdir()
        self.hub = HubProcess(
            state,
            env_overrides={"NSML_CONTAINER_PREFIX": "nsml-dsbench", "NSML_NOTEBOOK_IMAGE": IMAGE},
        )
        self.fast: ServerProcess | None = None

    def start(self) -> None:
        self.hub.start()
        self.fast = ServerProcess(
            self.hub,
            f"sqlite:///{self.hub.state_dir / 'nodurable.sqlite'}",
            "nodurable",
            args=["--node-name", "bench-nodurable", "--NSMLServer.dataset_durable=False"],
            local_node=True,
        )
        self.fast.start()
        self.admin = self.hub.user_token("admin")
        self.token = self.hub.user_token("bench-user")
        out = subprocess.run(
            ["pgrep", "-f", "nsml_server.app", "-P", str(self.hub.proc.pid)],  # type: ignore[union-attr]
            capture_output=True,
            text=True,
        ).stdout.split()
        self.hub_server_pid = int(out[0])
        self.urls = {
            "proxy": self.hub.nsml_api + "/",
            "direct": f"http://127.0.0.1:{self.hub.service_port}/services/nsml/api/",
            "nodurable": self.fast.api + "/",
        }
        self.pids = {
            "proxy": self.hub_server_pid,
            "direct": self.hub_server_pid,
            "nodurable": self.fast.proc.pid,  # type: ignore[union-attr]
        }

    def env(self, where: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NSML_", "JUPYTERHUB_"))}
        env.update(NSML_API_URL=self.urls[where], NSML_TOKEN=self.token)
        return env

    def call(self, where: str, method: str, path: str, admin: bool = False, **kw: Any) -> Any:
        token = self.admin if admin else self.token
        r = requests.request(
            method,
            self.urls[where] + path,
            headers={"Authorization": f"token {token}"},
            timeout=600,
            **kw,
        )
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    def forget(self, where: str, name: str) -> None:
        """Remove *name* and collect the store: the next push starts from an empty store."""
        requests.delete(
            self.urls[where] + f"datasets/{name}",
            headers={"Authorization": f"token {self.token}"},
            timeout=600,
        )
        self.call(where, "POST", "dataset-store/gc", admin=True, json={"older_than_s": 0})

    def stop(self) -> None:
        if self.fast is not None:
            self.fast.stop()
        stop_everything(self.hub)


# -- one run -------------------------------------------------------------------------------------


SERVER = {
    "proxy": "proxy",
    "direct": "direct",
    "nodurable": "nodurable",
    "local": "direct",
    "local nodurable": "nodurable",
}
"""Which server each kind of transfer talks to; ``local ...`` ones use the local transport."""


def transport(where: str) -> list[str]:
    return ["--transport", "local" if where.startswith("local") else "http"]


def push(rig: Rig, where: str, name: str, folder: Path) -> tuple[Sample, dict[str, Any]]:
    sample, out = timed(
        [NSML, "dataset", "push", name, str(folder), "--json", "--no-progress", *transport(where)],
        env=rig.env(SERVER[where]),
        warm=(folder,),
        server=rig.pids[SERVER[where]],
    )
    return sample, json.loads(out)


def pull(rig: Rig, where: str, ref: str, dest: Path) -> Sample:
    sample, _ = timed(
        [NSML, "dataset", "pull", ref, str(dest), "--no-progress", *transport(where)],
        env=rig.env(SERVER[where]),
        warm=(),
        server=rig.pids[SERVER[where]],
    )
    shutil.rmtree(dest)
    return sample


def cp_r(src: Path, dst: Path, *, sync: bool) -> Sample:
    cmd = ["sh", "-c", f"cp -r '{src}' '{dst}'" + (" && sync" if sync else "")]
    sample, _ = timed(cmd, env=None, warm=(src,), server=None)
    shutil.rmtree(dst)
    return sample


WHERE = tuple(SERVER)


def durable(where: str) -> bool:
    """Whether *where*'s store syncs what it stores (its reference is then ``cp -r`` + sync)."""
    return SERVER[where] != "nodurable"


def one_run(
    rig: Rig,
    src: Path,
    work: Path,
    add: Callable[[str, Sample], None],
    extra: dict[str, Any],
    where_list: tuple[str, ...] = WHERE,
) -> None:
    """Each transfer right after its own reference copy (``cp -r``, or ``cp -r`` + sync for a
    push into a durable store): the machine's speed drifts within a run (on a VM, by as much
    as a factor of 4 for ``cp -r`` itself), so a ratio is taken between neighbours only."""

    def paired(name: str, sync: bool, step: Callable[[], Sample]) -> Sample:
        ref = cp_r(src, work / "copy", sync=sync)
        add(reference(sync), ref)
        sample = step()
        sample["reference_seconds"] = ref["seconds"]
        add(name, sample)
        return sample

    pushed: dict[str, Any] = {}

    def push_into(where: str) -> Sample:
        sample, pushed["out"] = push(rig, where, "bench", src)
        return sample

    for where in where_list:
        paired(f"push ({where})", durable(where), functools.partial(push_into, where))
        assert pushed["out"]["new_bytes"] > 0
        paired(
            f"pull ({where})",
            False,
            functools.partial(pull, rig, where, "bench", work / "pulled"),
        )
        if where in ("direct", "local"):
            changed = change_one_percent(src)
            paired(
                f"push v2, 1 % changed ({where})",
                durable(where),
                functools.partial(push_into, where),
            )
            out = pushed["out"]
            extra.setdefault("v2", []).append(
                {
                    "where": where,
                    "files_changed": len(changed),
                    "bytes_of_changed_files": sum((src / p).stat().st_size for p in changed),
                    "sent_bytes": out["sent_bytes"],
                    "new_bytes": out["new_bytes"],
                }
            )
        rig.forget(SERVER[where], "bench")


def reference(sync: bool) -> str:
    return "cp -r + sync" if sync else "cp -r"


# -- notebook server start -----------------------------------------------------------------------


def spawn_runs(rig: Rig, src: Path, repeat: int, add: Callable[[str, Sample], None]) -> None:
    """Start a notebook server with no dataset, with one not cached, with one cached."""
    hub = rig.hub
    name = "bench-user"
    ensure_user(hub, name)
    small = {"cpu": 1, "memory": "1G"}

    def start(what: str, **options: Any) -> None:
        seconds = spawn_to_ready(hub, name, {**small, **options}, timeout=600)
        add(what, {"seconds": seconds})
        stop_and_wait(hub, name)
        # The hold is released at the next reconcile (5 s); wait for it, untimed.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cache = rig.call("direct", "GET", "dataset-store", admin=True)["cache"]
            if not any(e["holders"] for e in cache["entries"]):
                break
            time.sleep(0.2)

    def mounts(what: str, ref: str) -> None:
        placed = rig.call(
            "direct",
            "POST",
            "placements",
            json={
                "holder": "bench-mounts",
                "cpu": 0.1,
                "memory": "64M",
                "datasets": [ref],
                "wait_s": 30,
            },
        )
        t0 = time.perf_counter()
        out = rig.call(
            "direct", "POST", f"placements/{placed['id']}/mounts", params={"wait_s": 300}
        )
        add(what, {"seconds": time.perf_counter() - t0})
        assert out["state"] == "ready", out
        rig.call("direct", "DELETE", f"placements/{placed['id']}")

    for _ in range(repeat):
        # A new version of the same folder: nothing new to store, but not cached on the node.
        _, out = push(rig, "direct", "spawnset", src)
        ref = out["ref"]
        start("server start: no dataset")
        start("server start: dataset not cached", datasets=[ref])
        start("server start: dataset cached", datasets=[ref])
        _, out = push(rig, "direct", "spawnset", src)
        mounts("dataset part: not cached", out["ref"])
        mounts("dataset part: cached", out["ref"])


# -- the whole run -------------------------------------------------------------------------------


def build_image() -> None:
    r = subprocess.run(
        ["bash", str(REPO / "hub_config" / "images" / "build.sh"), "--image", IMAGE],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if r.returncode != 0:
        raise RuntimeError(f"image build failed:\n{r.stderr[-3000:]}")


def run(
    size: int, repeat: int, spawn_repeat: int, workdir: Path, where: tuple[str, ...] = WHERE
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="nsml-dataset-io-", dir=workdir))
    samples: dict[str, list[Sample]] = {}
    extra: dict[str, Any] = {}

    def add(name: str, sample: Sample) -> None:
        samples.setdefault(name, []).append(sample)
        more = "".join(f"  {k} {v:6.2f}" for k, v in sample.items() if k != "seconds")
        print(f"  {name:<36} {sample['seconds']:7.3f} s{more}", flush=True)

    if spawn_repeat:
        build_image()
    rig = Rig(work)
    try:
        src = work / "src"
        folder = make_folder(src, size)
        os.sync()
        print(
            f"folder: {folder['bytes'] / 2**20:.0f} MiB in {folder['files']} files under {work}",
            flush=True,
        )
        rig.start()
        for rep in range(repeat):
            print(f"run {rep + 1}/{repeat}", flush=True)
            one_run(rig, src, work, add, extra, where)
        if spawn_repeat:
            print("notebook server starts", flush=True)
            spawn_runs(rig, src, spawn_repeat, add)
    finally:
        rig.stop()
        shutil.rmtree(work, ignore_errors=True)

    def med(name: str, key: str) -> float | None:
        values = [s[key] for s in samples[name] if key in s]
        return statistics.median(values) if values else None

    table: dict[str, Any] = {}
    for name in samples:
        wall = med(name, "seconds")
        assert wall is not None
        row: dict[str, Any] = {"seconds": round(wall, 4)}
        if not name.startswith(("server start", "dataset part")):
            paired = [s for s in samples[name] if "reference_seconds" in s]
            row.update(
                mib_per_s=round(folder["bytes"] / 2**20 / wall, 1),
                client_cpu=round(med(name, "client_cpu") or 0, 3),
                server_cpu=round(v, 3) if (v := med(name, "server_cpu")) is not None else None,
            )
            if paired:
                sync = name.startswith("push") and durable(name[name.index("(") + 1 : -1])
                row.update(
                    reference=reference(sync),
                    ratio=round(
                        statistics.median(s["reference_seconds"] / s["seconds"] for s in paired),
                        3,
                    ),
                    ratios=[round(s["reference_seconds"] / s["seconds"], 3) for s in paired],
                )
        row["samples"] = [{k: round(v, 4) for k, v in s.items()} for s in samples[name]]
        table[name] = row
    return {
        "folder": folder,
        "figures": table,
        "push_v2": extra.get("v2"),
        "setup": {
            "repeat": repeat,
            "spawn_repeat": spawn_repeat,
            "where": list(where),
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "filesystem": workdir.as_posix(),
            "image": IMAGE,
            "page_cache": "sources read and dirty pages flushed (untimed) before each transfer",
            "free_page_reporting": os.path.exists("/sys/module/page_reporting"),
            "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        },
    }


# -- reporting -----------------------------------------------------------------------------------


def readme_section(results: dict[str, Any]) -> str:
    f, s, t = results["folder"], results["setup"], results["figures"]
    lines = [
        BEGIN,
        "## Dataset I/O (`bench/dataset_io.py`)",
        "",
        f"`nsml dataset push` / `pull` (the CLI, a real hub and NSML server) of a folder of "
        f"{f['bytes'] / 2**20:.0f} MiB in {f['files']} files ({f['large_files']} of "
        f"{f['large_file_bytes'] >> 20} MiB, {f['medium_files']} of 1 MiB, {f['small_files']} "
        f"of 1-63 KiB), the store on the same filesystem; {s['repeat']} runs on {s['cpus']} "
        f"cores shared with other work (load average {s['load_average'][0]} at the end). Each "
        "transfer runs right after its own reference copy of the same folder, `cp -r` (or "
        "`cp -r` + `sync` for a push into a durable store, which syncs what it stores): "
        "`ratio` is the median over the runs of reference seconds / transfer seconds "
        "(throughput relative to the reference, target >= 0.8); `ratios` lists every run's. "
        "The machine's speed drifts within a run (the `cp -r` rows give its range), which is "
        "why a ratio is only taken between neighbours"
        + (
            " (this is a VM whose kernel hands freed memory back to the host, and a page handed "
            "back costs a fault on the host when it is used again, so the same `cp -r` has run "
            "in 0.5 s and in 3.5 s here, depending on what memory it got)"
            if s.get("free_page_reporting")
            else ""
        )
        + ". Before each copy and transfer its "
        "sources are read once and dirty pages flushed, untimed. CPU: the `nsml` process, and "
        f"the server process (medians). {s['when']}.",
        "",
        "| step | seconds (median) | MiB/s | reference | ratio | ratios | client CPU s "
        "| server CPU s |",
        "|---|---:|---:|---|---:|---|---:|---:|",
    ]
    for name, row in t.items():
        if "mib_per_s" not in row:
            continue
        server = "" if row["server_cpu"] is None else f"{row['server_cpu']:.2f}"
        if "ratio" in row:
            ratio = f"{row['ratio']:.2f}"
            ratios = ", ".join(f"{r:.2f}" for r in row["ratios"])
            ref = f"`{row['reference']}`"
        else:
            spread = [x["seconds"] for x in row["samples"]]
            ratio, ratios, ref = "", f"range {min(spread):.2f}-{max(spread):.2f} s", "(reference)"
        lines.append(
            f"| {name} | {row['seconds']:.3f} | {row['mib_per_s']} | {ref} | {ratio} "
            f"| {ratios} | {row['client_cpu']:.2f} | {server} |"
        )
    v2 = results["push_v2"]
    if v2:
        first = v2[0]
        lines += [
            "",
            f"Push v2: {first['files_changed']} files changed "
            f"({first['bytes_of_changed_files']} bytes); every push v2 (sent through HTTP / "
            "new in the store / bytes of the changed files): "
            + ", ".join(
                f"{x.get('where', 'direct')} {x['sent_bytes']}/{x['new_bytes']}/"
                f"{x['bytes_of_changed_files']}"
                for x in v2
            )
            + ".",
        ]
    starts = [n for n in t if n.startswith(("server start", "dataset part"))]
    if starts:
        lines += [
            "",
            f"Notebook server start (NSMLSpawner, `{s['image']}`, median of "
            f"{s['spawn_repeat']}), from the hub API request to the server answering, and the "
            "dataset part alone (`POST placements/ID/mounts`):",
            "",
            "| start | seconds |",
            "|---|---:|",
        ]
        lines += [f"| {n} | {t[n]['seconds']:.3f} |" for n in starts]
    local = [n for n in t if n.startswith(("push (local", "pull (local"))]
    http = [t[n] for n in t if n.startswith(("push (", "pull (")) and "local" not in n]
    if local:
        ok = all(t[n]["ratio"] >= 0.8 for n in local)
        lines += [
            "",
            f"Against the target (>= 0.8 of the reference): **{'reached' if ok else 'not reached'}"
            "** by the local transport (what `nsml dataset push/pull` use on the server's machine:"
            " files handed over as descriptors, copied in the kernel and hashed once): "
            + "; ".join(f"{n} {t[n]['ratio']:.2f} of `{t[n]['reference']}`" for n in local)
            + ".",
        ]
    if http:
        lines += [
            "",
            "Through HTTP (another machine, or `--transport http`): "
            f"{min(r['ratio'] for r in http):.2f}-{max(r['ratio'] for r in http):.2f}"
            " of the reference. Every byte is hashed on both sides (BLAKE3: the client to know "
            "what the server lacks, the server because it trusts no client), goes through the "
            "kernel's loopback and the HTTP stack, and is written by the server; on a network "
            "the link is the limit.",
        ]
    lines += [
        "",
        "Reading the figures: through HTTP a push hashes every byte on the client (BLAKE3, to "
        "know what the server lacks) and again on the server (it trusts no client), where `cp "
        "-r` hashes nothing and copies in the kernel; through the local transport the client "
        "hashes nothing and the server copies in the kernel too, then hashes its copy (a file "
        "unchanged since the latest version is hashed in place and not copied); a local pull "
        "copies in the kernel and verifies the copy. Over HTTP small files travel packed, many "
        "per request, and "
        "each becomes one blob file (created unnamed and linked into place). A durable store "
        "syncs each large blob and each pack before they count as stored, so compare the "
        "durable pushes with `cp -r + sync`. A pull verifies every file. A version not cached "
        "on the node is hard-linked from the store (no bytes copied); a cached one is a lookup.",
        END,
        "",
    ]
    return "\n".join(lines)


def update_readme(section: str, path: Path = README) -> None:
    """Append the section, or replace this benchmark's own earlier section; nothing else."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end > start:
        text = text[:start] + section.rstrip("\n") + text[end + len(END) :]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="folder size (1G)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per transfer figure (3)")
    parser.add_argument(
        "--spawn-repeat", type=int, default=3, help="notebook server starts per kind (3; 0: none)"
    )
    parser.add_argument(
        "--where",
        default=",".join(WHERE),
        help="which servers to push to and pull from, comma-separated: proxy (through the hub's "
        "proxy), direct, nodurable (default: all three); e.g. --where direct --spawn-repeat 0 "
        "--no-readme for a quick measurement",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where to work (/tmp)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--no-readme", action="store_true", help="do not touch bench/README.md")
    parser.add_argument(
        "--readme-only", action="store_true", help="rewrite the README section from --out"
    )
    args = parser.parse_args(argv)
    if args.readme_only:
        update_readme(readme_section(json.loads(args.out.read_text())))
        return 0

    where = tuple(w.strip() for w in args.where.split(",") if w.strip())
    if not where or any(w not in WHERE for w in where):
        parser.error(f"--where: choose from {', '.join(WHERE)} (comma-separated)")
    results = run(args.size, args.repeat, args.spawn_repeat, args.workdir, where)
    print()
    print(f"{'step':<36} {'seconds':>8} {'MiB/s':>8} {'ratio':>6}  reference")
    for name, row in results["figures"].items():
        if "ratio" in row:
            print(
                f"{name:<36} {row['seconds']:8.3f} {row['mib_per_s']:8} "
                f"{row['ratio']:6.2f}  {row['reference']} {row['ratios']}"
            )
        else:
            print(f"{name:<36} {row['seconds']:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.no_readme:
        update_readme(readme_section(results))
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

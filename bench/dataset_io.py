"""Dataset I/O: push and pull throughput against ``cp -r``, and session start cached vs not.

Builds a folder of mixed file sizes under ``/tmp`` (default 1 GiB: half the bytes in 64 MiB
files, 30 % in 1 MiB files, 20 % in files of 1-63 KiB — about 6,500 of them), then measures,
interleaved in the same run so that every figure sees the same machine:

- ``cp -r`` of the folder (the reference), and ``cp -r`` followed by ``sync``;
- **push** (walk + hash + store, :meth:`BlobStore.push_folder`) into an empty store on the
  same filesystem: copying with fsync per blob (the default), copying without fsync, and
  hard-linking (``link=True``); plus the hashing alone (:func:`scan`) and a second push of the
  folder with 1 % of the files changed (with the parent manifest);
- **pull** (:meth:`BlobStore.materialize`): copies verified by hash, copies unverified, hard
  links;
- **session start, dataset part**: :meth:`NodeCache.ensure` when the version is not cached
  (from the node's store by hard links, and as a remote node would, through ``fetch``) against
  when it is already cached. The container part is :func:`measure_container_start`, left for
  the engineer who wires sessions to containers.

Every figure is the median of ``--repeat`` runs; before each timed step, untimed, the files
it reads are read once (page cache warm for every step alike) and dirty pages are flushed
(``sync``). Ratios are
throughput relative to ``cp -r`` (``cp_seconds / seconds``: 1.0 is as fast, the target is
>= 0.8).

    python bench/dataset_io.py                       # 1 GiB
    python bench/dataset_io.py --size 200M --repeat 2

Writes ``bench/results/dataset_io.json`` and appends (or refreshes) its own section of
``bench/README.md``, between ``<!-- dataset_io:begin -->`` and ``<!-- dataset_io:end -->``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nsml_datasets import BlobStore, Manifest, NodeCache, scan
from nsml_datasets._work import remove_tree

BENCH = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH / "results" / "dataset_io.json"
README = BENCH / "README.md"
BEGIN, END = "<!-- dataset_io:begin -->", "<!-- dataset_io:end -->"


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


Timing = tuple[float, float]
"""``(wall seconds, CPU seconds)`` of one step."""


def cpu_seconds() -> float:
    """User + system CPU of this process and of its waited-for children (``cp``)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def prewarm(*folders: Path) -> None:
    """Read every file of *folders* so that the timed step finds them in the page cache."""
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                    while f.read(1 << 20):
                        pass


def timed(
    step: Callable[[], object],
    *,
    warm: tuple[Path, ...] = (),
    cleanup: Callable[[], None] | None = None,
) -> Timing:
    """Wall and CPU seconds *step* takes; *cleanup* runs after, untimed.

    Before the step, untimed: the files of *warm* are read (page cache warm for every step
    alike) and dirty pages are flushed. CPU seconds are less sensitive than wall seconds to
    other work on a shared machine.
    """
    prewarm(*warm)
    os.sync()
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    step()
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds() - c0
    if cleanup is not None:
        cleanup()
    return elapsed, cpu


def cp_r(src: Path, dst: Path, *, sync: bool = False) -> None:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    if sync:
        os.sync()


def measure_session_start(
    store: BlobStore, manifest: Manifest, work: Path, *, size: int
) -> dict[str, Timing]:
    """Seconds of :meth:`NodeCache.ensure` for a session start, cold and warm.

    ``cold_local``: the node holds the store (hard links); ``cold_remote``: blobs come through
    ``fetch`` (read from the store here, so this measures the hashing and writing a remote node
    does, not the network); ``warm``: the version is already cached (a hit).
    """
    out: dict[str, Timing] = {}
    local = NodeCache(work / "cache-local", 2 * size + (1 << 20), store=store)
    blobs = (store.blobs_dir,)
    out["cold_local"] = timed(lambda: local.ensure("bench@1", manifest), warm=blobs)
    out["warm"] = timed(lambda: local.ensure("bench@1", manifest))
    remove_tree(work / "cache-local")

    def fetch(sha: str) -> io.BufferedReader:
        return open(store.blob_path(sha), "rb")

    remote = NodeCache(work / "cache-remote", 2 * size + (1 << 20), fetch)
    out["cold_remote"] = timed(lambda: remote.ensure("bench@1", manifest), warm=blobs)
    out["warm_remote"] = timed(lambda: remote.ensure("bench@1", manifest))
    remove_tree(work / "cache-remote")
    return out


def measure_container_start() -> dict[str, float] | None:
    """Seconds to start a session's container with the dataset mounted read-only.

    Not measured yet: added when sessions run in containers (the session start of a user is
    :func:`measure_session_start` plus this). Returns ``None`` until then.
    """
    return None


def one_run(
    src: Path,
    work: Path,
    rep: int,
    size: int,
    add: Callable[[str, Timing], None],
    extra: dict[str, Any],
) -> None:
    """One round of every measurement; leaves *src* with 1 % of its files changed."""
    dst = work / "cp"
    add("cp -r", timed(lambda: cp_r(src, dst), warm=(src,), cleanup=lambda: remove_tree(dst)))
    add(
        "cp -r + sync",
        timed(lambda: cp_r(src, dst, sync=True), warm=(src,), cleanup=lambda: remove_tree(dst)),
    )
    add("scan (hash only)", timed(lambda: scan(src), warm=(src,)))

    scratch = BlobStore(work / "scratch", durable=True)
    add("push (copy, fsync)", timed(lambda: scratch.push_folder(src), warm=(src,)))
    remove_tree(work / "scratch")
    scratch = BlobStore(work / "scratch", durable=False)
    add("push (copy, no fsync)", timed(lambda: scratch.push_folder(src), warm=(src,)))
    remove_tree(work / "scratch")
    handed = work / "src-link"
    cp_r(src, handed)
    scratch = BlobStore(work / "scratch", durable=True)
    add("push (hard links)", timed(lambda: scratch.push_folder(handed, link=True), warm=(handed,)))
    remove_tree(work / "scratch")
    remove_tree(handed)

    store = BlobStore(work / "store")
    first = store.push_folder(src)
    out = work / "out"
    blobs = (store.blobs_dir,)
    add(
        "pull (copy, verified)",
        timed(
            lambda: store.materialize(first.digest, out),
            warm=blobs,
            cleanup=lambda: remove_tree(out),
        ),
    )
    add(
        "pull (copy, unverified)",
        timed(
            lambda: store.materialize(first.digest, out, verify=False),
            warm=blobs,
            cleanup=lambda: remove_tree(out),
        ),
    )
    add(
        "pull (hard links)",
        timed(
            lambda: store.materialize(first.digest, out, mode="hardlink", verify=False),
            warm=blobs,
            cleanup=lambda: remove_tree(out),
        ),
    )
    for name, seconds in measure_session_start(store, first.manifest, work, size=size).items():
        add(f"session start: {name}", seconds)

    changed = change_one_percent(src, seed=100 + rep)
    second: list[Any] = []
    add(
        "push v2 (1 % changed)",
        timed(lambda: second.append(store.push_folder(src, parent=first.manifest)), warm=(src,)),
    )
    extra["v2"] = {
        "files_changed": len(changed),
        "new_bytes": second[0].new_bytes,
        "new_blobs": second[0].new_blobs,
    }
    remove_tree(work / "store")


def run(size: int, repeat: int, workdir: Path) -> dict[str, Any]:
    """Every measurement, *repeat* times, interleaved; medians and ratios to ``cp -r``."""
    work = Path(tempfile.mkdtemp(prefix="nsml-dataset-io-", dir=workdir))
    samples: dict[str, list[Timing]] = {}
    extra: dict[str, Any] = {}

    def add(name: str, timing: Timing) -> None:
        samples.setdefault(name, []).append(timing)
        print(f"  {name:<28} {timing[0]:7.3f} s  (CPU {timing[1]:6.3f} s)", flush=True)

    try:
        src = work / "src"
        t0 = time.perf_counter()
        folder = make_folder(src, size)
        os.sync()
        print(
            f"folder: {folder['bytes'] / 2**20:.0f} MiB in {folder['files']} files "
            f"(made in {time.perf_counter() - t0:.1f} s) under {work}",
            flush=True,
        )
        for rep in range(repeat):
            print(f"run {rep + 1}/{repeat}", flush=True)
            one_run(src, work, rep, folder["bytes"], add, extra)
    finally:
        remove_tree(work)

    def median(name: str, i: int) -> float:
        return statistics.median(t[i] for t in samples[name])

    cp, cp_cpu = median("cp -r", 0), median("cp -r", 1)
    table = {}
    for name in samples:
        wall, cpu = median(name, 0), median(name, 1)
        table[name] = {
            "seconds": round(wall, 4),
            "mib_per_s": round(folder["bytes"] / 2**20 / wall, 1) if wall > 0 else None,
            "ratio_to_cp": round(cp / wall, 3) if wall > 0 else None,
            "cpu_seconds": round(cpu, 4),
            "cpu_ratio_to_cp": round(cp_cpu / cpu, 3) if cpu > 0 else None,
            "samples": [[round(w, 4), round(c, 4)] for w, c in samples[name]],
        }
    return {
        "folder": folder,
        "figures": table,
        "push_v2": extra.get("v2"),
        "session_start": {
            "cold_local_s": table["session start: cold_local"]["seconds"],
            "cold_remote_s": table["session start: cold_remote"]["seconds"],
            "warm_s": table["session start: warm"]["seconds"],
            "container": measure_container_start(),
        },
        "setup": {
            "repeat": repeat,
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "filesystem": workdir.as_posix(),
            "page_cache": "sources read and dirty pages flushed (untimed) before each timed step",
            "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        },
    }


# -- reporting -----------------------------------------------------------------------------------


def readme_section(results: dict[str, Any]) -> str:
    f = results["folder"]
    s = results["setup"]
    lines = [
        BEGIN,
        "## Dataset I/O (`bench/dataset_io.py`)",
        "",
        f"A folder of {f['bytes'] / 2**20:.0f} MiB in {f['files']} files "
        f"({f['large_files']} of {f['large_file_bytes'] >> 20} MiB, {f['medium_files']} of "
        f"1 MiB, {f['small_files']} of 1-63 KiB), the store on the same filesystem; medians of "
        f"{s['repeat']} interleaved runs on {s['cpus']} cores shared with other work (load "
        f"average {s['load_average'][0]} at the end: the figures are noisy); before each step "
        "its sources are read once and dirty pages flushed, untimed. `ratio` = `cp -r` seconds / "
        "seconds, i.e. throughput relative to `cp -r` (target >= 0.8); `CPU ratio` likewise "
        f"with CPU seconds (user + system, `cp` included), steadier on a busy machine. "
        f"{s['when']}.",
        "",
        "| step | seconds | MiB/s | ratio to `cp -r` | CPU seconds | CPU ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["figures"].items():
        lines.append(
            f"| {name} | {row['seconds']:.3f} | {row['mib_per_s']} | {row['ratio_to_cp']:.2f} "
            f"| {row['cpu_seconds']:.2f} | {row['cpu_ratio_to_cp']:.2f} |"
        )
    v2 = results["push_v2"]
    if v2:
        lines += [
            "",
            f"The second push changed {v2['files_changed']} files and stored "
            f"{v2['new_bytes']} new bytes in {v2['new_blobs']} blobs.",
        ]
    lines += [
        "",
        "Session start, dataset part (`NodeCache.ensure`): "
        f"{results['session_start']['cold_local_s']:.3f} s not cached (hard links from the "
        f"node's store), {results['session_start']['cold_remote_s']:.3f} s not cached (through "
        f"`fetch`, hashed), {results['session_start']['warm_s'] * 1000:.1f} ms already cached. "
        "The container part is not measured yet (`measure_container_start`).",
        "",
        "Reading the figures: every push hashes every byte with SHA-256 (`scan` alone costs "
        "about one `cp -r` of CPU here) and a copying push also copies each file through user "
        "space (read, hash, write) where `cp` copies in the kernel (`copy_file_range`), so a "
        "first push by copy costs about hash + copy. Storing by hard link (`link=True`, the "
        "folder is handed over) removes the copy; a new version (`parent=`) only hashes the "
        "unchanged files and writes the changed ones. A durable push syncs the filesystem once "
        "per push (not once per file). Pulls and cache fills by hard link copy no bytes; "
        "verified copies pay the hash again; a remote node (`fetch`) always verifies.",
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="folder size (1G)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (3)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where to work (/tmp)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--no-readme", action="store_true", help="do not touch bench/README.md")
    args = parser.parse_args(argv)

    results = run(args.size, args.repeat, args.workdir)
    print()
    print(f"{'step':<30} {'seconds':>8} {'MiB/s':>9} {'vs cp -r':>9} {'CPU s':>7} {'CPU vs cp':>9}")
    for name, row in results["figures"].items():
        print(
            f"{name:<30} {row['seconds']:8.3f} {row['mib_per_s']:9} {row['ratio_to_cp']:9.2f} "
            f"{row['cpu_seconds']:7.2f} {row['cpu_ratio_to_cp']:9.2f}"
        )
    if results["push_v2"]:
        print(f"push v2: {results['push_v2']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.no_readme:
        update_readme(readme_section(results))
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

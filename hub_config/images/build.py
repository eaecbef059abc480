"""Build the single-user notebook image offline, without a container registry.

The image is assembled from a Debian root filesystem (``mmdebstrap --variant=extract``), a
virtual environment at ``/opt/venv`` filled by ``uv`` inside a ``chroot``, and the
``jupyter-nsml`` wheel built from the source tree with its ``notebook`` extra. It has two
layers:

* the **base** (``jupyter-nsml/singleuser-base:<base key>``): Debian packages, the user
  ``jovyan``, and every Python dependency of the project but not the project itself. Its
  unpacked root filesystem is cached under ``.cache/images/base-<base key>/`` and the key
  covers every input (Debian packages, the project's declared dependencies, uv's version,
  the CA bundle, the recipe), so that a code change does not rebuild it;
* the **project layer**: the files that installing the project wheel adds, built with
  ``docker build`` on top of the base; with it the wheel of the JupyterLab extension project
  ``labextension/`` (the NSML sidebar, prebuilt by scripts/setup-env.sh, and its server
  extension ``jupyter_nsml_lab``), enabled in every notebook server of the image.

The final image is tagged ``<name>:<input hash>`` and ``<name>:latest``; when the tag with
the same input hash already exists in the engine the build is skipped (``--force``
rebuilds it). Run ``hub_config/images/build.sh --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE = "jupyter-nsml/singleuser:latest"
DEFAULT_CACHE = REPO / ".cache" / "images"

#: Bump when the recipe below changes in a way the other inputs do not capture.
RECIPE_VERSION = "3"

DEBIAN_SUITE = "bookworm"
PYTHON = "python3.11"
#: Debian packages unpacked into the image. ``python3.11`` and its libraries run the
#: notebook server and training code; ``libstdc++6`` is needed by pyzmq; ``libc-bin``
#: gives ``ldconfig``, ``getent`` and the C.UTF-8 locale; ``tini`` is PID 1 so that signals
#: reach the server and orphans are reaped; the shells and tools are there for terminals,
#: debugging and tests.
DEBIAN_PACKAGES = (
    "python3.11",
    "libstdc++6",
    "libc-bin",
    "dash",
    "bash",
    "coreutils",
    "procps",
    "findutils",
    "grep",
    "sed",
    "tar",
    "gzip",
    "ncurses-base",
    "debianutils",
    "tini",
)
#: Extras of the project installed in the image.
PROJECT_EXTRAS = ("notebook",)
#: Requirements the image needs beyond the project's ``notebook`` extra (none today: the
#: extra brings JupyterLab, hence the ``jupyter_server`` that ``jupyterhub-singleuser`` needs).
IMAGE_REQUIREMENTS: tuple[str, ...] = ()
#: Packages removed after installation. jsonschema imports ``rfc3987_syntax`` optionally
#: and building its grammar costs seconds on every notebook server start.
REMOVED_PACKAGES = ("rfc3987-syntax",)

NB_UID, NB_GID, NB_USER = 1000, 100, "jovyan"
VENV = "/opt/venv"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IMAGE_ENV = {
    "PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin",
    "VIRTUAL_ENV": VENV,
    "LANG": "C.UTF-8",
    "SHELL": "/bin/bash",
    "SSL_CERT_FILE": str(CA_BUNDLE),
}
#: Device nodes that tools inside the chroot need while the image is built. They are not
#: part of the image: the engine gives every container its own /dev.
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9))
#: Paths (relative to the root filesystem) that never go into an image layer.
NOT_IN_IMAGE = ("dev/", "proc/", "sys/", "tmp/", "root/.cache/", "etc/resolv.conf")
#: Documentation and translations, removed from the base to keep the image small.
UNUSED_PATHS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/locale",
)
LABEL_PREFIX = "org.jupyter-nsml.image"
#: JupyterLab's default settings in the image (``overrides.json`` in the application
#: directory): no "Would you like to get notified about official Jupyter news?" prompt on
#: every new server, and no requests to the news feed or for update checks (a cluster's
#: notebook servers often cannot reach them). Users can still turn them on in Settings.
LAB_OVERRIDES = Path(__file__).with_name("jupyterlab-overrides.json")
LAB_SETTINGS_DIR = f"{VENV}/share/jupyter/lab/settings"


class BuildError(Exception):
    """A build step failed; the message says which and what to do."""


_STARTED = time.monotonic()


def log(message: str, *args: object) -> None:
    """Print a progress line, with the seconds since the start, on standard error."""
    text = message % args if args else message
    print(f"build [{time.monotonic() - _STARTED:5.1f}s]: {text}", file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    capture: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run *cmd* with no standard input; its output goes to standard error unless captured.

    The program is looked up on this machine's PATH, not on the PATH in *env*.
    """
    result = subprocess.run(
        host_argv(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else sys.stderr,
        stderr=subprocess.PIPE if capture else None,
        text=True,
        env=env,
        check=False,
    )
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] if capture else ""
        raise BuildError(
            f"command failed with exit status {result.returncode}: "
            f"{' '.join(os.fspath(c) for c in cmd)}" + (f"\n{detail}" if detail else "")
        )
    return result


def host_argv(cmd: Sequence[str | os.PathLike[str]]) -> list[str]:
    """*cmd* as strings, with the program resolved on this machine's PATH."""
    argv = [os.fspath(c) for c in cmd]
    argv[0] = shutil.which(argv[0]) or argv[0]
    return argv


def short_hash(data: object) -> str:
    """A 12-character hash of *data* serialised as canonical JSON."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- tools ---------------------------------------------------------------------------------


def is_elf(path: Path) -> bool:
    """True when *path* is an ELF executable (not a wrapper script such as a pyenv shim)."""
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def find_uv(cache: Path) -> Path:
    """Locate a real ``uv`` binary, installing uv's wheel from PyPI into *cache* if needed.

    The binary is also copied into the image, so wrapper scripts (pyenv shims) do not count.
    """
    candidates: list[Path] = []
    if os.environ.get("UV"):
        candidates.append(Path(os.environ["UV"]))
    which = shutil.which("uv")
    if which:
        candidates.append(Path(which))
    for python in (sys.executable, shutil.which("python3")):
        if not python:
            continue
        found = run([python, "-c", "import uv; print(uv.find_uv_bin())"], capture=True, check=False)
        if found.returncode == 0 and found.stdout.strip():
            candidates.append(Path(found.stdout.strip()))
    candidates.append(cache / "tools" / "bin" / "uv")
    for candidate in candidates:
        if is_elf(candidate.resolve()):
            return candidate.resolve()
    log("no uv binary found; installing uv from PyPI into %s", cache / "tools")
    python = shutil.which("python3") or sys.executable
    run([python, "-m", "pip", "install", "--quiet", "--target", cache / "tools", "uv"])
    uv = cache / "tools" / "bin" / "uv"
    if not is_elf(uv):
        raise BuildError(f"installing uv did not give a binary at {uv}")
    return uv


def check_prerequisites() -> None:
    """Fail early, with the fix, when the build cannot run on this machine."""
    if os.geteuid() != 0:
        raise BuildError("the build needs root (mmdebstrap --mode=root, chroot, mknod)")
    if not shutil.which("docker"):
        raise BuildError("the docker client is missing; run scripts/docker-engine.sh ensure")
    answer = run(
        ["docker", "version", "--format", "{{.Server.Version}}"], capture=True, check=False
    )
    if answer.returncode != 0:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise BuildError(
            f"no Docker engine answers at {host}; run scripts/docker-engine.sh ensure "
            f"({answer.stderr.strip()[-300:]})"
        )


def ensure_mmdebstrap() -> None:
    """Install Debian's ``mmdebstrap`` with apt when it is missing."""
    if shutil.which("mmdebstrap"):
        return
    log("mmdebstrap is missing; installing it with apt-get")
    run(["apt-get", "update"])
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "install", "-y", "--no-install-recommends", "mmdebstrap"], env=env)


# --- the project wheel ---------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    """A built wheel and what the cache keys need from it."""

    path: Path
    name: str
    version: str
    #: Hash of the wheel's member names and contents (zip timestamps excluded).
    digest: str
    requires_dist: tuple[str, ...]
    #: Top-level import names, from ``top_level.txt`` or the member paths.
    top_level: tuple[str, ...]


def source_files(source: Path) -> list[str]:
    """Files of the source tree that a build may use: git's tracked and unignored files."""
    if (source / ".git").exists() and shutil.which("git"):
        listing = run(
            ["git", "-C", source, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture=True,
        ).stdout
        return sorted({p for p in listing.split("\0") if p and (source / p).is_file()})
    skip = {".git", ".venv", ".cache", "build", "dist", "node_modules", "__pycache__"}
    files = []
    for root, dirs, names in os.walk(source):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(root, n), source) for n in names]
    return sorted(files)


def build_wheel(source: Path, out: Path, uv: Path) -> Path:
    """Build the project's wheel from a clean copy of *source* (no stale ``build/``)."""
    copy = out / "src"
    for rel in source_files(source):
        target = copy / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target, follow_symlinks=False)
    run([uv, "build", "--quiet", "--wheel", "--python", sys.executable, "--out-dir", out, copy])
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel from {source}, found {[w.name for w in wheels]}")
    return wheels[0]


LAB_PROJECT = "labextension"
"""The JupyterLab extension project in the source tree (the sidebar and its server side)."""

LAB_PREBUILT = "jupyter_nsml_lab/labextension"
"""Its built JavaScript, inside the project (``jlpm build:prod``; ignored by git, made by
scripts/setup-env.sh)."""


def build_lab_wheel(source: Path, out: Path, uv: Path) -> Path | None:
    """Build the wheel of the JupyterLab extension project, if the source tree has one.

    The built JavaScript is taken as it is (never built here: the image build needs no
    Node.js). A project with a ``package.json`` but no build is an error that names the
    command; one without a ``package.json`` (the server extension alone) builds without it.
    """
    lab = source / LAB_PROJECT
    if not (lab / "pyproject.toml").exists():
        return None
    has_frontend = (lab / "package.json").exists()
    prebuilt = lab / LAB_PREBUILT
    if has_frontend and not (prebuilt / "package.json").exists():
        raise BuildError(
            f"the JupyterLab extension in {lab} is not built ({prebuilt} is missing); run "
            "scripts/setup-env.sh (it runs `jlpm build:prod` there), then build again"
        )
    copy = out / "lab-src"
    prefix = LAB_PROJECT + "/"
    files = [rel[len(prefix) :] for rel in source_files(source) if rel.startswith(prefix)]
    if has_frontend:
        files += [os.path.relpath(p, lab) for p in sorted(prebuilt.rglob("*")) if p.is_file()]
    for rel in files:
        target = copy / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lab / rel, target, follow_symlinks=False)
    env = dict(os.environ)
    if not has_frontend:
        log("%s has no package.json: its wheel holds the server extension only", lab)
        env["HATCH_JUPYTER_BUILDER_SKIP_NPM"] = "1"
    dest = out / "lab"
    run(
        [uv, "build", "--quiet", "--wheel", "--python", sys.executable, "--out-dir", dest, copy],
        env=env,
    )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel from {lab}, found {[w.name for w in wheels]}")
    return wheels[0]


def inspect_wheel(path: Path) -> Wheel:
    """Read a wheel's metadata and hash its contents."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
        for name in names:
            digest.update(name.encode() + b"\0" + hashlib.sha256(zf.read(name)).digest())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = HeaderParser().parsestr(zf.read(meta_name).decode())
        top_name = meta_name.replace("METADATA", "top_level.txt")
        if top_name in names:
            top = tuple(sorted(set(zf.read(top_name).decode().split())))
        else:
            top = tuple(
                sorted(
                    {
                        n.split("/")[0].removesuffix(".py")
                        for n in names
                        if ".dist-info/" not in n and ".data/" not in n
                    }
                )
            )
    return Wheel(
        path=path,
        name=meta["Name"],
        version=meta["Version"],
        digest=digest.hexdigest(),
        requires_dist=tuple(meta.get_all("Requires-Dist") or ()),
        top_level=top,
    )


# --- the base root filesystem --------------------------------------------------------------


def image_requirements(requires_dist: Sequence[str]) -> list[str]:
    """The project's requirements that reach the image: unconditional or of ``PROJECT_EXTRAS``.

    Requirements of other extras (tests, PostgreSQL) do not change the base.
    """
    kept = []
    for req in requires_dist:
        extras = re.findall(r"extra\s*==\s*[\"']([^\"']+)[\"']", req)
        if not extras or set(extras) & set(PROJECT_EXTRAS):
            kept.append(req)
    return kept


def uv_version(uv: Path) -> str:
    """``uv --version`` of the binary copied into the image."""
    return run([uv, "--version"], capture=True).stdout.strip()


def base_inputs(
    project: Wheel, uv: Path, constraints: Path | None, mirror: str | None
) -> dict[str, object]:
    """Everything the base layer depends on; its hash is the base key."""
    return {
        "recipe": RECIPE_VERSION,
        "suite": DEBIAN_SUITE,
        "mirror": mirror or "default",
        "debian_packages": sorted(DEBIAN_PACKAGES),
        "project": project.name,
        "project_requires": sorted(image_requirements(project.requires_dist)),
        "extras": sorted(PROJECT_EXTRAS),
        "image_requirements": sorted(IMAGE_REQUIREMENTS),
        "removed": sorted(REMOVED_PACKAGES),
        "constraints": file_digest(constraints) if constraints else None,
        "uv": uv_version(uv),
        "ca_bundle": file_digest(CA_BUNDLE) if CA_BUNDLE.exists() else None,
        "user": [NB_USER, NB_UID, NB_GID],
    }


def chroot(
    root: Path, *argv: str, network: bool = False, capture: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run *argv* inside *root* with a clean environment; uv works offline unless *network*."""
    env = {
        "PATH": IMAGE_ENV["PATH"],
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "SSL_CERT_FILE": str(CA_BUNDLE),
        "UV_CACHE_DIR": "/root/.cache/uv",
        "UV_LINK_MODE": "copy",
        "UV_NO_PROGRESS": "1",
        "UV_PYTHON_DOWNLOADS": "never",
    }
    if not network:
        env["UV_OFFLINE"] = "1"
    return run(["chroot", root, *argv], env=env, capture=capture)


def write_accounts(root: Path) -> None:
    """The ``root`` and ``jovyan`` accounts, and a writable home for ``jovyan``."""
    shell = (
        "/bin/bash"
        if (root / "bin/bash").exists() or (root / "usr/bin/bash").exists()
        else "/bin/sh"
    )
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/passwd").write_text(
        f"root:x:0:0:root:/root:{shell}\n"
        f"{NB_USER}:x:{NB_UID}:{NB_GID}:{NB_USER}:/home/{NB_USER}:{shell}\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    (root / "etc/group").write_text(f"root:x:0:\nusers:x:{NB_GID}:{NB_USER}\nnogroup:x:65534:\n")
    home = root / "home" / NB_USER
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, NB_UID, NB_GID)
    home.chmod(0o755)
    (root / "root").mkdir(mode=0o700, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)


def make_devices(root: Path) -> None:
    """Character devices under ``/dev`` for tools run in the chroot."""
    dev = root / "dev"
    dev.mkdir(exist_ok=True)
    for name, major, minor in DEVICES:
        node = dev / name
        if not node.exists():
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            node.chmod(0o666)


def install_uv(root: Path, uv: Path) -> None:
    """Copy the host's ``uv`` into ``/usr/local/bin`` of *root*."""
    target = root / "usr/local/bin/uv"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(uv, target)
    target.chmod(0o755)


def build_base(
    root: Path,
    project: Wheel,
    uv: Path,
    uv_cache: Path,
    constraints: Path | None,
    mirror: str | None,
) -> None:
    """Create the base root filesystem at *root* (which must not exist)."""
    ensure_mmdebstrap()
    log("unpacking Debian %s packages into %s", DEBIAN_SUITE, root)
    cmd: list[str | os.PathLike[str]] = [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        "--variant=extract",
        "--quiet",
        f"--include={','.join(DEBIAN_PACKAGES)}",
        DEBIAN_SUITE,
        root,
    ]
    if mirror:
        cmd.append(mirror)
    run(cmd)
    for unused in UNUSED_PATHS:
        shutil.rmtree(root / unused, ignore_errors=True)
    # Python's default certificate paths (OPENSSLDIR is /usr/lib/ssl), as the openssl and
    # ca-certificates packages would link them.
    ssl_dir = root / "usr/lib/ssl"
    ssl_dir.mkdir(parents=True, exist_ok=True)
    for link, target in (("certs", "/etc/ssl/certs"), ("cert.pem", str(CA_BUNDLE))):
        if not (ssl_dir / link).exists():
            (ssl_dir / link).symlink_to(target)
    make_devices(root)
    write_accounts(root)
    if not CA_BUNDLE.exists():
        raise BuildError(f"{CA_BUNDLE} is missing on this machine; install ca-certificates")
    (root / CA_BUNDLE.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(CA_BUNDLE, root / CA_BUNDLE.relative_to("/"))
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    install_uv(root, uv)
    if (root / "sbin/ldconfig").exists():
        chroot(root, "/sbin/ldconfig")

    # uv's download cache lives outside the root filesystem between builds.
    cache_in_root = root / "root/.cache/uv"
    cache_in_root.parent.mkdir(parents=True, exist_ok=True)
    if uv_cache.exists():
        uv_cache.rename(cache_in_root)
    wheels = root / "tmp/wheels"
    wheels.mkdir(parents=True)
    shutil.copy2(project.path, wheels / project.path.name)
    try:
        log("creating %s and installing the dependencies of %s", VENV, project.name)
        chroot(root, "uv", "venv", "--seed", "--python", f"/usr/bin/{PYTHON}", VENV, network=True)
        install = ["uv", "pip", "install", "--python", f"{VENV}/bin/python"]
        if constraints:
            shutil.copy2(constraints, wheels / "constraints.txt")
            install += ["--constraint", "/tmp/wheels/constraints.txt"]
        extras = ",".join(PROJECT_EXTRAS)
        chroot(
            root,
            *install,
            f"/tmp/wheels/{project.path.name}[{extras}]",
            *IMAGE_REQUIREMENTS,
            network=True,
        )
        # The base holds the dependencies only; the project goes into its own layer.
        chroot(
            root,
            "uv",
            "pip",
            "uninstall",
            "--python",
            f"{VENV}/bin/python",
            project.name,
            *REMOVED_PACKAGES,
        )
        site = site_packages(root)
        for name in project.top_level:
            shutil.rmtree(site / name, ignore_errors=True)
        log("compiling the byte code of %s and the standard library", VENV)
        compile_bytecode(root)
        freeze = chroot(root, "uv", "pip", "freeze", "--python", f"{VENV}/bin/python", capture=True)
        (root / VENV.lstrip("/") / "base-requirements.txt").write_text(freeze.stdout)
        # uv's lock file of the environment; it is created again when needed.
        with contextlib.suppress(FileNotFoundError):
            (root / VENV.lstrip("/") / ".lock").unlink()
    finally:
        if cache_in_root.exists():
            shutil.rmtree(uv_cache, ignore_errors=True)
            cache_in_root.rename(uv_cache)
        shutil.rmtree(wheels, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (root / "etc/resolv.conf").unlink()
    chown_tree(root / VENV.lstrip("/"), NB_UID, NB_GID)


#: Folders of the standard library that hold no modules to compile.
STDLIB_SKIP = frozenset({"lib-dynload", "site-packages", "dist-packages", "__pycache__"})


def site_packages(root: Path) -> Path:
    """The venv's ``site-packages`` directory inside *root*."""
    return root / VENV.lstrip("/") / "lib" / PYTHON / "site-packages"


def compile_bytecode(root: Path, paths: Sequence[str] = ()) -> None:
    """Write ``.pyc`` files so that the non-root user never compiles at start-up.

    By default: the venv's ``site-packages`` and the standard library (Debian compiles the
    latter in a maintainer script, which ``--variant=extract`` does not run). Several plain
    processes share the work: ``compileall -j`` needs POSIX semaphores, which a chroot
    without ``/dev/shm`` lacks.
    """
    targets = list(paths)
    if not targets:
        for folder in (site_packages(root), root / "usr/lib" / PYTHON):
            targets += [
                "/" + os.path.relpath(p, root)
                for p in sorted(folder.iterdir())
                if (p.is_dir() and p.name not in STDLIB_SKIP and not p.name.endswith("-info"))
                or p.suffix == ".py"
            ]
    workers = max(1, min(len(targets), os.cpu_count() or 1))
    chunks = [targets[i::workers] for i in range(workers)]
    env = {"PATH": IMAGE_ENV["PATH"], "HOME": "/root", "LANG": "C.UTF-8"}
    procs = [
        subprocess.Popen(
            host_argv(["chroot", root, f"{VENV}/bin/python", "-m", "compileall", "-qq", *chunk]),
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
            env=env,
        )
        for chunk in chunks
        if chunk
    ]
    # compileall exits 1 when some file does not compile (e.g. Python 2 test data in a
    # package); the files that compile are written either way.
    codes = [proc.wait() for proc in procs]
    if any(code not in (0, 1) for code in codes):
        raise BuildError(f"compiling byte code in {root} failed (exit statuses {codes})")


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """``chown -R`` without following symbolic links."""
    os.chown(path, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def excluded(rel: str) -> bool:
    """True for paths of the root filesystem that never go into an image layer.

    An entry of ``NOT_IN_IMAGE`` ending in ``/`` excludes what the folder holds (the folder
    itself stays); any other entry excludes that one path.
    """
    return any(rel.startswith(p) if p.endswith("/") else rel == p for p in NOT_IN_IMAGE)


def import_base(root: Path, ref: str) -> None:
    """``tar --numeric-owner -c . | docker import`` the base root filesystem as *ref*."""
    log("importing the base root filesystem as %s", ref)
    tar_cmd = ["tar", "--numeric-owner", "-C", os.fspath(root), "-c"]
    for pattern in NOT_IN_IMAGE:
        tar_cmd.append(
            f"--exclude=./{pattern.rstrip('/')}/*"
            if pattern.endswith("/")
            else f"--exclude=./{pattern}"
        )
    tar_cmd.append(".")
    tar = subprocess.Popen(tar_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert tar.stdout is not None
    imp = subprocess.run(
        ["docker", "import", "-c", f"ENV PATH={IMAGE_ENV['PATH']}", "-", ref],
        stdin=tar.stdout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    tar.stdout.close()
    if tar.wait() != 0 or imp.returncode != 0:
        raise BuildError(f"importing the base image {ref} failed: {imp.stderr.strip()[-1000:]}")


# --- the project layer ---------------------------------------------------------------------


def project_layer(
    base_root: Path, work: Path, wheels: Sequence[Wheel], layer: Path, trash: Path
) -> int:
    """Install *wheels* over a hard-linked copy of the base and tar what they add.

    Returns the number of paths in the layer tar written to *layer*. The copy is then
    handed to :func:`discard` (under *trash*).
    """
    stage = work / "stage"
    run(["cp", "-a", "--link", base_root, stage])
    incoming = stage / "tmp/wheels"
    incoming.mkdir(parents=True)
    for wheel in wheels:
        shutil.copy2(wheel.path, incoming / wheel.path.name)
    chroot(
        stage,
        "uv",
        "pip",
        "install",
        "--python",
        f"{VENV}/bin/python",
        "--no-deps",
        *(f"/tmp/wheels/{w.path.name}" for w in wheels),
    )
    site = site_packages(stage)
    top = sorted({name for w in wheels for name in w.top_level if (site / name).is_dir()})
    if top:
        compile_bytecode(stage, ["/" + os.path.relpath(site / n, stage) for n in top])

    count = 0
    venv_rel = VENV.lstrip("/")
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirs, files in os.walk(stage):
            dirs.sort()
            rel_dir = os.path.relpath(dirpath, stage)
            for name in [*dirs, *sorted(files)]:
                rel = os.path.normpath(os.path.join(rel_dir, name))
                if excluded(rel):
                    if name in dirs:
                        dirs.remove(name)
                    continue
                path = os.path.join(dirpath, name)
                new = os.lstat(path)
                try:
                    old = os.lstat(base_root / rel)
                except FileNotFoundError:
                    old = None
                if old is not None and (old.st_ino == new.st_ino or name in dirs):
                    continue
                info = tar.gettarinfo(path, arcname=rel)
                if rel == venv_rel or rel.startswith(venv_rel + "/"):
                    info.uid, info.gid = NB_UID, NB_GID
                info.uname = info.gname = ""
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
                count += 1
    discard(stage, trash)
    return count


def dockerfile(base_ref: str, labels: dict[str, str]) -> str:
    """The recipe that puts the project layer on the base and sets the image config."""
    env = " \\\n    ".join(f"{k}={v}" for k, v in IMAGE_ENV.items())
    label = " \\\n      ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return (
        f"FROM {base_ref}\n"
        "ADD project.tar /\n"
        f"COPY {LAB_OVERRIDES.name} {LAB_SETTINGS_DIR}/overrides.json\n"
        f"ENV {env}\n"
        f"LABEL {label}\n"
        f"USER {NB_UID}:{NB_GID}\n"
        f"WORKDIR /home/{NB_USER}\n"
        'ENTRYPOINT ["tini", "-g", "--"]\n'
        'CMD ["jupyterhub-singleuser"]\n'
    )


# --- the engine ----------------------------------------------------------------------------


def image_exists(ref: str) -> bool:
    """True when the engine has an image called *ref*."""
    return run(["docker", "image", "inspect", ref], capture=True, check=False).returncode == 0


def image_size(ref: str) -> int:
    """The size of image *ref* in bytes."""
    out = run(["docker", "image", "inspect", "--format", "{{.Size}}", ref], capture=True).stdout
    return int(out.strip())


def split_ref(ref: str) -> tuple[str, str]:
    """``name:tag`` → (name, tag); the tag defaults to ``latest``."""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return name, tag


def prune_images(name: str, keep: set[str]) -> None:
    """Remove older ``<name>:<hash>`` tags, in a detached background process.

    Deleting a large image takes seconds here; the build does not wait. An image that a
    container still uses only loses its tag.
    """
    listing = run(
        ["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", name], capture=True
    ).stdout.split()
    old = [
        ref
        for ref in listing
        if ref not in keep and re.fullmatch(r"[0-9a-f]{12}", ref.rpartition(":")[2])
    ]
    if old:
        log("removing older images in the background: %s", " ".join(old))
        subprocess.Popen(
            host_argv(["docker", "image", "rm", *old]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


# --- the cache -----------------------------------------------------------------------------


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """Hold an exclusive lock on *cache* so that concurrent builds wait for each other."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("waiting for another build that holds %s", cache / ".lock")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def prune_bases(cache: Path, keep: int, current: Path) -> list[str]:
    """Keep the *keep* most recently used base root filesystems; remove the others.

    Returns the keys of the bases kept (their images stay in the engine too).
    """
    bases = sorted(
        (
            p
            for p in cache.glob("base-*")
            if ".partial-" not in p.name and (p / "inputs.json").exists()
        ),
        key=lambda p: (p / "inputs.json").stat().st_mtime,
        reverse=True,
    )
    for old in bases[keep:]:
        if old != current:
            log("removing the older cached base %s", old.name)
            discard(old, cache / "trash")
    for partial in cache.glob("base-*.partial-*"):
        discard(partial, cache / "trash")
    return [p.name.removeprefix("base-") for p in bases[:keep] if p.exists()] + [
        current.name.removeprefix("base-")
    ]


def discard(path: Path, trash: Path) -> None:
    """Move *path* into *trash* and delete it there in a detached background process.

    Unlinking tens of thousands of files takes seconds on this kind of disk; the build does
    not wait for it. A later build deletes whatever an interrupted removal left behind.
    """
    trash.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix="discard-", dir=trash))
    path.rename(holder / path.name)
    subprocess.Popen(
        host_argv(["rm", "-rf", "--one-file-system", holder]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def empty_trash(trash: Path) -> None:
    """Delete, in the background, what earlier builds left in *trash*."""
    leftovers = sorted(trash.glob("discard-*")) if trash.is_dir() else []
    if leftovers:
        subprocess.Popen(
            host_argv(["rm", "-rf", "--one-file-system", *leftovers]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


# --- the build -----------------------------------------------------------------------------


EPILOG = f"""\
how it works:
  1. builds the project's wheel from a clean copy of the source tree (git's tracked and
     unignored files) and hashes its contents; likewise the wheel of the JupyterLab
     extension in labextension/ with its prebuilt JavaScript (jupyter_nsml_lab/labextension/,
     made by scripts/setup-env.sh; never built here);
  2. base layer, cached under CACHE_DIR/base-<key>/ and in the engine as <name>-base:<key>:
     mmdebstrap --variant=extract of these Debian {DEBIAN_SUITE} packages:
{textwrap.fill(" ".join(DEBIAN_PACKAGES), 88, initial_indent=" " * 7, subsequent_indent=" " * 7)}
     the user {NB_USER} ({NB_UID}:{NB_GID}), a venv at {VENV} made by uv in a chroot with
     every dependency of the project's {"/".join(PROJECT_EXTRAS)} extra, byte-compiled,
     without {", ".join(REMOVED_PACKAGES)}. The key covers the Debian packages, the
     project's declared dependencies, uv's version, the CA bundle and the recipe; the
     versions resolved then stay until the key changes or --rebuild-base is given;
  3. project layer: the wheel(s) installed without dependencies over a hard-linked copy of
     the base; the files they add are put on the base with `docker build` (no RUN step).
  The image is skipped when <name>:<input hash> exists already. Older images and bases are
  deleted in the background.

needs: root, the docker client and an engine at DOCKER_HOST, and (for a new base) the
Debian mirror and PyPI. Standard output carries one line, the image reference
<name>:<input hash>; progress goes to standard error.
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="hub_config/images/build.sh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description=(
            "Build the single-user notebook image offline (Debian packages and PyPI only) "
            "and load it into the Docker engine at DOCKER_HOST. It is also the default "
            "image of training sessions."
        ),
    )
    parser.add_argument(
        "--image",
        default=DEFAULT_IMAGE,
        help=f"image name and tag to set (default {DEFAULT_IMAGE}); the image is also tagged "
        "<name>:<12-hex hash of the build inputs>",
    )
    parser.add_argument(
        "--source", type=Path, default=REPO, help=f"project source tree (default {REPO})"
    )
    parser.add_argument(
        "--extra-wheel",
        type=Path,
        action="append",
        default=[],
        metavar="WHEEL",
        help="another wheel to install without dependencies in the project layer "
        "(repeatable), e.g. a JupyterLab extension",
    )
    parser.add_argument(
        "--constraint",
        type=Path,
        help="pip constraints file for the dependencies (e.g. pins matching the hub)",
    )
    parser.add_argument(
        "--mirror",
        help="Debian mirror URL or sources file for mmdebstrap (default deb.debian.org)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where unpacked base root filesystems are kept (default {DEFAULT_CACHE})",
    )
    parser.add_argument(
        "--keep-bases", type=int, default=2, help="cached bases to keep (default 2)"
    )
    parser.add_argument(
        "--force", action="store_true", help="build even when the image with the same inputs exists"
    )
    parser.add_argument(
        "--rebuild-base",
        action="store_true",
        help="rebuild the base root filesystem (re-resolves the dependencies); implies --force",
    )
    parser.add_argument(
        "--no-prune", action="store_true", help="keep older images and cached bases"
    )
    args = parser.parse_args(argv)
    if args.rebuild_base:
        args.force = True
    if args.keep_bases < 1:
        parser.error(f"--keep-bases must be at least 1, got {args.keep_bases}")
    args.source = args.source.resolve()
    args.cache_dir = args.cache_dir.resolve()
    if not (args.source / "pyproject.toml").exists():
        parser.error(f"--source {args.source} has no pyproject.toml")
    for wheel in args.extra_wheel:
        if not wheel.is_file():
            parser.error(f"--extra-wheel {wheel} does not exist")
    if args.constraint and not args.constraint.is_file():
        parser.error(f"--constraint {args.constraint} does not exist")
    return args


def build(args: argparse.Namespace) -> str:
    """Build (or find) the image; returns ``<name>:<input hash>``."""
    check_prerequisites()
    name, tag = split_ref(args.image)
    cache: Path = args.cache_dir
    with locked(cache), tempfile.TemporaryDirectory(prefix="work-", dir=cache) as tmp:
        work = Path(tmp)
        # We hold the lock: any other work folder was left by an interrupted build.
        for stale in cache.glob("work-*"):
            if stale != work:
                discard(stale, cache / "trash")
        empty_trash(cache / "trash")
        uv = find_uv(cache)
        (work / "wheels").mkdir()
        project = inspect_wheel(build_wheel(args.source, work / "wheels", uv))
        lab = build_lab_wheel(args.source, work / "wheels", uv)
        extras = [inspect_wheel(w.resolve()) for w in args.extra_wheel]
        if lab is not None:
            extras.insert(0, inspect_wheel(lab))
            log("built %s %s", lab.name, extras[0].digest[:12])
        log("built %s %s", project.path.name, project.digest[:12])

        inputs = base_inputs(project, uv, args.constraint, args.mirror)
        base_key = short_hash(inputs)
        base_ref = f"{name}-base:{base_key}"
        wheels = [project, *extras]
        labels = {
            f"{LABEL_PREFIX}.base": base_key,
            f"{LABEL_PREFIX}.project": f"{project.name}=={project.version}",
            f"{LABEL_PREFIX}.wheels": ",".join(f"{w.path.name}@{w.digest[:12]}" for w in wheels),
        }
        input_hash = short_hash(
            {
                "base": base_key,
                "wheels": [w.digest for w in wheels],
                "recipe": dockerfile(base_ref, labels),
                "lab_settings": file_digest(LAB_OVERRIDES),
            }
        )
        labels[f"{LABEL_PREFIX}.inputs"] = input_hash
        final_ref = f"{name}:{input_hash}"
        wanted_ref = f"{name}:{tag}"

        if not args.force and image_exists(final_ref):
            run(["docker", "tag", final_ref, wanted_ref])
            log(
                "%s is up to date (%s, %.0f MB); nothing to build",
                wanted_ref,
                final_ref,
                image_size(final_ref) / 1e6,
            )
            return final_ref

        base_dir = cache / f"base-{base_key}"
        root = base_dir / "rootfs"
        if args.rebuild_base or not (base_dir / "inputs.json").exists():
            partial = cache / f"base-{base_key}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            build_base(
                partial / "rootfs", project, uv, cache / "uv-cache", args.constraint, args.mirror
            )
            (partial / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True))
            if base_dir.exists():
                discard(base_dir, cache / "trash")
            partial.rename(base_dir)
            run(["docker", "image", "rm", base_ref], capture=True, check=False)
        else:
            log("using the cached base %s", base_dir)
        os.utime(base_dir / "inputs.json")
        if not image_exists(base_ref):
            import_base(root, base_ref)

        context = work / "context"
        context.mkdir()
        count = project_layer(root, work, wheels, context / "project.tar", cache / "trash")
        (context / "Dockerfile").write_text(dockerfile(base_ref, labels))
        shutil.copy2(LAB_OVERRIDES, context / LAB_OVERRIDES.name)
        log("adding the project layer (%d paths) to %s", count, base_ref)
        run(
            [
                "docker",
                "build",
                "--quiet",
                "--force-rm",
                "--network",
                "host",
                "-t",
                final_ref,
                "-t",
                wanted_ref,
                context,
            ],
            env=dict(os.environ, DOCKER_BUILDKIT="0"),
            capture=True,
        )
        log(
            "image %s (also %s), %.0f MB, ready",
            final_ref,
            wanted_ref,
            image_size(final_ref) / 1e6,
        )
        if not args.no_prune:
            kept = prune_bases(cache, args.keep_bases, base_dir)
            prune_images(name, {final_ref, wanted_ref})
            prune_images(f"{name}-base", {f"{name}-base:{key}" for key in kept})
        return final_ref


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: build, then print the image reference on standard output."""
    args = parse_args(argv)
    started = time.monotonic()
    try:
        ref = build(args)
    except BuildError as e:
        log("error: %s", e)
        log("failed after %.1f s", time.monotonic() - started)
        return 1
    log("done in %.1f s", time.monotonic() - started)
    print(ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``nsml-server``: the NSML control plane, a JupyterHub managed service.

It is the only writer of the NSML database. Started by the hub (see
``hub_config/jupyterhub_config.py``), it reads its address and credentials from the
``JUPYTERHUB_*`` variables the hub gives a managed service, and its own settings from
``NSML_*`` variables, a config file (``--config``) or the command line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tornado import web
from tornado.httpserver import HTTPServer
from traitlets import Bool, Float, Integer, List, Unicode, default, validate
from traitlets.config import Application

from . import __version__, nodes
from .api import datasets as ds
from .api.base import NotFoundHandler, ServerContext
from .api.credits import credit_routes
from .api.handlers import (
    HealthHandler,
    HeartbeatHandler,
    MeHandler,
    NodeHandler,
    NodesHandler,
    UsageHandler,
)
from .api.openapi import OpenAPIHandler, openapi_document
from .api.placements import PlacementHandler, PlacementsHandler, placement_out
from .api.routes import Route
from .batching import HeartbeatQueue
from .db import Database, SchemaError, check_schema, redact_url, upgrade
from .scheduler import SubmitQueue
from .schemas import Heartbeat


def utcnow() -> datetime:
    """Naive UTC now; the database stores naive UTC timestamps."""
    return datetime.now(UTC).replace(tzinfo=None)


class IndexHandler(web.RequestHandler):
    """``GET /services/nsml/``: where the API and its description are (the hub polls it)."""

    def initialize(self, base_url: str) -> None:
        self.base_url = base_url

    def get(self) -> None:
        self.finish(
            {
                "name": "nsml",
                "version": __version__,
                "api": self.base_url + "api/",
                "openapi": self.base_url + "api/openapi.json",
            }
        )


def api_routes(ctx: ServerContext | None, document: dict[str, Any]) -> list[Route]:
    """The API's routes but the session ones (:func:`nsml_server.api.sessions.session_routes`),
    as the OpenAPI document writes their paths. A route here that the document lacks, or the
    other way round, fails ``tests/unit/test_openapi.py``."""
    k = {"ctx": ctx}
    return [
        Route("/health", HealthHandler, k),
        Route("/openapi.json", OpenAPIHandler, {**k, "document": document}),
        Route("/me", MeHandler, k),
        Route("/usage", UsageHandler, k),
        Route("/nodes", NodesHandler, k),
        Route("/nodes/{name}", NodeHandler, k),
        Route("/nodes/{name}/heartbeat", HeartbeatHandler, k),
        Route("/placements", PlacementsHandler, k),
        Route("/placements/{id}", PlacementHandler, k),
        Route("/placements/{id}/mounts", ds.MountsHandler, k),
        Route("/nodes/{name}/dataset-holds", ds.NodeHoldsHandler, k),
        Route("/nodes/{name}/dataset-holds/{id}", ds.NodeHoldHandler, k),
        Route("/datasets", ds.DatasetsHandler, k),
        Route("/dataset-store", ds.StoreHandler, k),
        Route("/dataset-store/gc", ds.GcHandler, k),
        Route("/dataset-store/local", ds.LocalGrantHandler, k),
        Route("/datasets/{name}", ds.DatasetHandler, k),
        Route("/datasets/{name}/uploads", ds.UploadsHandler, k),
        Route("/datasets/{name}/uploads/{upload_id}", ds.UploadHandler, k),
        Route("/datasets/{name}/uploads/{upload_id}/commit", ds.CommitHandler, k),
        Route("/datasets/{name}/uploads/{upload_id}/blobs/{blake3}", ds.BlobPutHandler, k),
        Route("/datasets/{name}/uploads/{upload_id}/pack", ds.PackInHandler, k),
        Route("/datasets/{name}/versions/{version}", ds.VersionHandler, k),
        Route("/datasets/{name}/versions/{version}/manifest", ds.ManifestHandler, k),
        Route("/datasets/{name}/versions/{version}/blobs/{blake3}", ds.BlobHandler, k),
        Route("/datasets/{name}/versions/{version}/pack", ds.PackOutHandler, k),
    ]


class DBSettings(Application):
    """Settings shared by the server and its database subcommands."""

    db_url = Unicode(
        help="""SQLAlchemy URL of the NSML database.

        Default: $NSML_DB_URL, else SQLite at <state_dir>/nsml.sqlite (fine for one machine).
        Production: postgresql+psycopg://USER:PASSWORD@HOST/DB. The schema is managed by
        Alembic; see `nsml-server upgrade-db`.
        """,
    ).tag(config=True)

    state_dir = Unicode(
        help="""Folder for the server's state (SQLite database, logs of local runs).

        Default: $NSML_STATE_DIR, else ~/.local/share/jupyter-nsml. Created if missing.
        """,
    ).tag(config=True)

    @default("state_dir")
    def _default_state_dir(self) -> str:
        return os.environ.get("NSML_STATE_DIR") or str(
            Path.home() / ".local" / "share" / "jupyter-nsml"
        )

    @default("db_url")
    def _default_db_url(self) -> str:
        return os.environ.get("NSML_DB_URL") or f"sqlite:///{Path(self.state_dir) / 'nsml.sqlite'}"

    aliases = {"db-url": "DBSettings.db_url", "state-dir": "DBSettings.state_dir"}

    def ensure_state_dir(self) -> Path:
        path = Path(self.state_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path


class UpgradeDB(DBSettings):
    """Upgrade the NSML database schema to this version's newest revision."""

    name = "nsml-server upgrade-db"
    description = "Upgrade the NSML database to the schema this version needs. Back it up first."

    def start(self) -> None:
        self.ensure_state_dir()
        upgrade(self.db_url)
        print(f"database {redact_url(self.db_url)} is up to date")


class NSMLServer(DBSettings):
    """The NSML server: REST API, node registry, the local node's agent."""

    name = "nsml-server"
    version = __version__
    gpu_use: Any = None  # gpu_use.GpuUseMonitor, made by init_gpu_use
    description = "The NSML control plane (a JupyterHub managed service)."
    examples = """
    nsml-server                                   # as a hub managed service (the usual way)
    nsml-server upgrade-db --db-url URL           # upgrade the database schema
    """
    subcommands = {
        "upgrade-db": (UpgradeDB, UpgradeDB.description),
    }

    aliases = {
        **DBSettings.aliases,
        "config": "NSMLServer.config_file",
        "port": "NSMLServer.port",
        "ip": "NSMLServer.ip",
        "node-name": "NSMLServer.node_name",
        "log-level": "Application.log_level",
    }
    flags = {
        "upgrade-db": (
            {"NSMLServer": {"upgrade_db": True}},
            "Upgrade an older database schema on start (back it up first).",
        ),
        "no-local-node": (
            {"NSMLServer": {"local_node": False}},
            "Do not register this machine as a compute node.",
        ),
    }

    config_file = Unicode("", help="A Python config file (traitlets) to load.").tag(config=True)

    ip = Unicode(
        help="Address to listen on. Default: from $JUPYTERHUB_SERVICE_URL, else 127.0.0.1"
    ).tag(config=True)
    port = Integer(help="Port to listen on. Default: from $JUPYTERHUB_SERVICE_URL, else 8090").tag(
        config=True
    )
    base_url = Unicode(
        help="URL prefix of the service. Default: $JUPYTERHUB_SERVICE_PREFIX, else /services/nsml/"
    ).tag(config=True)

    @default("ip")
    def _default_ip(self) -> str:
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        return (urlparse(url).hostname or "127.0.0.1") if url else "127.0.0.1"

    @default("port")
    def _default_port(self) -> int:
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        return (urlparse(url).port or 80) if url else 8090

    @default("base_url")
    def _default_base_url(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/nsml/")

    @validate("base_url")
    def _slashes(self, proposal: Any) -> str:
        v = str(proposal["value"])
        return "/" + v.strip("/") + "/"

    upgrade_db = Bool(
        False,
        help="Upgrade an older schema on start instead of refusing to start. Back up first.",
    ).tag(config=True)

    local_node = Bool(
        True,
        help="""Register the machine the server runs on as a compute node and run its node
        agent in-process (the embedded default). Turn off when every node runs `nsml-agent`.""",
    ).tag(config=True)

    node_name = Unicode(
        help="Name of the local node. Default: $NSML_NODE_NAME, else the host name."
    ).tag(config=True)

    @default("node_name")
    def _default_node_name(self) -> str:
        return os.environ.get("NSML_NODE_NAME") or socket.gethostname()

    docker_url = Unicode(
        None,
        allow_none=True,
        help="""Docker engine of the local node. Default: $NSML_DOCKER_URL, else DOCKER_HOST /
        the local socket. When no engine answers, the local-process backend is used: it runs
        sessions as plain processes and isolates nothing.""",
    ).tag(config=True)

    @default("docker_url")
    def _default_docker_url(self) -> str | None:
        return os.environ.get("NSML_DOCKER_URL") or None

    heartbeat_interval = Float(
        10.0,
        help="Seconds between the local node's heartbeats, and between checks for silent nodes.",
    ).tag(config=True)

    node_timeout = Float(
        45.0,
        help="""Seconds without a heartbeat after which a node is marked down and receives no
        new work. Should be several heartbeat intervals.""",
    ).tag(config=True)

    node_lost_grace = Float(
        60.0,
        help="""Seconds after node_timeout (so node_timeout + node_lost_grace of silence)
        after which the work on a down node whose engine does not answer is given up: its
        sessions end lost (or are requeued with --restart-on-lost), its notebook servers'
        allocations are released (the hub reports them stopped) and its GPUs return to the
        ledger, once. The node then takes no new work until its orphan containers are swept
        when it answers again. Work whose container the engine still reports running is never
        given up. Longer: fewer false alarms on a flaky network; shorter: faster recovery.""",
    ).tag(config=True)

    lost_max_attempts = Integer(
        3,
        help="""A session started with --restart-on-lost is requeued after a lost node only
        while its attempts (resumes included) stay below this; then it ends lost.""",
    ).tag(config=True)

    @validate("node_lost_grace")
    def _grace_not_negative(self, proposal: Any) -> float:
        v = float(proposal["value"])
        if v < 0:
            raise ValueError(f"node_lost_grace must be >= 0 seconds, not {v}")
        return v

    @validate("lost_max_attempts")
    def _attempts_positive(self, proposal: Any) -> int:
        v = int(proposal["value"])
        if v < 1:
            raise ValueError(f"lost_max_attempts must be >= 1, not {v}")
        return v

    @validate("heartbeat_interval", "node_timeout")
    def _positive(self, proposal: Any) -> float:
        v = float(proposal["value"])
        if v <= 0:
            raise ValueError(f"{proposal['trait'].name} must be > 0 seconds, not {v}")
        return v

    server_id = Unicode(
        help="Name of this server in the leader lease. Default: HOST:PORT:PID."
    ).tag(config=True)

    @default("server_id")
    def _default_server_id(self) -> str:
        return f"{socket.gethostname()}:{self.port}:{os.getpid()}"

    lease_ttl = Float(
        3.0,
        help="""Seconds a scheduler lease lasts without renewal. A standby server takes over
        scheduling this long after the leader stops renewing (crash, SIGKILL, partition).
        Servers sharing a database need clocks synchronised well within this.""",
    ).tag(config=True)

    lease_renew_interval = Float(
        1.0, help="Seconds between lease renewals (and a standby's attempts to take over)."
    ).tag(config=True)

    max_gpus_per_user = Float(
        None,
        allow_none=True,
        help="GPUs one user may hold at once (fractions count); None: no cap. Over it, "
        "requests wait (they are not refused).",
    ).tag(config=True)

    max_jobs_per_user = Integer(
        None, allow_none=True, help="Sessions and servers one user may run at once; None: no cap."
    ).tag(config=True)

    backfill = Bool(
        True,
        help="""Let smaller requests start around the reservation of the request at the head
        of the queue, on other nodes only, so the head is never delayed. False: strict order.""",
    ).tag(config=True)

    @validate("lease_ttl", "lease_renew_interval")
    def _lease_positive(self, proposal: Any) -> float:
        v = float(proposal["value"])
        if v <= 0:
            raise ValueError(f"{proposal['trait'].name} must be > 0 seconds, not {v}")
        return v

    trusted_services = List(
        Unicode(),
        ["nsml-spawner"],
        help="""Hub services whose tokens may act for any user (place resources on a user's
        behalf), like an admin. The embedded config registers `nsml-spawner`, the token the
        hub's NSMLSpawner uses. A service's token must still carry
        access:services!service=nsml.""",
    ).tag(config=True)

    default_credits = Float(
        100.0, help="Credits a user starts with when first seen (GPU-minutes at price 1)."
    ).tag(config=True)

    # ---- training sessions ----------------------------------------------------------------

    session_image = Unicode(
        help="""Image of sessions that name none. Default: $NSML_SESSION_IMAGE, else
        $NSML_NOTEBOOK_IMAGE, else jupyter-nsml/singleuser:latest (the notebook image has
        Python and the nsml SDK). Images are never pulled: it must be on every node.""",
    ).tag(config=True)

    @default("session_image")
    def _default_session_image(self) -> str:
        return (
            os.environ.get("NSML_SESSION_IMAGE")
            or os.environ.get("NSML_NOTEBOOK_IMAGE")
            or "jupyter-nsml/singleuser:latest"
        )

    allowed_images = List(
        Unicode(),
        help="""Images that sessions and placements may name: references or patterns
        ("jupyter-nsml/singleuser:latest"; "jupyter-nsml/singleuser" for every tag;
        "registry.example.org/team/*"; "*" for any image). A name that is not a Docker image
        reference, or that no entry allows, is refused with HTTP 400 listing the allowed ones.
        Default: $NSML_ALLOWED_IMAGES (comma-separated; the hub config gives the spawner the
        same list), else the platform's own images ($NSML_NOTEBOOK_IMAGE, else
        jupyter-nsml/singleuser:latest, and $NSML_SESSION_IMAGE). It checks names only: an
        allowed tag that is re-pushed runs whatever it then points at.""",
    ).tag(config=True)

    @default("allowed_images")
    def _default_allowed_images(self) -> list[str]:
        from .images import allowed_images_from_env

        return allowed_images_from_env(os.environ)

    session_api_url = Unicode(
        help="""The NSML API as a session container reaches it (containers use the host's
        network). Default: $NSML_SESSION_API_URL, else http://127.0.0.1:PORT/BASE_URL/api/
        (this server's own address; set it to a routable address when nodes are remote).""",
    ).tag(config=True)

    @default("session_api_url")
    def _default_session_api_url(self) -> str:
        if os.environ.get("NSML_SESSION_API_URL"):
            return os.environ["NSML_SESSION_API_URL"]
        host = self.ip if self.ip not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}{self.base_url}api/"

    session_stop_grace = Float(
        10.0,
        help="""Seconds a stopped session gets between SIGTERM and SIGKILL (the SDK saves a
        checkpoint with the bound save function in that time). Docker rounds up to whole
        seconds.""",
    ).tag(config=True)

    session_container_prefix = Unicode(
        help="""Session containers are named PREFIX-ID-ATTEMPT. Default:
        $NSML_CONTAINER_PREFIX-session, else nsml-session.""",
    ).tag(config=True)

    @default("session_container_prefix")
    def _default_session_container_prefix(self) -> str:
        return os.environ.get("NSML_CONTAINER_PREFIX", "nsml") + "-session"

    session_keep_containers = Bool(
        False, help="Leave ended session containers on the engine (for debugging)."
    ).tag(config=True)

    session_code_max_bytes = Integer(
        100 * 1024 * 1024,
        help="""Largest code snapshot, in bytes (uncompressed, and the upload itself). The
        client refuses larger folders before uploading; list big files in .nsmlignore.""",
    ).tag(config=True)

    session_code_max_files = Integer(10_000, help="Most files in one code snapshot.").tag(
        config=True
    )

    checkpoint_max_bytes = Integer(
        20 * 1024**3,
        help="""Largest checkpoint, in bytes: the uploaded tar archive, and the sum of its
        files' sizes (a compressed archive may not unpack past it either).""",
    ).tag(config=True)

    checkpoint_max_members = Integer(
        100_000,
        help="""Most files and folders in one checkpoint archive (default 100,000); a larger
        one is refused at upload with 413. Checkpoints hold regular files and folders only:
        links, devices and paths that leave the folder are refused whatever the limits.""",
    ).tag(config=True)

    @validate("session_stop_grace")
    def _grace_nonnegative(self, proposal: Any) -> float:
        v = float(proposal["value"])
        if v < 0:
            raise ValueError(f"session_stop_grace must be >= 0 seconds, not {v}")
        return v

    @validate(
        "session_code_max_bytes",
        "session_code_max_files",
        "checkpoint_max_bytes",
        "checkpoint_max_members",
    )
    def _limit_positive(self, proposal: Any) -> int:
        v = int(proposal["value"])
        if v <= 0:
            raise ValueError(f"{proposal['trait'].name} must be > 0, not {v}")
        return v

    smtp_host = Unicode(
        "",
        help="""SMTP server for failure mail ('' disables mail; failures are always in the
        event feed, GET api/events). Default: $NSML_SMTP_HOST.""",
    ).tag(config=True)

    @default("smtp_host")
    def _default_smtp_host(self) -> str:
        return os.environ.get("NSML_SMTP_HOST", "")

    smtp_port = Integer(25, help="SMTP port (25; 587 with starttls; 465 with tls).").tag(
        config=True
    )
    smtp_security = Unicode("none", help="SMTP transport security: none, starttls or tls.").tag(
        config=True
    )

    @validate("smtp_security")
    def _smtp_security(self, proposal: Any) -> str:
        v = str(proposal["value"])
        if v not in ("none", "starttls", "tls"):
            raise ValueError(f"smtp_security must be none, starttls or tls, not {v!r}")
        return v

    smtp_from = Unicode("nsml@localhost", help="From address of failure mail.").tag(config=True)
    smtp_to = Unicode(
        "{user}",
        help="Address of a user; {user} is replaced by the user name, e.g. '{user}@lab.org'.",
    ).tag(config=True)
    smtp_username = Unicode("", help="SMTP login name ('' for none).").tag(config=True)
    smtp_password = Unicode("", help="SMTP password.").tag(config=True)

    # ---- datasets ---------------------------------------------------------------------------

    dataset_store_dir = Unicode(
        help="""Folder of the dataset blob store (files by content hash, manifests, uploads in
        progress). Default: <state_dir>/datasets/store. Keep it on the same filesystem as
        dataset_cache_dir: the local node's cache then hard-links files instead of copying.""",
    ).tag(config=True)

    @default("dataset_store_dir")
    def _default_dataset_store_dir(self) -> str:
        return str(Path(self.state_dir) / "datasets" / "store")

    dataset_cache_dir = Unicode(
        help="""Folder of the local node's dataset cache (what containers mount read-only).
        Default: <state_dir>/datasets/cache. It must be a path the node's Docker engine sees
        (the same machine).""",
    ).tag(config=True)

    @default("dataset_cache_dir")
    def _default_dataset_cache_dir(self) -> str:
        return str(Path(self.state_dir) / "datasets" / "cache")

    dataset_cache_bytes = Integer(
        100 << 30,
        help="""Byte budget of the local node's dataset cache (logical sizes; default 100 GiB).
        Least recently used versions are evicted to make room; a version a session or notebook
        server uses is never evicted, so a new one that does not fit waits (or fails when it
        is larger than the whole budget). Hard links to the store share disk space, so the
        disk use can be far below the budget; copies across filesystems count in full.""",
    ).tag(config=True)

    dataset_max_file_bytes = Integer(
        100 << 30,
        help="""Largest file a dataset version may hold, in bytes (default 100 GiB). A push
        with a larger file is refused with its path.""",
    ).tag(config=True)

    dataset_max_files = Integer(
        1_000_000, help="Most files one dataset version may hold (default 1,000,000)."
    ).tag(config=True)

    dataset_durable = Bool(
        True,
        help="""Make every stored blob durable (fsync) before it counts as stored, and every
        version durable before it is visible. False is for tests and benchmarks: after a
        power loss a store written that way may hold truncated blobs.""",
    ).tag(config=True)

    dataset_local_transport = Bool(
        True,
        help="""Offer the local transport: clients on this machine (its command line, and
        containers on this node, which share the host's network namespace) push and pull by
        handing files over as open descriptors on a Unix socket in the abstract namespace,
        at the speed of a local copy, instead of sending the bytes through HTTP. Access is
        checked by the HTTP API, which issues the keys.""",
    ).tag(config=True)

    dataset_upload_grace = Float(
        24 * 3600.0,
        help="""Seconds an unfinished push is kept for a resume; after that the store's garbage
        collection removes it and the blobs only it brought (default one day).""",
    ).tag(config=True)

    dataset_gc_interval = Float(
        3600.0,
        help="""Seconds between garbage collections of the dataset store (default one hour):
        stale uploads, blobs no version needs, leftovers of killed pushes.""",
    ).tag(config=True)

    dataset_reconcile_interval = Float(
        5.0,
        help="""Seconds between checks that release the dataset holds of ended allocations in
        the node caches (default 5). Until then an ended session's dataset is still counted
        as in use by the cache's eviction.""",
    ).tag(config=True)

    @validate("dataset_cache_bytes", "dataset_max_file_bytes", "dataset_max_files")
    def _dataset_sizes(self, proposal: Any) -> int:
        v = int(proposal["value"])
        if v < 0 or (v == 0 and proposal["trait"].name != "dataset_cache_bytes"):
            raise ValueError(f"{proposal['trait'].name} must be a positive number, not {v}")
        return v

    @validate("dataset_upload_grace", "dataset_gc_interval", "dataset_reconcile_interval")
    def _dataset_intervals(self, proposal: Any) -> float:
        v = float(proposal["value"])
        if v <= 0:
            raise ValueError(f"{proposal['trait'].name} must be > 0 seconds, not {v}")
        return v

    def initialize(self, argv: list[str] | None = None) -> None:
        super().initialize(argv)
        if self.subapp is not None:
            return
        if self.config_file:
            self.load_config_file(self.config_file)
        self.log.setLevel(self.log_level)
        for name in ("nsml_server", "nsml_agent", "nsml_datasets"):
            logging.getLogger(name).parent = self.log

    # ---- start-up -------------------------------------------------------------------------

    def init_db(self) -> None:
        self.ensure_state_dir()
        self.db = Database(self.db_url)
        try:
            self.schema_revision = check_schema(
                self.db.engine, self.db_url, auto_upgrade=self.upgrade_db
            )
        except SchemaError as e:
            self.log.critical("%s", e)
            sys.exit(1)
        self.log.info("database %s at revision %s", redact_url(self.db_url), self.schema_revision)

    async def init_backend(self) -> None:
        from .backends import select_backend

        self.backend = await select_backend(
            self.docker_url, Path(self.state_dir) / "local-runs", self.log
        )
        self.backend_info = self.backend.describe()
        self.log.info("execution backend: %s", self.backend_info)

    def init_hub_auth(self) -> Any:
        from jupyterhub.services.auth import HubAuth

        return HubAuth(parent=self, cache_max_age=60)

    def init_scheduler(self) -> None:
        from gpu_scheduler.policy import PlacementPolicy
        from gpu_scheduler.queue import UserLimits

        from .lease import LeaderLease
        from .scheduler import Scheduler

        if self.lease_renew_interval * 2 > self.lease_ttl:
            self.log.warning(
                "lease_renew_interval=%s is more than half of lease_ttl=%s: the lease may lapse "
                "between renewals",
                self.lease_renew_interval,
                self.lease_ttl,
            )
        self.lease = LeaderLease(self.db, self.server_id, ttl_s=self.lease_ttl, now=utcnow)
        self.scheduler = Scheduler(
            self.db,
            self.lease,
            PlacementPolicy(parent=self),
            now=utcnow,
            default_limits=UserLimits(self.max_gpus_per_user, self.max_jobs_per_user),
            backfill=self.backfill,
            renew_interval_s=self.lease_renew_interval,
        )

    def init_datasets(self) -> None:
        from nsml_datasets import BlobStore, NodeCache

        from .datasets import DatasetService

        store = BlobStore(
            Path(self.dataset_store_dir).expanduser(),
            max_blob_bytes=self.dataset_max_file_bytes,
            durable=self.dataset_durable,
        )
        cache = None
        if self.local_node:
            cache = NodeCache(
                Path(self.dataset_cache_dir).expanduser(),
                self.dataset_cache_bytes,
                store=store,
            )
        local = None
        if self.dataset_local_transport:
            from nsml_datasets.local import Grants, LocalServer

            local = LocalServer(store, Grants()).start()
        self.datasets = DatasetService(
            self.db,
            store,
            cache,
            local=local,
            node_name=self.node_name,
            now=utcnow,
            max_file_bytes=self.dataset_max_file_bytes,
            max_files=self.dataset_max_files,
        )
        self.log.info(
            "dataset store at %s%s",
            store.root,
            f"; local cache at {cache.root} ({self.dataset_cache_bytes} bytes)" if cache else "",
        )

    def make_app(self) -> web.Application:
        self.ctx = ServerContext(
            db=self.db,
            hub_auth=self.init_hub_auth(),
            version=__version__,
            schema_revision=self.schema_revision,
            now=utcnow,
            backend=self.backend_info,
            default_credits_milli=round(self.default_credits * 1000),
            scheduler=self.scheduler,
            submit_queue=SubmitQueue(self.scheduler, placement_out),
            heartbeats=HeartbeatQueue(self.db, utcnow, gpu_use=self.gpu_use),
            trusted_services=frozenset(self.trusted_services),
            is_leader=lambda: self.lease.is_leader,
            datasets=self.datasets,
            allowed_images=tuple(self.allowed_images),
            gpu_use=self.gpu_use,
            deployment=self.runner.settings.server_label,
        )
        api = self.base_url + "api/"
        document = openapi_document(__version__, self.base_url, self.allowed_images)
        k = {"ctx": self.ctx}
        routes = api_routes(self.ctx, document) + self.session_routes() + self.leaderboard_routes()
        routes += credit_routes(self.ctx)
        routes += self.event_routes()
        handlers: list[Any] = [(self.base_url, IndexHandler, {"base_url": self.base_url})]
        handlers += [route.spec(api, document) for route in routes]
        handlers.append((api + ".*", NotFoundHandler, k))
        admin_handlers, admin_settings = self.admin_routes()
        handlers += admin_handlers
        return web.Application(
            handlers,
            default_handler_class=NotFoundHandler,
            default_handler_args=k,
            **admin_settings,
        )

    def admin_routes(self) -> tuple[list[Any], dict[str, Any]]:
        """The admin panel's pages (``admin/``) and the tornado settings they need."""
        from .admin import AdminPanel

        panel = AdminPanel(parent=self)
        return (
            panel.handlers(self.db, self.base_url, utcnow, self.runner.wake),
            panel.tornado_settings(self.ensure_state_dir()),
        )

    # ---- background loops -----------------------------------------------------------------

    async def local_heartbeat(self) -> None:
        """Collect this machine's inventory (in a thread) and record it."""
        from gpu_scheduler.agent import collect_heartbeat, docker_images

        info = self.backend_info

        def collect() -> dict[str, Any]:
            client = getattr(self.backend, "client", None)
            return collect_heartbeat(
                self.probe,
                backend=str(info.get("kind", "local")),
                docker_url=info.get("endpoint"),
                images=docker_images(client),
                datasets=self.datasets.cache.present() if self.datasets.cache else None,
            )

        body = await asyncio.get_running_loop().run_in_executor(None, collect)
        hb = Heartbeat.model_validate(body)
        with self.db.session() as s:
            nodes.apply_heartbeat(s, self.node_name, hb, utcnow(), self.gpu_use)

    async def loop(self, period: float, fn: Any, what: str, first_after: float = 0) -> None:
        await asyncio.sleep(first_after)
        while True:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("%s failed; retrying in %.0fs", what, period)
            await asyncio.sleep(period)

    async def reconcile_datasets(self) -> None:
        await self.datasets.run(self.datasets.reconcile)

    async def gc_datasets(self) -> None:
        report = await self.datasets.run(self.datasets.gc, self.dataset_upload_grace)
        self.log.info("dataset store gc: %s", report.model_dump())

    async def check_nodes(self) -> None:
        from .node_loss import release_lost_allocations

        with self.db.session() as s:
            nodes.mark_silent_nodes_down(s, utcnow(), timedelta(seconds=self.node_timeout))
        if self.lease.is_leader:  # sessions on gone nodes are the runner's; servers here
            with self.db.session() as s:
                release_lost_allocations(
                    s, self.scheduler, utcnow(), self.node_timeout, self.node_lost_grace
                )

    def init_gpu_use(self) -> None:
        """Sessions' GPU use over time, sampled on every node heartbeat (see gpu_use.py)."""
        from .gpu_use import GpuUseMonitor

        self.gpu_use = GpuUseMonitor(parent=self)
        if "interval_s" not in self.config.get("GpuUseMonitor", {}):
            self.gpu_use.interval_s = self.heartbeat_interval

    def init_billing(self) -> None:
        """Credits charged for running work while this server leads (see billing.py)."""
        from .billing import CreditBilling, hub_server_stopper

        hub = self.ctx.hub_auth
        self.billing = CreditBilling(
            parent=self,
            db=self.db,
            is_leader=lambda: self.lease.is_leader,
            now=utcnow,
            stop_server=hub_server_stopper(hub.api_url, hub.api_token) if hub.api_token else None,
            smtp=self.notifier.settings,
            wake_runner=self.runner.wake,
        )

    def init_sessions(self) -> None:
        from .artifacts import ArtifactStore
        from .notify import Notifier, SMTPSettings
        from .session_runner import BackendPool, RunnerSettings, SessionRunner, server_label_for

        state = Path(self.state_dir)
        self.artifacts = ArtifactStore(state / "artifacts")
        self.notifier = Notifier(
            SMTPSettings(
                host=self.smtp_host,
                port=self.smtp_port,
                sender=self.smtp_from,
                to_template=self.smtp_to,
                security=self.smtp_security,
                username=self.smtp_username,
                password=self.smtp_password,
                base_url=os.environ.get("JUPYTERHUB_PUBLIC_HUB_URL", ""),
            )
        )
        self.runner = SessionRunner(
            self.db,
            self.scheduler,
            lambda: self.lease.is_leader,
            BackendPool(self.db, self.node_name if self.local_node else None, self.backend),
            self.artifacts,
            state / "sessions",
            RunnerSettings(
                api_url=self.session_api_url,
                stop_grace_s=self.session_stop_grace,
                container_prefix=self.session_container_prefix,
                server_label=server_label_for(self.db_url),
                keep_containers=self.session_keep_containers,
                node_timeout_s=self.node_timeout,
                node_lost_grace_s=self.node_lost_grace,
                lost_max_attempts=self.lost_max_attempts,
            ),
            utcnow,
            self.notifier,
            datasets=self.datasets,
        )
        self.log.info(
            "sessions: image %s, API for containers %s", self.session_image, self.session_api_url
        )
        self.init_evaluations()

    def init_evaluations(self) -> None:
        from .evaluations import EvaluationRunner, EvaluationSettings
        from .session_runner import server_label_for

        self.evaluations = EvaluationRunner(
            self.db,
            self.scheduler,
            lambda: self.lease.is_leader,
            self.runner.backends,
            self.artifacts,
            self.datasets.store if self.datasets is not None else None,
            Path(self.state_dir) / "evaluations",
            EvaluationSettings(
                container_prefix=self.session_container_prefix,
                server_label=server_label_for(self.db_url),
                keep_containers=self.session_keep_containers,
                scorer_image=self.session_image,
            ),
            utcnow,
        )

    def leaderboard_routes(self) -> list[Route]:
        from .api.leaderboards import LeaderboardService, leaderboard_routes

        service = LeaderboardService(
            runner=self.evaluations,
            dataset_store=self.datasets.store if self.datasets is not None else None,
        )
        return leaderboard_routes(self.ctx, service)

    def event_routes(self) -> list[Route]:
        from .api.events_stream import event_routes
        from .events import EventBroker

        self.events = EventBroker(self.db, utcnow)
        return event_routes(self.ctx, self.events)

    def session_routes(self) -> list[Route]:
        from .api.sessions import SessionService, session_routes

        service = SessionService(
            runner=self.runner,
            store=self.artifacts,
            default_image=self.session_image,
            code_max_bytes=self.session_code_max_bytes,
            code_max_files=self.session_code_max_files,
            checkpoint_max_bytes=self.checkpoint_max_bytes,
            checkpoint_max_members=self.checkpoint_max_members,
        )
        return session_routes(self.ctx, service)

    async def serve(self) -> None:
        self.init_db()
        await self.init_backend()
        self.init_scheduler()
        self.init_datasets()
        self.init_sessions()
        self.init_gpu_use()
        app = self.make_app()
        # Large reads of streamed dataset uploads (1 MiB instead of 64 KiB).
        self.http = HTTPServer(app, xheaders=True, chunk_size=1 << 20)
        self.http.listen(self.port, self.ip)
        self.log.info(
            "NSML server %s listening on http://%s:%d%sapi/",
            __version__,
            self.ip,
            self.port,
            self.base_url,
        )
        tasks = []
        if self.local_node:
            from gpu_scheduler.probe import probe_from_env

            self.probe = probe_from_env(os.environ, node_name=self.node_name)
            st = self.probe.status()
            if st.enabled:
                self.log.info("GPU probe %s: %d GPUs", st.kind, len(self.probe.gpus()))
            else:
                self.log.warning("GPU probe disabled: %s", st.reason)
            tasks.append(
                asyncio.create_task(
                    self.loop(self.heartbeat_interval, self.local_heartbeat, "local heartbeat")
                )
            )
        tasks.append(
            asyncio.create_task(self.loop(self.heartbeat_interval, self.check_nodes, "node check"))
        )
        tasks.append(
            asyncio.create_task(
                self.loop(self.dataset_reconcile_interval, self.reconcile_datasets, "dataset holds")
            )
        )
        tasks.append(
            asyncio.create_task(
                self.loop(
                    self.dataset_gc_interval,
                    self.gc_datasets,
                    "dataset gc",
                    first_after=self.dataset_gc_interval,
                )
            )
        )
        stop = asyncio.Event()
        scheduler_task = asyncio.create_task(self.scheduler.run(stop))
        runner_task = asyncio.create_task(self.runner.run(stop))
        evaluations_task = asyncio.create_task(self.evaluations.run(stop))
        self.init_billing()
        billing_task = asyncio.create_task(self.billing.run(stop))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        self.log.info("shutting down")
        self.http.stop()
        self.scheduler.wake()
        self.runner.wake()
        await runner_task  # session containers keep running; the next leader follows them
        self.evaluations.wake()
        await evaluations_task
        await billing_task
        await scheduler_task  # resigns the lease so that a standby takes over at once
        self.ctx.submit_queue.close()
        self.ctx.heartbeats.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.local_node:
            self.probe.close()
        await self.runner.backends.close()
        self.datasets.close()
        self.db.dispose()

    def start(self) -> None:
        if self.subapp is not None:
            self.subapp.start()
            return
        asyncio.run(self.serve())


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``nsml-server``."""
    app = NSMLServer.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":  # pragma: no cover
    main()

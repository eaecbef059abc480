"""JupyterHub configuration: the embedded default of jupyter-nsml.

One machine: the hub on http://127.0.0.1:8000, the NSML server as the managed service `nsml`
(SQLite), notebook servers in containers of the local Docker engine. Every setting can be
changed with an environment variable (listed below), or by config files loaded after this one
(NSML_EXTRA_CONFIG=a.py:b.py), or by a config file that loads this one first with
`load_subconfig` (as hub_config/production.py does, the example for a real deployment).

Environment:
  NSML_STATE_DIR         where the hub and the NSML server keep state (default ./runtime)
  NSML_HUB_BIND_URL      public URL the proxy binds (default http://127.0.0.1:8000)
  NSML_HUB_API_PORT      the hub's internal API port (default 8081)
  NSML_PROXY_API_PORT    the proxy's REST API port (default 8001)
  NSML_SERVICE_PORT      the NSML server's port (default 8090)
  NSML_USER_PASSWORD     shared password for users (default: generated, kept in
                         STATE/credentials.json)
  NSML_ADMIN_PASSWORD    password of the admin users (default: generated, same file)
  NSML_ADMIN_USERS       comma-separated admin user names (default admin)
  NSML_NOTEBOOK_IMAGE    notebook image (default jupyter-nsml/singleuser:latest)
  NSML_ALLOWED_IMAGES    images users may run, comma-separated names or patterns
                         ("jupyter-nsml/*"); default: the notebook image (and
                         NSML_SESSION_IMAGE). The spawner and the NSML server share it.
  NSML_CONTAINER_PREFIX  notebook containers are named PREFIX-USER (default nsml-nb)
  NSML_HOME_VOLUME       each user's persistent home: a Docker volume name template
                         (default PREFIX-home-{username}) or an absolute path that every
                         node mounts ("/mnt/nfs/homes/{username}"); empty: no home
  NSML_VIRTUAL_GPUS_IF_NONE
                         virtual GPUs to start with when no GPU is found and
                         NSML_VIRTUAL_GPUS is unset (default 4; 0: none)
  NSML_PROXY_COMMAND     configurable-http-proxy executable (default: ./.cache/proxy, then PATH)
  NSML_EXTRA_CONFIG      config files (':'-separated) loaded at the end of this one
  NSML_SERVER_ARGS       extra command-line arguments of the NSML server, split like a shell
                         line (e.g. "--NSMLServer.node_timeout=20")
  NSML_*                 any other NSML_ variable reaches the NSML server (e.g. NSML_VIRTUAL_GPUS=4)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import shutil
import sys
from pathlib import Path

from gpu_scheduler.probe import NVMLProbe, embedded_virtual_gpus
from nsml_server.images import allowed_images_from_env

c = get_config()  # type: ignore[name-defined]  # noqa: F821

REPO = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("NSML_STATE_DIR", Path.cwd() / "runtime")).resolve()
STATE.mkdir(parents=True, exist_ok=True, mode=0o700)
SERVICE_PORT = int(os.environ.get("NSML_SERVICE_PORT", "8090"))
SERVICE_URL = f"http://127.0.0.1:{SERVICE_PORT}"

# ---- hub, proxy, state --------------------------------------------------------------------
c.JupyterHub.bind_url = os.environ.get("NSML_HUB_BIND_URL", "http://127.0.0.1:8000")
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{os.environ.get('NSML_HUB_API_PORT', '8081')}"
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(STATE / "jupyterhub.pid")
c.ConfigurableHTTPProxy.pid_file = str(STATE / "jupyterhub-proxy.pid")
c.ConfigurableHTTPProxy.api_url = (
    f"http://127.0.0.1:{os.environ.get('NSML_PROXY_API_PORT', '8001')}"
)
# Notebook servers keep running when the hub restarts; the hub finds them again on start.
c.JupyterHub.cleanup_servers = False


def _proxy_command() -> list[str]:
    explicit = os.environ.get("NSML_PROXY_COMMAND")
    if explicit:
        return [explicit]
    local = REPO / ".cache" / "proxy" / "node_modules" / ".bin" / "configurable-http-proxy"
    if local.exists():
        return [str(local)]
    return [shutil.which("configurable-http-proxy") or "configurable-http-proxy"]


c.ConfigurableHTTPProxy.command = _proxy_command()


# ---- authentication: one shared password for a small lab, a stronger one for admins ---------
def _credentials() -> dict[str, str]:
    path = STATE / "credentials.json"
    stored: dict[str, str] = {}
    if path.exists():
        stored = json.loads(path.read_text())
    creds = {
        "user_password": os.environ.get("NSML_USER_PASSWORD")
        or stored.get("user_password")
        or secrets.token_urlsafe(12),
        "admin_password": os.environ.get("NSML_ADMIN_PASSWORD")
        or stored.get("admin_password")
        or secrets.token_urlsafe(32),
        # The hub's spawner calls the NSML API with this token (service `nsml-spawner`).
        "spawner_token": stored.get("spawner_token") or secrets.token_hex(32),
    }
    if creds != stored:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f)
    return creds


CREDS = _credentials()
ADMINS = {u.strip() for u in os.environ.get("NSML_ADMIN_USERS", "admin").split(",") if u.strip()}
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = CREDS["user_password"]
c.SharedPasswordAuthenticator.admin_password = CREDS["admin_password"]
c.Authenticator.admin_users = ADMINS
c.Authenticator.allow_all = True
print(
    "jupyter-nsml: log in at {url} with any user name and the password {pw!r}; admins ({admins}) "
    "use the admin password kept in {path}".format(
        url=c.JupyterHub.bind_url,
        pw=CREDS["user_password"],
        admins=", ".join(sorted(ADMINS)),
        path=STATE / "credentials.json",
    ),
    file=sys.stderr,
)

# ---- notebook servers ---------------------------------------------------------------------
c.JupyterHub.spawner_class = "nsml"
# Containers are named PREFIX-USERNAME (DockerSpawner's name_template).
c.DockerSpawner.prefix = os.environ.get("NSML_CONTAINER_PREFIX", "nsml-nb")
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 60
# Each user's files live in a home that outlives the server: a Docker volume on the node
# (PREFIX-home-USER) by default; see NSMLSpawner.home_volume.
if "NSML_HOME_VOLUME" in os.environ:
    c.NSMLSpawner.home_volume = os.environ["NSML_HOME_VOLUME"]
# Offer shares of a GPU (0.25, 0.5) in the spawn form: the scheduler packs them.
c.NSMLSpawner.allow_gpu_sharing = True
# The images users may run: the same list for the spawn form and for the NSML server
# (sessions, placements), which refuses others with a 400 that lists these.
ALLOWED_IMAGES = allowed_images_from_env(os.environ)
c.NSMLSpawner.allowed_images = ALLOWED_IMAGES


# ---- GPUs: on a machine without one, a few virtual GPUs so that the platform can be tried ----
def _virtual_gpus() -> str | None:
    quiet = logging.getLogger("jupyter_nsml.config.nvml")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    env = {"NSML_VIRTUAL_GPUS_IF_NONE": "4", **os.environ}
    try:
        count, line = embedded_virtual_gpus(env, lambda: NVMLProbe(logger=quiet).status())
    except ValueError as e:
        sys.exit(f"jupyter-nsml: {e}")
    if line:
        print(line, file=sys.stderr)
    return count


VIRTUAL_GPUS = _virtual_gpus()

# ---- the NSML server, a managed service -----------------------------------------------------
# A managed service does not inherit the hub's environment: forward every NSML_ variable.
_forwarded = {k: v for k, v in os.environ.items() if k.startswith("NSML_")}
_forwarded.setdefault("NSML_STATE_DIR", str(STATE))
_forwarded["NSML_ALLOWED_IMAGES"] = ",".join(ALLOWED_IMAGES)
if VIRTUAL_GPUS is not None:
    _forwarded["NSML_VIRTUAL_GPUS"] = VIRTUAL_GPUS
for _k in ("DOCKER_HOST", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY", "PATH", "HOME"):
    if _k in os.environ:
        _forwarded[_k] = os.environ[_k]
os.environ.setdefault("NSML_API_URL_FOR_SERVERS", f"{SERVICE_URL}/services/nsml/api/")

# NSMLSpawner runs inside the hub and asks the NSML server for placements with this token.
os.environ["NSML_SPAWNER_TOKEN"] = CREDS["spawner_token"]

c.JupyterHub.services = [
    {"name": "nsml-spawner", "api_token": CREDS["spawner_token"]},
    {
        "name": "nsml",
        "url": SERVICE_URL,
        "command": [
            sys.executable,
            "-m",
            "nsml_server.app",
            *shlex.split(os.environ.get("NSML_SERVER_ARGS", "")),
        ],
        "environment": _forwarded,
        "display": True,
        "oauth_no_confirm": True,
    },
]

c.JupyterHub.load_roles = [
    # The hub's spawner may only call the NSML API (which trusts it to place for users).
    {
        "name": "nsml-spawner",
        "scopes": ["access:services!service=nsml"],
        "services": ["nsml-spawner"],
    },
    # The NSML server reads who users are and which groups (teams) they belong to, adds and
    # removes a team's members when an admin or that team's team admin asks (``groups``: the
    # members of existing groups; not creating or deleting groups), and stops the GPU
    # notebook servers of users whose credits ran out; the admin panel (a page of the
    # service) also lists and stops users' notebook servers. Nothing else.
    {
        "name": "nsml-service",
        "scopes": ["read:users", "read:groups", "groups", "read:servers", "delete:servers"],
        "services": ["nsml"],
    },
    # Users' tokens may call the NSML API (JupyterHub gives new tokens no service access).
    {"name": "user", "scopes": ["self", "access:services!service=nsml"]},
    # A notebook server's own token may call the NSML API on its user's behalf.
    {
        "name": "server",
        "scopes": ["users:activity!user", "access:servers!server", "access:services!service=nsml"],
    },
]

# ---- the hub's pages: a link to the NSML admin panel in the navigation bar, for admins ----------
c.JupyterHub.template_paths = [str(REPO / "hub_config" / "templates")]

# ---- site overrides -----------------------------------------------------------------------
for _extra in filter(None, os.environ.get("NSML_EXTRA_CONFIG", "").split(":")):
    load_subconfig(_extra)  # type: ignore[name-defined]  # noqa: F821

"""JupyterHub configuration for a production jupyter-nsml cluster (an example to adapt).

It loads the embedded default first and changes what a cluster needs:

    jupyterhub -f hub_config/production.py

What changes from the embedded default:
- PostgreSQL for both the hub and the NSML server (one server, two databases);
- TLS on the public port, behind a real domain;
- a real authenticator (OAuth/OIDC via the `oauthenticator` package; LDAP works the same way);
- compute nodes: every GPU server runs a Docker engine reachable over TCP+TLS and an
  `nsml-agent` (see docs/operators-guide.md); the NSML server does not register the hub
  machine itself as a node;
- users' homes on a shared filesystem (NFS) that every node mounts, so that a user's files
  follow their server to any node;
- GPUs are only the real ones the nodes' agents report: no virtual GPUs are ever invented;
- whole GPUs only in the spawn form (turn shares on where users accept sharing a GPU);
- an idle culler for notebook servers.
Secrets come from the environment, never from this file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

c = get_config()  # type: ignore[name-defined]  # noqa: F821
# A cluster never invents GPUs: no virtual GPUs when the hub machine has none.
os.environ["NSML_VIRTUAL_GPUS_IF_NONE"] = "0"
load_subconfig(str(Path(__file__).with_name("jupyterhub_config.py")))  # type: ignore[name-defined]  # noqa: F821

DOMAIN = os.environ.get("NSML_DOMAIN", "nsml.example.org")

# ---- public endpoint: TLS ---------------------------------------------------------------------
c.JupyterHub.bind_url = f"https://{DOMAIN}:443"
c.JupyterHub.ssl_cert = os.environ.get(
    "NSML_TLS_CERT", f"/etc/letsencrypt/live/{DOMAIN}/fullchain.pem"
)
c.JupyterHub.ssl_key = os.environ.get("NSML_TLS_KEY", f"/etc/letsencrypt/live/{DOMAIN}/privkey.pem")

# ---- databases --------------------------------------------------------------------------------
# Hub: postgresql://jupyterhub:PASSWORD@db.internal/jupyterhub (JUPYTERHUB_DB_URL)
c.JupyterHub.db_url = os.environ["JUPYTERHUB_DB_URL"]
# NSML server: forwarded to the managed service below as NSML_DB_URL, e.g.
# postgresql+psycopg://nsml:PASSWORD@db.internal/nsml. Upgrade it with
# `nsml-server upgrade-db --db-url ...` after installing a new version (back it up first).
assert os.environ.get("NSML_DB_URL"), "set NSML_DB_URL to the NSML PostgreSQL database"

# ---- authentication: your identity provider ----------------------------------------------------
c.JupyterHub.authenticator_class = "generic-oauth"  # pip install oauthenticator
c.GenericOAuthenticator.client_id = os.environ.get("OAUTH_CLIENT_ID", "")
c.GenericOAuthenticator.client_secret = os.environ.get("OAUTH_CLIENT_SECRET", "")
c.GenericOAuthenticator.oauth_callback_url = f"https://{DOMAIN}/hub/oauth_callback"
c.GenericOAuthenticator.authorize_url = os.environ.get("OAUTH_AUTHORIZE_URL", "")
c.GenericOAuthenticator.token_url = os.environ.get("OAUTH_TOKEN_URL", "")
c.GenericOAuthenticator.userdata_url = os.environ.get("OAUTH_USERDATA_URL", "")
c.GenericOAuthenticator.username_claim = "preferred_username"
c.GenericOAuthenticator.allowed_groups = {"ml-lab"}
c.GenericOAuthenticator.admin_groups = {"ml-lab-admins"}
c.GenericOAuthenticator.manage_groups = True  # hub groups become NSML teams

# ---- nodes: no local node; remote engines over TCP+TLS ------------------------------------------
# Each node runs `nsml-agent --api-url https://DOMAIN/services/nsml/api --name NODE
# --docker-url tcp://NODE:2376` and its engine listens with --tlsverify. The NSML server (and
# the hub, for notebook servers: set DOCKER_CERT_PATH in its environment too) connects with the
# client certificate in DOCKER_CERT_PATH, as `scripts/docker-engine.sh certs --tls-dir
# /etc/nsml/docker-tls` makes it (docs/operators-guide.md, "Adding a node").
for svc in c.JupyterHub.services:
    if svc["name"] == "nsml":
        svc["command"] = [sys.executable, "-m", "nsml_server.app", "--no-local-node"]
        svc["environment"].update(
            {
                "NSML_DB_URL": os.environ["NSML_DB_URL"],
                "DOCKER_CERT_PATH": os.environ.get(
                    "DOCKER_CERT_PATH", "/etc/nsml/docker-tls/client"
                ),
                "DOCKER_TLS_VERIFY": "1",
            }
        )

# ---- notebook servers: homes on NFS, whole GPUs ------------------------------------------------
# Every node (and no container engine in between) mounts the same NFS export at the same path,
# e.g. in /etc/fstab: `nfs.internal:/export/homes /mnt/nfs/homes nfs4 rw,hard,noatime 0 0`.
# Each user's home is a folder there; on first use the spawner creates it (as root, in a short
# container on the node), gives it the image's home files and uid 1000 as owner. With
# root_squash on the export, create the folders beforehand on the file server:
# `install -d -o 1000 -g 100 /export/homes/NAME`. Homes are never removed by the hub; back up
# and remove them on the file server.
SHARED_HOMES = os.environ.get("NSML_SHARED_HOMES", "/mnt/nfs/homes").rstrip("/")
c.NSMLSpawner.home_volume = f"{SHARED_HOMES}/{{username}}"
# A share of a GPU gives no memory isolation; offer shares only where users accept that.
c.NSMLSpawner.allow_gpu_sharing = False

# ---- notebook servers: cull idle ones ----------------------------------------------------------
c.JupyterHub.services.append(
    {
        "name": "idle-culler",
        "command": [sys.executable, "-m", "jupyterhub_idle_culler", "--timeout=3600"],
    }
)
c.JupyterHub.load_roles.append(
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    }
)

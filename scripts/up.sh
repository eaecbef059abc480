#!/usr/bin/env bash
# Install and run the platform, embedded default: JupyterHub on http://127.0.0.1:8000 with the
# NSML server (SQLite) as its `nsml` service, the local machine as the only node, notebook
# servers in containers of the local Docker engine (started here if none answers).
# Extra arguments go to jupyterhub. State (databases, generated passwords) lives in
# ${NSML_STATE_DIR:-./runtime}.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
eval "export $(scripts/docker-engine.sh ensure)"
bash hub_config/images/build.sh
export NSML_STATE_DIR=${NSML_STATE_DIR:-$PWD/runtime}
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p "$NSML_STATE_DIR"
cd "$NSML_STATE_DIR"
exec jupyterhub -f "$OLDPWD/hub_config/jupyterhub_config.py" "$@"

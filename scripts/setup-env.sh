#!/usr/bin/env bash
# Install what jupyter-nsml needs on this machine (idempotent; no standard input; as root):
#   - Debian packages: docker.io (the Docker engine), mmdebstrap (offline image builds),
#     Node.js + npm (configurable-http-proxy), and with --test: postgresql, busybox-static,
#     openssl (TLS certificates for the cluster test bed), chromium (the browser tests
#     drive Debian's own browser with Playwright; no browser is ever downloaded by the
#     test tools);
#   - a Python virtual environment in .venv with the project installed (editable);
#   - the JupyterLab sidebar: labextension/'s node packages installed and its JavaScript built
#     (jlpm; the packages also serve its lint and jest tests) and its Python
#     package jupyter-nsml-lab installed (editable) into .venv;
#   - configurable-http-proxy (npm) in .cache/proxy.
# Usage: scripts/setup-env.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

TEST=0
[ "${1:-}" = "--test" ] && TEST=1
log() { printf 'setup-env: %s\n' "$*" >&2; }

# ---- Debian packages ----------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v npm >/dev/null || need+=(nodejs npm)
if [ "$TEST" = 1 ]; then
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
    [ -x /bin/busybox ] || need+=(busybox-static)
    # the cluster test bed makes TLS certificates for its Docker engines
    command -v openssl >/dev/null || need+=(openssl)
    command -v chromium >/dev/null || need+=(chromium)
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        log "missing Debian packages: ${need[*]}; run as root or install them first"
        exit 1
    fi
    log "installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# ---- Python environment ---------------------------------------------------------------------
PY=${PYTHON:-python3}
if ! "$PY" -m uv --version >/dev/null 2>&1; then
    log "installing uv"
    "$PY" -m pip install -q uv
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m uv venv -q --seed .venv
fi
extra=""
[ "$TEST" = 1 ] && extra="[test]"
log "installing jupyter-nsml$extra into .venv"
"$PY" -m uv pip install -q --python .venv/bin/python -e ".$extra"

# ---- the JupyterLab sidebar (labextension/) ---------------------------------------------------
# Its JavaScript is built here (from the npm registry's packages) when its sources are newer
# than the build; the notebook image takes the build as it is (hub_config/images/build.py).
lab=labextension
built=$lab/jupyter_nsml_lab/labextension/package.json
if [ -f $lab/package.json ]; then
    if [ ! -f "$built" ] || [ ! -d $lab/node_modules ] \
        || [ -n "$(find $lab/package.json $lab/yarn.lock $lab/tsconfig.json \
            $lab/src $lab/style $lab/schema -newer "$built" 2>/dev/null | head -1)" ]; then
        log "building the JupyterLab extension in $lab (jlpm install, jlpm build:prod)"
        (cd $lab && PATH="$PWD/../.venv/bin:$PATH" jlpm install >/dev/null \
            && PATH="$PWD/../.venv/bin:$PATH" jlpm build:prod >/dev/null)
    fi
fi
log "installing jupyter-nsml-lab ($lab) into .venv"
"$PY" -m uv pip install -q --python .venv/bin/python -e "./$lab"

# ---- configurable-http-proxy ------------------------------------------------------------------
if [ ! -x .cache/proxy/node_modules/.bin/configurable-http-proxy ]; then
    log "installing configurable-http-proxy into .cache/proxy"
    mkdir -p .cache/proxy
    [ -f .cache/proxy/package.json ] || echo '{"private": true}' >.cache/proxy/package.json
    (cd .cache/proxy && npm install --no-audit --no-fund --silent configurable-http-proxy@5 \
        >/dev/null)
fi

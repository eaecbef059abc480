#!/usr/bin/env bash
# Install what jupyter-nsml needs on this machine (idempotent; no standard input; as root):
#   - Debian packages: docker.io (the Docker engine), mmdebstrap (offline image builds),
#     Node.js + npm (configurable-http-proxy), and with --test: postgresql, busybox-static,
#     openssl (TLS certificates for the cluster test bed), chromium (the browser tests
#     drive Debian's own browser with Playwright; no browser is ever downloaded by the
#     test tools);
#   - a Python virtual environment in .venv with the project installed (editable);
#   - configurable-http-proxy (npm) in .cache/proxy;
#   - with --test: the JupyterLab extension's node packages (labextension/node_modules, from
#     its yarn.lock with JupyterLab's jlpm), for its lint and unit tests.
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

# ---- configurable-http-proxy ------------------------------------------------------------------
if [ ! -x .cache/proxy/node_modules/.bin/configurable-http-proxy ]; then
    log "installing configurable-http-proxy into .cache/proxy"
    mkdir -p .cache/proxy
    [ -f .cache/proxy/package.json ] || echo '{"private": true}' >.cache/proxy/package.json
    (cd .cache/proxy && npm install --no-audit --no-fund --silent configurable-http-proxy@5 \
        >/dev/null)
fi

# ---- the JupyterLab extension's node packages (its lint and jest tests) -------------------------
if [ "$TEST" = 1 ] && [ -f labextension/package.json ]; then
    stamp=labextension/node_modules/.nsml-yarn.lock
    if ! cmp -s labextension/yarn.lock "$stamp" 2>/dev/null; then
        log "installing the labextension's node packages (jlpm install --immutable)"
        (cd labextension && ../.venv/bin/jlpm install --immutable >/dev/null)
        cp labextension/yarn.lock "$stamp"
    fi
fi

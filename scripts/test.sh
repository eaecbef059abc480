#!/usr/bin/env bash
# Install what the tests need and run them all: ruff, mypy, the JupyterLab extension's lint and
# jest tests, then pytest (unit tests, a real
# jupyterhub, a real Docker engine, a private PostgreSQL). In CI (CI=true) a missing service
# fails its tests instead of skipping them; only `gpu` tests may skip (no GPU here).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scripts/setup-env.sh --test

# A Docker engine for the tests; stopped at the end only if this run started it.
started_engine=0
if ! scripts/docker-engine.sh status >/dev/null 2>&1; then
    started_engine=1
fi
eval "export $(scripts/docker-engine.sh ensure)"
cleanup() {
    if [ "$started_engine" = 1 ]; then scripts/docker-engine.sh stop || true; fi
}
trap cleanup EXIT

echo "== image" >&2
bash hub_config/images/build.sh

echo "== ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy" >&2
.venv/bin/mypy

echo "== labextension (tsc, prettier, jest)" >&2
(cd labextension && ../.venv/bin/jlpm lint && ../.venv/bin/jlpm test --ci)

echo "== pytest" >&2
if [ "${CI:-}" = "true" ]; then
    export NSML_TEST_REQUIRE=${NSML_TEST_REQUIRE:-docker,hub,db,browser,cluster}
fi
set +e
.venv/bin/pytest --durations=30 "$@"  # the slowest tests: where the run's time goes
rc=$?
set -e
echo "test.sh: browser screenshots in ${NSML_SCREENSHOTS:-$PWD/.cache/screenshots}" >&2
echo "test.sh: finished in $(($(date +%s) - start))s (pytest exit $rc)" >&2
exit $rc

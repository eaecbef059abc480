#!/usr/bin/env bash
# Build the single-user notebook image offline and load it into the engine at DOCKER_HOST.
# A thin entry point: the work is done by build.py (standard library only), run with the
# project's virtual environment when there is one. See --help.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${NSML_BUILD_PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then
        python=$repo/.venv/bin/python
    else
        python=python3
    fi
fi
exec "$python" "$here/build.py" "$@" </dev/null

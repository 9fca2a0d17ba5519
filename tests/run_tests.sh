#!/usr/bin/env bash
# The test command: install the system packages the tests need (Chromium for the playground
# test), set up (or refresh) the virtual environment from the project's files, then run the
# whole suite. Extra arguments go to pytest (e.g. tests/test_e2e.py -x).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/tests/setup_system_packages.sh"
"$ROOT/launch/setup_env.sh"
VENV=${GLM_SERVE_VENV:-$ROOT/.venv}
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "${@:-tests}"

#!/usr/bin/env bash
# The test command: install the system packages the tests need, set up (or refresh) the virtual
# environment from the project's files (and, for the full tier, the container image the tests run),
# then run the suite on three processes (pytest-xdist) and print the 25 slowest tests.
#   ./tests/run_tests.sh              the whole suite (full tier)
#   ./tests/run_tests.sh --quick      the quick tier: modules marked `quick`, less tests marked `slow`
#   ./tests/run_tests.sh ARGS...      ARGS go to pytest, e.g. tests/test_e2e.py -x, or -n 0 to run serially
# GLM_TEST_WORKERS sets the number of pytest processes (default 3: tests wait on processes and
# sockets much of the time, so three keep two cores busier than two; memory in use peaks ~15 GiB).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/tests/setup_system_packages.sh"
"$ROOT/launch/setup_env.sh"
VENV=${GLM_SERVE_VENV:-$ROOT/.venv}
cd "$ROOT"

tier=()
args=()
for arg in "$@"; do
  case "$arg" in
    --quick) tier=(-m "quick and not slow") ;;
    *) args+=("$arg") ;;
  esac
done
# No path among the arguments: the whole tests/ folder.
paths=(tests)
for arg in "${args[@]+"${args[@]}"}"; do
  case "$arg" in
    tests|tests/*) paths=() ;;
  esac
done
# The whole full tier: the container image its tests run is built (or found up to date) first, as
# set-up: a first build takes minutes, which beside the tests would slow them and be slowed by them.
# Should it fail, tests/test_container_image.py fails with the build's output.
if [ ${#tier[@]} -eq 0 ] && [ ${#paths[@]} -gt 0 ]; then
  "$VENV/bin/python" -m tests.container_build || echo "run_tests.sh: the container image did not build; its tests will say why" >&2
fi
exec "$VENV/bin/python" -m pytest -n "${GLM_TEST_WORKERS:-3}" --dist loadscope --durations 25 \
  "${tier[@]+"${tier[@]}"}" "${paths[@]+"${paths[@]}"}" "${args[@]+"${args[@]}"}"

#!/usr/bin/env bash
# The one prepared device check (issue 17): the whole system at the released model's full size on
# one GPU, random weights initialised on the device, ~8 minutes on one H200. What it runs and
# measures: bench/gpu_check.py; how to call it through the device tool: docs/benchmarks.md,
# "GPU check".
#
#   bench/gpu_check.sh --wheels .whl                       # on the GPU machine: results in $OUT
#   bench/gpu_check.sh --device cpu --depth small --out /tmp/check   # its logic, on a CPU
#   bench/gpu_check.sh --fetch-wheels .whl                 # here, with network: the wheels to carry
#
# --wheels DIR installs DIR/*.whl (bench/gpu_wheels.txt: what the GPU machine's image lacks) into a
# folder on PYTHONPATH first, without network. Every other option goes to `python -m bench.gpu_check`.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=""
FETCH=""
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --fetch-wheels) FETCH=${2:?--fetch-wheels needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; PASS+=("--help"); shift ;;
    *) PASS+=("$1"); shift ;;
  esac
done

if [ -n "$FETCH" ]; then
  # CPython 3.12 on x86-64 Linux, as the GPU machine runs; --no-deps: the list names every wheel needed.
  mkdir -p "$FETCH"
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$FETCH" \
    -r <(grep -v '^#' "$ROOT/bench/gpu_wheels.txt")
  du -sh "$FETCH"
  exit $?
fi

VENV=${GLM_SERVE_VENV:-$ROOT/.venv}  # the project's environment, where set-up put it
if [ -x "$VENV/bin/python" ] && [ -z "$WHEELS" ]; then
  PY="$VENV/bin/python"
else
  PY=$(command -v python3)
fi
if [ -n "$WHEELS" ]; then
  SITE=${GLM_CHECK_SITE:-/tmp/glm-check-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "error: installing the wheels in $WHEELS failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L
exec "$PY" -m bench.gpu_check ${PASS[@]+"${PASS[@]}"}

#!/usr/bin/env bash
# Start GLM-Image disaggregated: one router + N AR + M DiT workers, each its own process, supervised
# by `glm-image-serve launch` (launch/supervisor.py): a process that dies is restarted, a crash
# loop is reported and left down, Ctrl-C/SIGTERM stops everything gracefully.
# With no --model it serves the embedded tiny random-weight model on CPU (built on first use).
# This script handles set-up, the tiny model and the environment variables below; every other
# option goes to `glm-image-serve launch` as it is, which owns their defaults (common/defaults.py).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Environment variables that set `glm-image-serve launch` options; an option given on the command
# line wins (it comes later). GLM_CURVE_KEYS, GLM_API_KEY and GLM_API_KEY_FILE it reads itself.
ENV_OPTIONS=(
  GLM_HOST=--host GLM_PORT=--port GLM_BUS_PORT=--bus-port GLM_BUS_HOST=--bus-host
  GLM_NUM_AR=--num-ar GLM_NUM_DIT=--num-dit GLM_AR_DEVICES=--ar-devices GLM_DIT_DEVICES=--dit-devices
  GLM_WORKER_METRICS_PORT=--metrics-port GLM_SUPERVISOR_METRICS_PORT=--supervisor-metrics-port
  GLM_LOG_DIR=--log-dir GLM_MAX_RESTARTS=--max-restarts GLM_RESTART_WINDOW=--restart-window
  GLM_BACKOFF_INITIAL=--backoff-initial GLM_BACKOFF_MAX=--backoff-max
  GLM_READY_TIMEOUT=--ready-timeout GLM_SHUTDOWN_GRACE=--shutdown-grace
)

usage() {
  cat <<USAGE
Usage: $0 [options]   (--option VALUE or --option=VALUE)
Sets up the virtual environment (launch/setup_env.sh), then runs \`glm-image-serve launch\`.

This script's own options:
  --model DIR            GLM-Image folder, diffusers layout [GLM_MODEL]; default: the embedded tiny
                         random-weight model on CPU, built into models/tiny-glm-image on first use
  --model-name NAME      name reported by /v1/models [GLM_MODEL_NAME] (default: glm-image-tiny-random
                         for the tiny model, else launch's --model-name default below)
  --stage-config FILE    stage config YAML [GLM_STAGE_CONFIG] (default: for the tiny model
                         stage_configs/glm_image_tiny_cpu.yaml, else launch's --stage-config default below)
  -h, --help             this text

Every other option goes to \`glm-image-serve launch\` as it is (all listed below, with their defaults).
These environment variables set them too; the same option on the command line wins:
USAGE
  local pair
  for pair in "${ENV_OPTIONS[@]}"; do printf '  %-28s %s\n' "${pair%%=*}" "${pair#*=}"; done
  printf '  %-28s %s\n' "GLM_PROTECT_METRICS=1" "--protect-metrics"
  cat <<USAGE
  GLM_CURVE_KEYS, GLM_API_KEY, GLM_API_KEY_FILE, GLM_LORA_DIR: read by \`glm-image-serve launch\` itself (below)
Also: GLM_SERVE_VENV, the virtual environment to set up and run (default: .venv in this checkout);
GLM_TORCH_INDEX_URL, where set-up gets the CPU torch (launch/setup_env.sh); GLM_SERVE_LOG_LEVEL,
every process's log level (default: INFO).

A process that dies before everything is ready fails the launch (non-zero exit, with its error);
after that, a dead process is restarted after --backoff-initial seconds, doubling up to --backoff-max.
A worker on another node joins with the same stage config (the router refuses any other):
  glm-image-serve ar-worker --router tcp://THIS_HOST:BUS_PORT --model DIR --stage-config FILE --device DEV
  (the bus must listen there: --host 0.0.0.0 or --bus-host; the exact line is printed once ready)

USAGE
}

die_usage() { echo "$0: $1 ($0 --help lists the options)" >&2; exit 2; }

MODEL=${GLM_MODEL:-}; MODEL_NAME=${GLM_MODEL_NAME:-}; STAGE_CONFIG=${GLM_STAGE_CONFIG:-}
HELP=
passed=()  # for `glm-image-serve launch`, verbatim
while [ $# -gt 0 ]; do
  option=$1
  case "$1" in
    -h|--help) HELP=1; shift; continue ;;
    --model=*|--model-name=*|--stage-config=*) option=${1%%=*}; value=${1#*=}; shift ;;
    --model|--model-name|--stage-config)
      # Missing when it is the last argument, or when an option follows instead.
      if [ $# -ge 2 ] && [[ "$2" != --* ]]; then value=$2; shift 2; else value=; shift; fi ;;
    *) passed+=("$1"); shift; continue ;;  # launch's option or its value: launch checks both
  esac
  [ -n "$value" ] || die_usage "option $option needs a value"
  case "$option" in
    --model) MODEL=$value ;;
    --model-name) MODEL_NAME=$value ;;
    --stage-config) STAGE_CONFIG=$value ;;
  esac
done

"$ROOT/launch/setup_env.sh"
BIN="$ROOT/.venv/bin"
if [ -n "${GLM_SERVE_VENV:-}" ]; then BIN="$GLM_SERVE_VENV/bin"; fi

if [ -n "$HELP" ]; then
  usage
  "$BIN/glm-image-serve" launch --help
  exit 0
fi

if [ -z "$MODEL" ]; then
  MODEL="$ROOT/models/tiny-glm-image"
  [ -f "$MODEL/model_index.json" ] || "$BIN/glm-image-serve" make-tiny-model --out "$MODEL" >/dev/null
  STAGE_CONFIG=${STAGE_CONFIG:-$ROOT/stage_configs/glm_image_tiny_cpu.yaml}
  MODEL_NAME=${MODEL_NAME:-glm-image-tiny-random}  # random weights: not the real model's name
fi

args=(--model "$MODEL")
[ -z "$MODEL_NAME" ] || args+=(--model-name "$MODEL_NAME")
[ -z "$STAGE_CONFIG" ] || args+=(--stage-config "$STAGE_CONFIG")
for pair in "${ENV_OPTIONS[@]}"; do
  name=${pair%%=*}
  [ -z "${!name:-}" ] || args+=("${pair#*=}" "${!name}")
done
case "${GLM_PROTECT_METRICS:-0}" in ""|0) ;; *) args+=(--protect-metrics) ;; esac

# exec: the supervisor takes this process's pid, so Ctrl-C and `kill` reach it directly.
exec "$BIN/glm-image-serve" launch "${args[@]}" ${passed[@]+"${passed[@]}"}

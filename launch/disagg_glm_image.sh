#!/usr/bin/env bash
# Start GLM-Image disaggregated: one router + N AR + M DiT workers, each its own process, supervised
# by `glm-image-serve launch` (launch/supervisor.py): a process that dies is restarted, a crash
# loop is reported and left down, Ctrl-C/SIGTERM stops everything gracefully.
# With no --model it serves the embedded tiny random-weight model on CPU (built on first use).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<USAGE
Usage: $0 [options]   (every option also reads from the environment variable shown)
  --model DIR            GLM-Image folder, diffusers layout [GLM_MODEL]; default: tiny model on CPU
  --model-name NAME      name reported by /v1/models [GLM_MODEL_NAME] (default: zai-org/GLM-Image,
                         glm-image-tiny-random for the tiny model)
  --stage-config FILE    stage config YAML [GLM_STAGE_CONFIG]; default: stage_configs/glm_image.yaml
                         with --model, stage_configs/glm_image_tiny_cpu.yaml without
  --host ADDR            HTTP listen address [GLM_HOST] (default 127.0.0.1)
  --port N               HTTP port [GLM_PORT] (default 8000)
  --bus-port N           ZeroMQ bus port the workers connect to [GLM_BUS_PORT] (default 5570)
  --bus-host ADDR        address the bus binds [GLM_BUS_HOST] (default: the HTTP host; 0.0.0.0 = all)
  --curve-keys DIR       encrypt and authenticate the bus with CurveZMQ, using the keys that
                         \`glm-image-serve keygen --out DIR\` wrote [GLM_CURVE_KEYS] (default: plaintext)
  --api-key KEY          require 'Authorization: Bearer KEY' on /v1/*; repeat for several keys. Shown
                         by \`ps\`: prefer GLM_API_KEY (comma separated keys) or --api-key-file
  --api-key-file FILE    accepted keys, one per line, '#' comments [GLM_API_KEY_FILE]; re-read on change
  --protect-metrics      /metrics needs a key too [GLM_PROTECT_METRICS=1] (default: open)
  --num-ar N             AR workers [GLM_NUM_AR] (default 1)
  --num-dit N            DiT workers [GLM_NUM_DIT] (default 1)
  --ar-devices LIST      comma list of devices, worker i takes item i mod len [GLM_AR_DEVICES]
                         (default: the stage config's devices), e.g. cuda:0,cuda:1
  --dit-devices LIST     same for DiT workers [GLM_DIT_DEVICES]
  --metrics-port N       first Prometheus port for workers; worker k gets N+k [GLM_WORKER_METRICS_PORT]
  --supervisor-metrics-port N
                         the supervisor's Prometheus metrics (restarts, running processes) on
                         HOST:N [GLM_SUPERVISOR_METRICS_PORT]
  --log-dir DIR          one log file per process [GLM_LOG_DIR] (default: a new temporary folder);
                         every line is also shown on this terminal, prefixed with its process name
  --max-restarts N       restarts allowed per process within the window; one more exit is a crash
                         loop and that process is left down [GLM_MAX_RESTARTS] (default 5)
  --restart-window S     seconds over which exits are counted [GLM_RESTART_WINDOW] (default 60)
  --ready-timeout S      seconds for every worker to register before the launch fails
                         [GLM_READY_TIMEOUT] (default 600)
  --shutdown-grace S     on Ctrl-C/SIGTERM, seconds for in-flight requests to finish, then for the
                         workers to drain [GLM_SHUTDOWN_GRACE] (default 30)
A process that dies before everything is ready fails the launch (non-zero exit, with its error);
after that, a dead process is restarted after 1 s, 2 s, 4 s ... (at most 30 s).
A worker on another node joins with the same stage config (the router refuses any other):
  glm-image-serve ar-worker --router tcp://THIS_HOST:BUS_PORT --model DIR --stage-config FILE --device DEV
  (the bus must listen there: --host 0.0.0.0 or --bus-host; the exact line is printed once ready)
USAGE
}

MODEL=${GLM_MODEL:-}; MODEL_NAME=${GLM_MODEL_NAME:-}; STAGE_CONFIG=${GLM_STAGE_CONFIG:-}
HOST=${GLM_HOST:-127.0.0.1}; PORT=${GLM_PORT:-8000}; BUS_PORT=${GLM_BUS_PORT:-5570}; BUS_HOST=${GLM_BUS_HOST:-}
CURVE_KEYS=${GLM_CURVE_KEYS:-}
API_KEYS=(); PROTECT_METRICS=${GLM_PROTECT_METRICS:-}  # GLM_API_KEY and GLM_API_KEY_FILE reach the launcher as they are
NUM_AR=${GLM_NUM_AR:-1}; NUM_DIT=${GLM_NUM_DIT:-1}; AR_DEVICES=${GLM_AR_DEVICES:-}; DIT_DEVICES=${GLM_DIT_DEVICES:-}
METRICS_PORT=${GLM_WORKER_METRICS_PORT:-}; SUPERVISOR_METRICS_PORT=${GLM_SUPERVISOR_METRICS_PORT:-}
LOG_DIR=${GLM_LOG_DIR:-}; MAX_RESTARTS=${GLM_MAX_RESTARTS:-5}; RESTART_WINDOW=${GLM_RESTART_WINDOW:-60}
READY_TIMEOUT=${GLM_READY_TIMEOUT:-600}; SHUTDOWN_GRACE=${GLM_SHUTDOWN_GRACE:-30}
while [ $# -gt 0 ]; do
  case "$1" in -h|--help) usage; exit 0 ;; --protect-metrics) PROTECT_METRICS=1; shift; continue ;; esac
  [ $# -ge 2 ] || { echo "option $1 needs a value" >&2; usage >&2; exit 2; }
  case "$1" in
    --model) MODEL=$2 ;;
    --model-name) MODEL_NAME=$2 ;;
    --stage-config) STAGE_CONFIG=$2 ;;
    --host) HOST=$2 ;;
    --port) PORT=$2 ;;
    --bus-port) BUS_PORT=$2 ;;
    --bus-host) BUS_HOST=$2 ;;
    --curve-keys) CURVE_KEYS=$2 ;;
    --api-key) API_KEYS+=(--api-key "$2") ;;
    --api-key-file) export GLM_API_KEY_FILE=$2 ;;
    --num-ar) NUM_AR=$2 ;;
    --num-dit) NUM_DIT=$2 ;;
    --ar-devices) AR_DEVICES=$2 ;;
    --dit-devices) DIT_DEVICES=$2 ;;
    --metrics-port) METRICS_PORT=$2 ;;
    --supervisor-metrics-port) SUPERVISOR_METRICS_PORT=$2 ;;
    --log-dir) LOG_DIR=$2 ;;
    --max-restarts) MAX_RESTARTS=$2 ;;
    --restart-window) RESTART_WINDOW=$2 ;;
    --ready-timeout) READY_TIMEOUT=$2 ;;
    --shutdown-grace) SHUTDOWN_GRACE=$2 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift 2
done

"$ROOT/launch/setup_env.sh"
BIN="$ROOT/.venv/bin"
if [ -n "${GLM_SERVE_VENV:-}" ]; then BIN="$GLM_SERVE_VENV/bin"; fi

if [ -z "$MODEL" ]; then
  MODEL="$ROOT/models/tiny-glm-image"
  [ -f "$MODEL/model_index.json" ] || "$BIN/glm-image-serve" make-tiny-model --out "$MODEL" >/dev/null
  STAGE_CONFIG=${STAGE_CONFIG:-$ROOT/stage_configs/glm_image_tiny_cpu.yaml}
  MODEL_NAME=${MODEL_NAME:-glm-image-tiny-random}  # random weights: not zai-org/GLM-Image
fi
STAGE_CONFIG=${STAGE_CONFIG:-$ROOT/stage_configs/glm_image.yaml}
MODEL_NAME=${MODEL_NAME:-zai-org/GLM-Image}

args=(--model "$MODEL" --model-name "$MODEL_NAME" --stage-config "$STAGE_CONFIG" --host "$HOST" --port "$PORT"
  --bus-port "$BUS_PORT" --num-ar "$NUM_AR" --num-dit "$NUM_DIT" --max-restarts "$MAX_RESTARTS"
  --restart-window "$RESTART_WINDOW" --ready-timeout "$READY_TIMEOUT" --shutdown-grace "$SHUTDOWN_GRACE")
[ -n "$BUS_HOST" ] && args+=(--bus-host "$BUS_HOST")
[ -n "$CURVE_KEYS" ] && args+=(--curve-keys "$CURVE_KEYS")
args+=(${API_KEYS[@]+"${API_KEYS[@]}"})
[ -n "$PROTECT_METRICS" ] && [ "$PROTECT_METRICS" != 0 ] && args+=(--protect-metrics)
[ -n "$AR_DEVICES" ] && args+=(--ar-devices "$AR_DEVICES")
[ -n "$DIT_DEVICES" ] && args+=(--dit-devices "$DIT_DEVICES")
[ -n "$METRICS_PORT" ] && args+=(--metrics-port "$METRICS_PORT")
[ -n "$SUPERVISOR_METRICS_PORT" ] && args+=(--supervisor-metrics-port "$SUPERVISOR_METRICS_PORT")
[ -n "$LOG_DIR" ] && args+=(--log-dir "$LOG_DIR")

# exec: the supervisor takes this process's pid, so Ctrl-C and `kill` reach it directly.
exec "$BIN/glm-image-serve" launch "${args[@]}"

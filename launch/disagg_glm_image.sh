#!/usr/bin/env bash
# Start GLM-Image disaggregated: one router + N AR workers + M DiT workers, each its own process.
# With no --model it serves the embedded tiny random-weight model on CPU (built on first use).
# Ctrl-C (or any child dying) stops every process it started.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<USAGE
Usage: $0 [options]   (every option also reads from the environment variable shown)
  --model DIR            GLM-Image folder, diffusers layout [GLM_MODEL]; default: tiny model on CPU
  --stage-config FILE    stage config YAML [GLM_STAGE_CONFIG]; default: stage_configs/glm_image.yaml
                         with --model, stage_configs/glm_image_tiny_cpu.yaml without
  --host ADDR            HTTP listen address [GLM_HOST] (default 127.0.0.1)
  --port N               HTTP port [GLM_PORT] (default 8000)
  --bus-port N           ZeroMQ bus port the workers connect to [GLM_BUS_PORT] (default 5570)
  --num-ar N             AR workers [GLM_NUM_AR] (default 1)
  --num-dit N            DiT workers [GLM_NUM_DIT] (default 1)
  --ar-devices LIST      comma list of devices, worker i takes item i mod len [GLM_AR_DEVICES]
                         (default: the stage config's devices), e.g. cuda:0,cuda:1
  --dit-devices LIST     same for DiT workers [GLM_DIT_DEVICES]
  --metrics-port N       first Prometheus port for workers; worker k gets N+k [GLM_WORKER_METRICS_PORT]
  --log-dir DIR          where process logs go [GLM_LOG_DIR] (default: print to this terminal)
A worker on another node joins with:
  glm-image-serve ar-worker --router tcp://THIS_HOST:BUS_PORT --model DIR
USAGE
}

MODEL=${GLM_MODEL:-}; STAGE_CONFIG=${GLM_STAGE_CONFIG:-}; HOST=${GLM_HOST:-127.0.0.1}
PORT=${GLM_PORT:-8000}; BUS_PORT=${GLM_BUS_PORT:-5570}; NUM_AR=${GLM_NUM_AR:-1}; NUM_DIT=${GLM_NUM_DIT:-1}
AR_DEVICES=${GLM_AR_DEVICES:-}; DIT_DEVICES=${GLM_DIT_DEVICES:-}; METRICS_PORT=${GLM_WORKER_METRICS_PORT:-}
LOG_DIR=${GLM_LOG_DIR:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --stage-config) STAGE_CONFIG=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --bus-port) BUS_PORT=$2; shift 2 ;;
    --num-ar) NUM_AR=$2; shift 2 ;;
    --num-dit) NUM_DIT=$2; shift 2 ;;
    --ar-devices) AR_DEVICES=$2; shift 2 ;;
    --dit-devices) DIT_DEVICES=$2; shift 2 ;;
    --metrics-port) METRICS_PORT=$2; shift 2 ;;
    --log-dir) LOG_DIR=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done

"$ROOT/launch/setup_env.sh"
BIN="$ROOT/.venv/bin"
if [ -n "${GLM_SERVE_VENV:-}" ]; then BIN="$GLM_SERVE_VENV/bin"; fi

if [ -z "$MODEL" ]; then
  MODEL="$ROOT/models/tiny-glm-image"
  [ -f "$MODEL/model_index.json" ] || "$BIN/glm-image-serve" make-tiny-model --out "$MODEL" >/dev/null
  STAGE_CONFIG=${STAGE_CONFIG:-$ROOT/stage_configs/glm_image_tiny_cpu.yaml}
fi
STAGE_CONFIG=${STAGE_CONFIG:-$ROOT/stage_configs/glm_image.yaml}
BUS="tcp://127.0.0.1:$BUS_PORT"

pids=()
cleanup() {
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    echo "stopping ${#pids[@]} process(es)..." >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

start() {  # start NAME CMD...: run in the background, logging to LOG_DIR/NAME.log if set
  local name=$1; shift
  if [ -n "$LOG_DIR" ]; then mkdir -p "$LOG_DIR"; "$@" >"$LOG_DIR/$name.log" 2>&1 &
  else "$@" & fi
  pids+=($!)
}

pick() {  # pick LIST INDEX: item INDEX mod len of a comma list
  local IFS=,; local items=($1); echo "${items[$(( $2 % ${#items[@]} ))]}"
}

start router "$BIN/glm-image-serve" router --stage-config "$STAGE_CONFIG" --host "$HOST" --port "$PORT" \
  --bus-bind "tcp://*:$BUS_PORT"
metrics_next=$METRICS_PORT
start_workers() {  # start_workers STAGE COUNT DEVICES: COUNT workers of STAGE (ar|dit)
  local stage=$1 count=$2 devices=$3 i args
  for ((i = 0; i < count; i++)); do
    args=(--stage-config "$STAGE_CONFIG" --router "$BUS" --model "$MODEL" --worker-id "$stage-$i")
    [ -n "$devices" ] && args+=(--device "$(pick "$devices" "$i")")
    if [ -n "$metrics_next" ]; then args+=(--metrics-port "$metrics_next"); metrics_next=$((metrics_next + 1)); fi
    start "$stage-$i" "$BIN/glm-image-serve" "$stage-worker" "${args[@]}"
  done
}
start_workers ar "$NUM_AR" "$AR_DEVICES"
start_workers dit "$NUM_DIT" "$DIT_DEVICES"

URL="http://$HOST:$PORT"
[ "$HOST" = "0.0.0.0" ] && URL="http://127.0.0.1:$PORT"
echo "waiting for $NUM_AR AR + $NUM_DIT DiT worker(s) at $URL ..." >&2
"$BIN/python" -m launch.wait_ready --url "$URL" --ar "$NUM_AR" --dit "$NUM_DIT" --pids "${pids[@]}"

cat <<READY
GLM-Image is serving at $URL  (model: $MODEL)
Try:
  curl -s $URL/v1/images/generations -H 'Content-Type: application/json' \\
    -d '{"prompt": "a lighthouse at dawn, \"HELLO\" painted on it", "size": "512x512", "seed": 1}' \\
    | jq -r '.data[0].b64_json' | base64 -d > out.png
Metrics: $URL/metrics    Stop: Ctrl-C
READY

# Any child exiting brings the rest down.
set +e
wait -n "${pids[@]}"
status=$?
echo "a process exited (status $status); shutting down" >&2
exit "$status"

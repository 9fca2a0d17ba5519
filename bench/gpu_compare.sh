#!/usr/bin/env bash
# Measure this server on real GPUs with the requests of vLLM-Omni's GLM-Image online benchmark
# (benchmarks/glm_image/benchmark_glm_image.py in vllm-project/vllm-omni: POST /v1/chat/completions,
# the prompt as the user message, extra_body {height, width, num_inference_steps}, 1024x1024,
# 50 steps, 10 prompts, 1 warm-up request, max concurrency 1, request rate inf), then at higher
# concurrency, and print a comparison table with vLLM-Omni's published figures (and with a
# vLLM-Omni server measured the same way, when --vllm-omni-url names one running on this machine).
#
# Needs GPUs and the real weights: it cannot run on a CPU-only machine (it says so and exits 2).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<USAGE
Usage: $0 --model DIR [options]
  --model DIR            GLM-Image weights (diffusers layout), required
  --num-ar N             AR workers (default 1)          --ar-devices LIST   (default cuda:0)
  --num-dit N            DiT workers (default 1)         --dit-devices LIST  (default cuda:1)
  --stage-config FILE    stage config (default: stage_configs/glm_image.yaml)
  --port N               HTTP port of our router (default 8000); the bus uses N+1
  --num-prompts N        measured requests per level (default 10, as vLLM-Omni's benchmark)
  --concurrency "C ..."  levels; 1 is vLLM-Omni's setting (default "1 4 16")
  --prompts-file FILE    vLLM-Omni's prompt.json (t2i_prompt entries) or one prompt per line;
                         default: the prompts of its --dataset random
  --size WxH             (default 1024x1024)             --steps N  (default 50)
  --vllm-omni-url URL    also measure a vLLM-Omni server already running on this machine
                         (vllm serve DIR --omni --served-model-name glm-image --port P)
  --out DIR              where logs and JSON results go (default: a new temporary folder)
USAGE
}

MODEL=""; NUM_AR=1; NUM_DIT=1; AR_DEVICES="cuda:0"; DIT_DEVICES="cuda:1"
STAGE_CONFIG="$ROOT/stage_configs/glm_image.yaml"; PORT=8000; NUM_PROMPTS=10; LEVELS="1 4 16"
PROMPTS_FILE=""; SIZE="1024x1024"; STEPS=50; VLLM_OMNI_URL=""; OUT=""
while [ $# -gt 0 ]; do
  case "$1" in -h|--help) usage; exit 0 ;; esac
  [ $# -ge 2 ] || { echo "option $1 needs a value" >&2; usage >&2; exit 2; }
  case "$1" in
    --model) MODEL=$2 ;;
    --num-ar) NUM_AR=$2 ;;
    --num-dit) NUM_DIT=$2 ;;
    --ar-devices) AR_DEVICES=$2 ;;
    --dit-devices) DIT_DEVICES=$2 ;;
    --stage-config) STAGE_CONFIG=$2 ;;
    --port) PORT=$2 ;;
    --num-prompts) NUM_PROMPTS=$2 ;;
    --concurrency) LEVELS=$2 ;;
    --prompts-file) PROMPTS_FILE=$2 ;;
    --size) SIZE=$2 ;;
    --steps) STEPS=$2 ;;
    --vllm-omni-url) VLLM_OMNI_URL=$2 ;;
    --out) OUT=$2 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift 2
done
[ -n "$MODEL" ] || { echo "error: --model DIR is required (real GLM-Image weights)" >&2; usage >&2; exit 2; }
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "error: no GPU here (nvidia-smi lists none): this comparison needs real GPUs and weights" >&2
  exit 2
fi
OUT=${OUT:-$(mktemp -d -t glm-gpu-compare-XXXXXX)}
mkdir -p "$OUT"
PY="$ROOT/.venv/bin/python"
URL="http://127.0.0.1:$PORT"
read -r -a LEVEL_ARRAY <<<"$LEVELS"
PROMPT_ARGS=()
[ -z "$PROMPTS_FILE" ] || PROMPT_ARGS=(--prompts-file "$PROMPTS_FILE")

echo "starting our server: $NUM_AR AR ($AR_DEVICES) + $NUM_DIT DiT ($DIT_DEVICES); logs in $OUT"
"$ROOT/launch/disagg_glm_image.sh" --model "$MODEL" --model-name glm-image --stage-config "$STAGE_CONFIG" \
  --port "$PORT" --bus-port "$((PORT + 1))" --num-ar "$NUM_AR" --num-dit "$NUM_DIT" \
  --ar-devices "$AR_DEVICES" --dit-devices "$DIT_DEVICES" --log-dir "$OUT/logs" >"$OUT/launcher.log" 2>&1 &
LAUNCHER=$!
stop_server() {
  if kill -0 "$LAUNCHER" 2>/dev/null; then
    kill -TERM "$LAUNCHER" 2>/dev/null || true  # the supervisor stops the router, then drains the workers
    wait "$LAUNCHER" 2>/dev/null || true
  fi
}
trap stop_server EXIT

# Ready once the router sees every worker (the launcher prints its banner then); loading takes minutes.
deadline=$((SECONDS + 900))
until grep -q "is serving at" "$OUT/launcher.log" 2>/dev/null; do
  if ! kill -0 "$LAUNCHER" 2>/dev/null; then
    echo "error: the launcher exited before the server was ready:" >&2
    tail -n 40 "$OUT/launcher.log" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "error: the server was not ready within 900 s" >&2
    exit 1
  fi
  sleep 2
done

# measure NAME URL: vLLM-Omni's request format, its fixed-count protocol, one JSON file per level.
measure() {
  local name=$1 url=$2 level
  for level in "${LEVEL_ARRAY[@]}"; do
    echo "== $name, concurrency $level"
    "$PY" -m bench.load --url "$url" --api chat --model glm-image --size "$SIZE" --steps "$STEPS" \
      --concurrency "$level" --num-requests "$((NUM_PROMPTS * level))" --warmup-requests 1 \
      --timeout 1800 ${PROMPT_ARGS[@]+"${PROMPT_ARGS[@]}"} --json "$OUT/$name-c$level.json" || true
  done
}
cd "$ROOT"
measure ours "$URL"
[ -z "$VLLM_OMNI_URL" ] || measure vllm-omni "$VLLM_OMNI_URL"

GPUS=$((NUM_AR + NUM_DIT)) "$PY" - "$OUT" <<'PY'
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
gpus = int(os.environ["GPUS"])
print(f"\n| server | GPUs | concurrency | images/s | images/s per GPU | latency mean s | p50 s | p99 s | errors |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sorted(out.glob("*-c*.json"), key=lambda p: (p.name.split("-c")[0], int(p.stem.rsplit("-c", 1)[1]))):
    (s,) = json.loads(path.read_text())
    name = path.stem.rsplit("-c", 1)[0]
    n = gpus if name == "ours" else 2  # vLLM-Omni's default GLM-Image stage config: 2 GPUs
    e2e = s["e2e_s"]
    print(f"| {name} (measured) | {n} | {s['level']:g} | {s['images_per_s']:.4f} | {s['images_per_s'] / n:.4f} | "
          f"{e2e['mean'] or 0:.1f} | {e2e['p50'] or 0:.1f} | {e2e['p99'] or 0:.1f} | {s['errors']} |")
# Published by vLLM-Omni (docs/model_facts.md#peers; benchmarks/glm_image/README.md), 1024x1024, 50 steps.
print("| vLLM-Omni online T2I (published, 2 GPUs) | 2 | 1 | 0.026 | 0.013 | 38.8 | - | - | - |")
print("| vLLM-Omni offline T2I (published, 2 GPUs) | 2 | 10 at once | 0.044 | 0.022 | 35.0 | - | - | - |")
print("| vLLM-Omni on one H800 (published) | 1 | 1 | 0.040 | 0.040 | 25.2 | - | - | - |")
PY
echo "results: $OUT"

#!/usr/bin/env bash
# Watch an image being made: a streamed request with curl -N.   examples/stream.sh "PROMPT" [OUT.png]
#
# Prints the progress events (queue, AR tokens, DiT steps) as they arrive, saves the previews
# as OUT's name + .partial-K.png, then the image. Optional environment:
#   PARTIALS=N (0..3, default 2)  SIZE=WIDTHxHEIGHT  STEPS=N  SEED=N   (default: the server's)
#   GLM_URL            the router (default http://127.0.0.1:8000)
#   GLM_API_KEY        sent as "Authorization: Bearer ..." when set
# Needs curl, jq and base64.
set -euo pipefail
command -v jq >/dev/null || { echo "$0: needs jq (Debian/Ubuntu: apt-get install jq; macOS: brew install jq)" >&2; exit 1; }
URL=${GLM_URL:-http://127.0.0.1:8000}
PROMPT=${1:?usage: $0 \"PROMPT\" [OUT.png]}
OUT=${2:-out.png}
case "${OUT,,}" in *.jpg | *.jpeg) FORMAT=jpeg ;; *.webp) FORMAT=webp ;; *) FORMAT=png ;; esac

body=$(jq -n --arg prompt "$PROMPT" --arg format "$FORMAT" --arg partials "${PARTIALS:-2}" \
  --arg size "${SIZE:-}" --arg steps "${STEPS:-}" --arg seed "${SEED:-}" '
  {prompt: $prompt, output_format: $format, stream: true, stream_progress: true,
   partial_images: ($partials | tonumber)}
  + (if $size != "" then {size: $size} else {} end)
  + (if $steps != "" then {num_inference_steps: ($steps | tonumber)} else {} end)
  + (if $seed != "" then {seed: ($seed | tonumber)} else {} end)')

auth=()
[ -z "${GLM_API_KEY:-}" ] || auth=(-H "Authorization: Bearer $GLM_API_KEY")
# Each event is "event: NAME" then "data: JSON" (see docs/streaming.md); -N: no buffering.
event=""
curl -sS -N ${auth[@]+"${auth[@]}"} -H 'Content-Type: application/json' -d "$body" "$URL/v1/images/generations" |
while IFS= read -r line || [ -n "$line" ]; do  # the last line may lack its newline
  case "$line" in
    "event: "*) event=${line#event: } ;;
    "data: "*)
      data=${line#data: }
      case "$event" in
        *.progress)
          jq -r '"\(.stage): " + (if .stage == "queued" then "\(.position) ahead"
                                   elif .stage == "retry" then .reason
                                   else "\(.done)/\(.total)" + (if .seconds then " in \(.seconds)s" else "" end) end)' <<<"$data" ;;
        *.partial_image)
          preview="${OUT%.*}.partial-$(jq -r .partial_image_index <<<"$data").${OUT##*.}"
          jq -r .b64_json <<<"$data" | base64 -d > "$preview"
          echo "preview saved: $preview" ;;
        *.completed)
          jq -r .b64_json <<<"$data" | base64 -d > "$OUT"
          echo "saved $OUT ($(jq -r '"\(.size), seed \(.seed)"' <<<"$data"))" ;;
        error)
          echo "error: $(jq -r .error.message <<<"$data")" >&2
          exit 1 ;;
      esac ;;
    '{"error"'*)  # refused before the stream started: a plain JSON error body
      echo "error: $(jq -r .error.message <<<"$line")" >&2
      exit 1 ;;
  esac
done

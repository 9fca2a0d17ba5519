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

body=$(jq -nc --arg prompt "$PROMPT" --arg format "$FORMAT" --arg partials "${PARTIALS:-2}" \
  --arg size "${SIZE:-}" --arg steps "${STEPS:-}" '
  {prompt: $prompt, output_format: $format, stream: true, stream_progress: true,
   partial_images: ($partials | tonumber)}
  + (if $size != "" then {size: $size} else {} end)
  + (if $steps != "" then {num_inference_steps: ($steps | tonumber)} else {} end)')
# The seed goes in as the digits given, not through jq: jq 1.6 reads numbers as doubles, which round
# seeds above 2^53 (seeds go up to 2^63-1).
if [ -n "${SEED:-}" ]; then
  [[ $SEED =~ ^[0-9]+$ ]] || { echo "$0: SEED must be a whole number, 0 or more (got '$SEED')" >&2; exit 2; }
  seed=${SEED#"${SEED%%[!0]*}"}  # without leading zeros, which JSON numbers may not have
  body="${body%\}},\"seed\":${seed:-0}}"
fi

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
          # The seed from the text, not through jq: jq 1.6 prints numbers as doubles, rounded above 2^53.
          echo "saved $OUT ($(jq -r .size <<<"$data"), seed $(grep -o '"seed": *[0-9]*' <<<"$data" | grep -o '[0-9]*$'))" ;;
        error)
          echo "error: $(jq -r .error.message <<<"$data")" >&2
          exit 1 ;;
      esac ;;
    '{"error"'*)  # refused before the stream started: a plain JSON error body
      echo "error: $(jq -r .error.message <<<"$line")" >&2
      exit 1 ;;
  esac
done

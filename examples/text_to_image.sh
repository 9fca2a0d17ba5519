#!/usr/bin/env bash
# Text-to-image with curl:   examples/text_to_image.sh "PROMPT" [OUT.png]
#
# The OUT extension picks the format (.png, .jpg/.jpeg, .webp). Optional environment:
#   SIZE=WIDTHxHEIGHT  STEPS=N  SEED=N      (default: the server's)
#   GLM_URL            the router (default http://127.0.0.1:8000)
#   GLM_API_KEY        sent as "Authorization: Bearer ..." when set
# Needs curl, jq and base64.
set -euo pipefail
command -v jq >/dev/null || { echo "$0: needs jq (Debian/Ubuntu: apt-get install jq; macOS: brew install jq)" >&2; exit 1; }
URL=${GLM_URL:-http://127.0.0.1:8000}
PROMPT=${1:?usage: $0 \"PROMPT\" [OUT.png]}
OUT=${2:-out.png}
case "${OUT,,}" in *.jpg | *.jpeg) FORMAT=jpeg ;; *.webp) FORMAT=webp ;; *) FORMAT=png ;; esac

# jq writes the JSON body, so quotes in the prompt are escaped properly.
body=$(jq -nc --arg prompt "$PROMPT" --arg format "$FORMAT" \
  --arg size "${SIZE:-}" --arg steps "${STEPS:-}" '
  {prompt: $prompt, output_format: $format}
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
response=$(mktemp)
trap 'rm -f "$response"' EXIT
status=$(curl -sS -o "$response" -w '%{http_code}' ${auth[@]+"${auth[@]}"} \
  -H 'Content-Type: application/json' -d "$body" "$URL/v1/images/generations")
if [ "$status" != 200 ]; then
  echo "error $status: $(jq -r '.error.message // .' "$response" 2>/dev/null || cat "$response")" >&2
  exit 1
fi
jq -r '.data[0].b64_json' "$response" | base64 -d > "$OUT"
# The seed from the text, not through jq: jq 1.6 prints numbers as doubles, rounded above 2^53.
echo "saved $OUT ($(jq -r .size "$response"), seed $(grep -o '"seeds": *\[[0-9]*' "$response" | grep -o '[0-9]*$'))"

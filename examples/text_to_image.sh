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
body=$(jq -n --arg prompt "$PROMPT" --arg format "$FORMAT" \
  --arg size "${SIZE:-}" --arg steps "${STEPS:-}" --arg seed "${SEED:-}" '
  {prompt: $prompt, output_format: $format}
  + (if $size != "" then {size: $size} else {} end)
  + (if $steps != "" then {num_inference_steps: ($steps | tonumber)} else {} end)
  + (if $seed != "" then {seed: ($seed | tonumber)} else {} end)')

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
echo "saved $OUT ($(jq -r '"\(.size), seed \(.seeds[0])"' "$response"))"

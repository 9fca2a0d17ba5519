#!/usr/bin/env bash
# Image-to-image (an edit) with curl:   examples/image_to_image.sh "PROMPT" INPUT.png [OUT.png]
#
# The output keeps the input's size (made valid: sides multiples of 32) unless SIZE is set.
# The OUT extension picks the format (.png, .jpg/.jpeg, .webp). Optional environment:
#   SIZE=WIDTHxHEIGHT  STEPS=N  SEED=N      (default: the server's)
#   GLM_URL            the router (default http://127.0.0.1:8000)
#   GLM_API_KEY        sent as "Authorization: Bearer ..." when set
# Needs curl, jq and base64.
set -euo pipefail
command -v jq >/dev/null || { echo "$0: needs jq (Debian/Ubuntu: apt-get install jq; macOS: brew install jq)" >&2; exit 1; }
URL=${GLM_URL:-http://127.0.0.1:8000}
PROMPT=${1:?usage: $0 \"PROMPT\" INPUT.png [OUT.png]}
INPUT=${2:?usage: $0 \"PROMPT\" INPUT.png [OUT.png]}
OUT=${3:-out.png}
case "${OUT,,}" in *.jpg | *.jpeg) FORMAT=jpeg ;; *.webp) FORMAT=webp ;; *) FORMAT=png ;; esac

# --form-string sends text as it is (with -F, a value starting with @ or < would name a file).
form=(-F "image[]=@$INPUT" --form-string "prompt=$PROMPT" --form-string "output_format=$FORMAT")
[ -z "${SIZE:-}" ] || form+=(--form-string "size=$SIZE")
[ -z "${STEPS:-}" ] || form+=(--form-string "num_inference_steps=$STEPS")
[ -z "${SEED:-}" ] || form+=(--form-string "seed=$SEED")  # text: exact, whatever its size

auth=()
[ -z "${GLM_API_KEY:-}" ] || auth=(-H "Authorization: Bearer $GLM_API_KEY")
response=$(mktemp)
trap 'rm -f "$response"' EXIT
status=$(curl -sS -o "$response" -w '%{http_code}' ${auth[@]+"${auth[@]}"} "${form[@]}" "$URL/v1/images/edits")
if [ "$status" != 200 ]; then
  echo "error $status: $(jq -r '.error.message // .' "$response" 2>/dev/null || cat "$response")" >&2
  exit 1
fi
jq -r '.data[0].b64_json' "$response" | base64 -d > "$OUT"
# The seed from the text, not through jq: jq 1.6 prints numbers as doubles, rounded above 2^53.
echo "saved $OUT ($(jq -r .size "$response"), seed $(grep -o '"seeds": *\[[0-9]*' "$response" | grep -o '[0-9]*$'))"

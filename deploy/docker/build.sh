#!/usr/bin/env bash
# Build deploy/docker/Dockerfile's image with podman or docker, whichever is present (podman first).
#
#   deploy/docker/build.sh                      # glm-image-serve:0.1.0-cpu, what overlays/tiny-cpu runs
#   deploy/docker/build.sh --variant cuda       # glm-image-serve:0.1.0-cuda, what overlays/gpu runs
#
# Options:
#   --variant cpu|cuda     which torch (default cpu: the CPU build, no CUDA packages)
#   --tag IMAGE            the image name (default glm-image-serve:<version>-<variant>, the overlays' reference)
#   --base IMAGE           the Python base image (default python:3.11-slim)
#   --local-base           never pull a base: debootstrap a minimal Debian bookworm with python3 and
#                          venv and import it (also what happens when pulling --base fails)
#   --wheels DIR           a folder of wheels (e.g. the torch CPU wheel) that pip prefers to any index;
#                          default: PIP_FIND_LINKS when it names a local folder holding the torch wheel
#   --target STAGE         stop at this Dockerfile stage: `resolve` only resolves the dependencies
#                          (pip --dry-run; how the tests check the CUDA variant without its GBs of
#                          wheels), `deps` installs them
#   --revision REV         the org.opencontainers.image.revision label (default: git rev-parse HEAD, "+dirty"
#                          when the work tree differs from it)
#   --print-tag            print the tag the other options give, and exit
# Environment: GLM_DEBIAN_MIRROR (default http://deb.debian.org/debian), GLM_IMAGE_CACHE (where the
# debootstrap works, default ${XDG_CACHE_HOME:-~/.cache}/glm-image-serve), GLM_OCI_RUNTIME (podman's
# runtime, default runc when installed: crun refuses hosts with hybrid cgroups), PIP_INDEX_URL and
# PIP_EXTRA_INDEX_URL (passed to the build), PIP_CERT or pip's global.cert (the CA bundle
# the build's pip trusts, for a proxy that re-signs TLS). Builds use the host's network, so RUN steps reach
# the package registries (and mirrors) the host reaches.
#
# The made base is cached in the image store (tagged by what it was made from), and the build's layers are
# too: a second build with unchanged inputs reuses every layer (`podman image prune` frees the space,
# and the next build starts over).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DOCKERFILE=$ROOT/deploy/docker/Dockerfile

variant=cpu tag= base=python:3.11-slim local_base= wheels= target= revision= print_tag=
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --local-base) local_base=1; shift ;;
    --wheels) wheels=$2; shift 2 ;;
    --target) target=$2; shift 2 ;;
    --revision) revision=$2; shift 2 ;;
    --print-tag) print_tag=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$variant" in cpu|cuda) ;; *) echo "build.sh: --variant must be cpu or cuda, not $variant" >&2; exit 2 ;; esac
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")
tag=${tag:-glm-image-serve:$version-$variant}
if [ -n "$print_tag" ]; then echo "$tag"; exit 0; fi

if command -v podman >/dev/null 2>&1; then
  engine=podman
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  engine=docker
else
  echo "build.sh: neither podman nor a running docker found; on Debian: apt-get install podman runc" >&2
  exit 1
fi
# podman's default limits (nofile 1048576) exceed what some hosts allow a container: the host's own
# file limit, and 8192 processes (plenty for a worker's threads; more was refused on a host allowing 96k).
run_opts=()
if [ "$engine" = podman ]; then
  runtime=${GLM_OCI_RUNTIME:-$(command -v runc >/dev/null 2>&1 && echo runc || true)}
  [ -z "$runtime" ] || run_opts+=(--runtime "$runtime")
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
  [ "$nofile" = unlimited ] && nofile=1048576
  { [ "$nproc" = unlimited ] || [ "$nproc" -gt 8192 ]; } && nproc=8192
  run_opts+=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
fi

have_image() { "$engine" image inspect "$1" >/dev/null 2>&1; }

# A minimal Debian bookworm with python3, venv and CA certificates, made from Debian's packages:
# the stand-in for python:3.11-slim where no container registry is reachable.
make_local_base() {
  local mirror=${GLM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
  local packages=python3,python3-venv,ca-certificates
  local key
  key=$(printf '%s\n' bookworm "$mirror" "$packages" | sha256sum | cut -c1-12)
  base=localhost/glm-image-serve-base:bookworm-$key
  if have_image "$base"; then
    echo "build.sh: base $base (cached)" >&2; return
  fi
  command -v debootstrap >/dev/null || { echo "build.sh: no base image and no debootstrap; apt-get install debootstrap" >&2; exit 1; }
  [ "$(id -u)" -eq 0 ] || { echo "build.sh: making the Debian base needs root (debootstrap)" >&2; exit 1; }
  local cache=${GLM_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/glm-image-serve}
  mkdir -p "$cache"
  local rootfs
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf --one-file-system "$rootfs"' EXIT
  echo "build.sh: making the base $base: debootstrap bookworm from $mirror (about a minute)" >&2
  debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; echo "build.sh: debootstrap failed (log: $cache/debootstrap.log)" >&2; exit 1; }
  # What an image does not need: downloaded packages, package lists, docs, the build's own traces.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
         "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/* "$rootfs"/debootstrap
  tar -C "$rootfs" --numeric-owner -c . | "$engine" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$rootfs"; trap - EXIT
  echo "build.sh: made the base $base" >&2
}

if [ -n "$local_base" ]; then
  make_local_base
elif ! have_image "$base" && ! "$engine" pull -q "$base" >/dev/null; then
  echo "build.sh: cannot pull $base; making a Debian base here instead" >&2
  make_local_base
fi

# What pip needs from the host goes in as a small image of its own, bind-mounted (never copied into a
# layer) by the RUN steps that call pip: the wheel folder, and the CA bundle pip trusts here (PIP_CERT:
# an intercepting proxy's CA). The same Dockerfile then works with docker and podman.
if [ -z "$wheels" ] && [ "$variant" = cpu ]; then
  for dir in ${PIP_FIND_LINKS:-}; do
    dir=${dir#file://}
    if [ -d "$dir" ] && compgen -G "$dir/torch-*.whl" >/dev/null; then wheels=$dir; break; fi
  done
fi
[ -z "$wheels" ] || [ -d "$wheels" ] || { echo "build.sh: --wheels $wheels is not a folder" >&2; exit 1; }
cert=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
[ -z "$cert" ] || [ -f "$cert" ] || cert=
pip_context=scratch
if [ -n "$wheels$cert" ]; then
  key=$({ [ -z "$wheels" ] || (cd "$wheels" && ls -l --time-style=+%s -- *.whl 2>/dev/null); \
          [ -z "$cert" ] || sha256sum <"$cert"; } | sha256sum | cut -c1-12)
  pip_context=localhost/glm-image-serve-pip-context:$key
  if ! have_image "$pip_context"; then
    echo "build.sh: pip context: wheels ${wheels:-none}, CA bundle ${cert:-none}" >&2
    context=$(mktemp -d)
    mkdir "$context/wheels"
    if [ -n "$wheels" ]; then
      for whl in "$wheels"/*.whl; do ln "$whl" "$context/wheels/" 2>/dev/null || cp "$whl" "$context/wheels/"; done
    fi
    [ -z "$cert" ] || cp "$cert" "$context/ca-certificates.crt"
    printf 'FROM scratch\nCOPY . /\n' >"$context/Containerfile"
    "$engine" build "${run_opts[@]}" -q -t "$pip_context" -f "$context/Containerfile" "$context" >/dev/null
    rm -rf "$context"
  fi
fi

if [ -z "$revision" ]; then
  revision=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
  [ "$revision" = unknown ] || git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || revision="$revision+dirty"
fi

args=(--build-arg "PYTHON_IMAGE=$base" --build-arg "VARIANT=$variant" --build-arg "PIP_CONTEXT=$pip_context"
      --build-arg "REVISION=$revision" --network host -f "$DOCKERFILE" -t "$tag")
# Always given (empty: pip's default, PyPI), so the builder never warns about them.
args+=(--build-arg "PIP_INDEX_URL=${PIP_INDEX_URL:-}" --build-arg "PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL:-}")
[ -z "$target" ] || args+=(--target "$target")
[ "$engine" = podman ] && args+=(--layers --force-rm)  # no working containers left after a failure
echo "build.sh: $engine build $tag (variant $variant, base $base)" >&2
start=$SECONDS
"$engine" build "${run_opts[@]}" "${args[@]}" "$ROOT"
echo "build.sh: built $tag in $((SECONDS - start)) s" >&2

#!/usr/bin/env bash
# Debian packages the test suite needs outside Python: headless Chromium and its WebDriver, for
# the playground's browser test (tests/test_playground.py); jq, for the curl examples that
# tests/test_client.py runs (examples/*.sh); kubectl, to render the kustomize manifests in deploy/k8s;
# prometheus (with promtool), to scrape a live cluster and check the alert rules; tcpdump, to show
# that CURVE encrypts the bus; iproute2, for the network namespaces the multi-host tests build;
# podman with runc (crun refuses hybrid cgroup hosts) and debootstrap, to build deploy/docker's image on
# a Debian base made here and run it (deploy/docker/build.sh, tests/test_container_image.py). Idempotent and quick: it asks dpkg
# first and runs apt-get (update, then install) only when a package is missing. When another
# apt-get or dpkg holds the package lock, it waits for it, at most GLM_APT_LOCK_TIMEOUT seconds (300).
set -euo pipefail
PACKAGES=(chromium chromium-driver jq kubectl prometheus tcpdump iproute2 podman runc debootstrap)
LOCK_TIMEOUT_S=${GLM_APT_LOCK_TIMEOUT:-300}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for package in "${PACKAGES[@]}"; do
  installed "$package" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "the tests need the Debian packages ${missing[*]}, and this system has no apt-get: install them by hand" >&2
  exit 1
fi
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)

# apt-get ARGS, waiting (until $deadline) while another apt-get or dpkg holds a lock it needs. apt's
# own wait, DPkg::Lock::Timeout, covers dpkg's locks only: apt 2.6's `apt-get update` still fails at
# once on /var/lib/apt/lists/lock, and apt's locks are fcntl locks, which flock(1) cannot wait on.
# So: apt waits for dpkg's locks itself, and a "Could not get lock" failure is retried.
apt_get() {
  local errors left said=
  errors=$(mktemp)
  while :; do
    left=$((deadline - SECONDS)); [ "$left" -gt 0 ] || left=1
    if "${as_root[@]}" env LC_ALL=C DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout="$left" "$@" >/dev/null 2>"$errors"; then
      cat "$errors" >&2; rm -f "$errors"; return 0
    fi
    if ! grep -q "Could not get lock" "$errors"; then
      cat "$errors" >&2; rm -f "$errors"; return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      cat "$errors" >&2; rm -f "$errors"
      echo "gave up after ${LOCK_TIMEOUT_S}s: another apt-get or dpkg still holds the lock named above;" \
           "run this again once it has finished (GLM_APT_LOCK_TIMEOUT sets the wait)" >&2
      return 1
    fi
    if [ -z "$said" ]; then
      echo "waiting for another apt-get or dpkg to release its lock ($(grep -m1 "Could not get lock" "$errors" | sed 's/^E: //'))" >&2
      said=1
    fi
    sleep 2
  done
}

echo "installing Debian packages for the tests: ${missing[*]} (waiting up to ${LOCK_TIMEOUT_S}s if another apt-get or dpkg is running)" >&2
deadline=$((SECONDS + LOCK_TIMEOUT_S))
apt_get update -qq
apt_get install -y -qq --no-install-recommends "${missing[@]}"

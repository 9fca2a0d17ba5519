#!/usr/bin/env bash
# Debian packages the test suite needs outside Python: headless Chromium and its WebDriver, for
# the playground's browser test (tests/test_playground.py); jq, for the curl examples that
# tests/test_client.py runs (examples/*.sh); kubectl, to render the kustomize manifests in deploy/k8s;
# prometheus (with promtool), to scrape a live cluster and check the alert rules; tcpdump, to show
# that CURVE encrypts the bus; iproute2, for the network namespaces the multi-host tests build. Idempotent and quick: it asks dpkg
# first and runs apt-get (update, then install) only when a package is missing.
set -euo pipefail
PACKAGES=(chromium chromium-driver jq kubectl prometheus tcpdump iproute2)

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
echo "installing Debian packages for the tests: ${missing[*]}" >&2
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

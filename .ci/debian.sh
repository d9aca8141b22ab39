#!/usr/bin/env bash
# Installs one Debian package that some tests use (best-effort, idempotent):
#   bash .ci/debian.sh PACKAGE PATH
# PATH is what the package installs (skip when it exists). The tests that need it skip, saying
# why, when it is absent, so this never fails CI.
#   dataset-fashion-mnist  /usr/share/datasets/fashion-mnist  the complete Fashion-MNIST (IDX files)
#   chromium               /usr/bin/chromium                  a headless browser for the leaderboard page
set -uo pipefail

package=$1 path=$2
if [[ -e $path ]]; then
    echo "debian.sh: $package already installed"
    exit 0
fi
sudo=()
if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null \
        || { echo "debian.sh: not root, cannot apt-get install $package"; exit 0; }
    sudo=(sudo -n)
fi
command -v apt-get >/dev/null || { echo "debian.sh: no apt-get, cannot install $package"; exit 0; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$SECONDS
if "${sudo[@]}" apt-get update -qq >"$log" 2>&1 \
    && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=120 "$package" >>"$log" 2>&1; then
    echo "debian.sh: installed Debian's $package in $((SECONDS - start)) s"
else
    echo "debian.sh: installing $package failed ($(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200))"
fi
exit 0

#!/usr/bin/env bash
# Installs Debian packages that some tests use (best-effort, idempotent):
#   bash .ci/debian.sh [--no-service-start] PATH PACKAGE...
# PATH (a glob) is a file the packages install: skip when it exists, and check it afterwards. The
# tests that need the packages skip, saying why, without them, so this never fails CI.
# --no-service-start: the packages' maintainer scripts may not start their services (a
# policy-rc.d that denies them is in place during the install): the tests start their own.
#   /usr/share/datasets/fashion-mnist  dataset-fashion-mnist   the complete Fashion-MNIST (IDX files)
#   /usr/bin/chromium                  chromium                a headless browser for the leaderboard page
#   /usr/lib/postgresql/*/bin/pg_ctl   postgresql              server binaries; tests/conftest.py starts a
#                                                              throwaway cluster (no service start)
#   /usr/sbin/slurmd                   slurm-wlm munge         tests/test_slurm.py starts a one-node
#                                                              cluster (no service start)
set -uo pipefail

no_start=""
if [[ ${1:-} == --no-service-start ]]; then
    no_start=1
    shift
fi
path=$1
shift
packages=("$@")
name="debian.sh: ${packages[*]}"
present() { compgen -G "$path" >/dev/null; }

if present; then
    echo "$name: already installed"
    exit 0
fi
sudo=()
if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null \
        || { echo "$name: not root, cannot apt-get install; the tests that need it will skip"; exit 0; }
    sudo=(sudo -n)
fi
command -v apt-get >/dev/null || { echo "$name: no apt-get; the tests that need it will skip"; exit 0; }

created_policy=""
if [[ -n $no_start && ! -e /usr/sbin/policy-rc.d ]]; then
    if printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null \
        && "${sudo[@]}" chmod 755 /usr/sbin/policy-rc.d; then
        created_policy=1
    fi
fi
log=$(mktemp)
cleanup() {
    [[ -n $created_policy ]] && "${sudo[@]}" rm -f /usr/sbin/policy-rc.d
    rm -f "$log"
}
trap cleanup EXIT

start=$SECONDS
if "${sudo[@]}" apt-get update -qq >"$log" 2>&1 \
    && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=120 "${packages[@]}" >>"$log" 2>&1 \
    && present; then
    echo "$name: installed in $((SECONDS - start)) s"
else
    echo "$name: installing failed ($(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200)); the tests that need it will skip"
fi
exit 0

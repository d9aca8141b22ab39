#!/usr/bin/env bash
# Makes Debian's PostgreSQL server binaries (/usr/lib/postgresql/*/bin) available
# for the tests. It starts no server: tests/conftest.py starts a throwaway
# cluster of its own and removes it at the end of the session.
# Idempotent and best-effort: it never fails CI; without the binaries the
# PostgreSQL tests skip.
set -uo pipefail

have_server_binaries() {
    local bindir
    for bindir in /usr/lib/postgresql/*/bin; do
        [[ -x $bindir/initdb && -x $bindir/pg_ctl ]] && return 0
    done
    return 1
}

skip() {
    echo "postgres.sh: $1; the PostgreSQL tests will be skipped"
    exit 0
}

if have_server_binaries; then
    echo "postgres.sh: PostgreSQL server binaries already present"
    exit 0
fi

sudo=()
if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null || skip "not root, cannot apt-get install postgresql"
    sudo=(sudo -n)
fi
command -v apt-get >/dev/null || skip "no apt-get, cannot install postgresql"

# The package's maintainer scripts would start the 'main' cluster on port 5432;
# a policy-rc.d that denies service starts keeps this script from starting a server.
created_policy=""
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
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
    && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends -o DPkg::Lock::Timeout=120 postgresql >>"$log" 2>&1 \
    && have_server_binaries; then
    echo "postgres.sh: installed Debian's postgresql in $((SECONDS - start)) s"
else
    skip "installing Debian's postgresql failed ($(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200))"
fi

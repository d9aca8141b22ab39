#!/usr/bin/env bash
# Makes Debian's Slurm (slurm-wlm: slurmctld, slurmd, sbatch, ...) and munge available for the
# tests. It starts no daemon: tests/test_slurm.py writes a slurm.conf of its own, starts munged,
# slurmctld and slurmd for a one-node cluster in a temporary folder and stops them at the end.
# Idempotent and best-effort: it never fails CI; without the packages (or without root, which the
# test cluster's daemons need) the Slurm tests skip.
set -uo pipefail

have_slurm() {
    local name
    for name in munged slurmctld slurmd sbatch srun squeue scontrol scancel sinfo; do
        command -v "$name" >/dev/null || [[ -x /usr/sbin/$name ]] || return 1
    done
}

skip() {
    echo "slurm.sh: $1; the Slurm tests will be skipped"
    exit 0
}

if have_slurm; then
    echo "slurm.sh: Slurm and munge already present"
    exit 0
fi

sudo=()
if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null || skip "not root, cannot apt-get install slurm-wlm"
    sudo=(sudo -n)
fi
command -v apt-get >/dev/null || skip "no apt-get, cannot install slurm-wlm"

# The packages' maintainer scripts would start munge, slurmctld and slurmd with the system's
# configuration; a policy-rc.d that denies service starts keeps this script from starting any.
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
        --no-install-recommends -o DPkg::Lock::Timeout=120 slurm-wlm munge >>"$log" 2>&1 \
    && have_slurm; then
    echo "slurm.sh: installed Debian's slurm-wlm and munge in $((SECONDS - start)) s"
else
    skip "installing Debian's slurm-wlm and munge failed ($(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200))"
fi

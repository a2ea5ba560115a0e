#!/usr/bin/env bash
# bash slurm/dev/install_local_slurm.sh
#
# Installs what tests/slurm/ needs to run a real Slurm on this machine: Debian's slurm-wlm
# (slurmctld, slurmd, client commands), munge (Slurm's authentication) and shellcheck (the
# lint test of slurm/). Idempotent: when everything is there it returns at once, without
# apt-get, so `make test` pays nothing after the first run. Where it cannot install (no apt,
# no root or sudo) it says so and succeeds, so that a developer can still run the other tests
# (the Slurm ones then skip, naming what is missing); under CI=true it fails instead, as do
# those tests: a CI run must not pass with them skipped.
set -euo pipefail

need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v shellcheck >/dev/null || need+=(shellcheck)
# ip(8) and nsenter(1) give the two-node test its network namespaces.
command -v ip >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
((${#need[@]})) || exit 0

sudo=()
((EUID == 0)) || sudo=(sudo -n)
if ! command -v apt-get >/dev/null || ! "${sudo[@]}" true 2>/dev/null; then
    ci=${CI:-}
    if [[ ${ci,,} == true ]]; then
        echo "install_local_slurm.sh: CI=true and cannot install ${need[*]} here (needs apt-get and root)" >&2
        exit 1
    fi
    echo "install_local_slurm.sh: cannot install ${need[*]} here (needs apt-get and root); the Slurm tests will skip" >&2
    exit 0
fi
"${sudo[@]}" apt-get update -q
# No debconf questions: this runs unattended, from `make test`.
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"

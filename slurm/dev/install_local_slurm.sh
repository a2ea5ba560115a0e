#!/usr/bin/env bash
# bash slurm/dev/install_local_slurm.sh
#
# Installs what tests/slurm/ needs to run a real Slurm on this machine: Debian's slurm-wlm
# (slurmctld, slurmd, client commands), munge (Slurm's authentication), shellcheck (the lint
# test of slurm/), and ip(8) / nsenter(1) for the two-node test's network namespaces. See
# tools/install_debian_packages.sh for when it installs, skips or fails (under CI=true).
set -euo pipefail
source "${BASH_SOURCE[0]%/*}/../../tools/install_debian_packages.sh" install_local_slurm.sh \
    slurmctld=slurm-wlm munged=munge shellcheck=shellcheck ip=iproute2 nsenter=util-linux

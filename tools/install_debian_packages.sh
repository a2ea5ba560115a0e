#!/usr/bin/env bash
# bash tools/install_debian_packages.sh WHAT COMMAND=PACKAGE...
#
# Installs, with apt-get, the Debian PACKAGE of each COMMAND that is not on PATH (the system tools
# some tests run for real: Slurm, munge, shellcheck, chromium...). WHAT names the tests that need
# them, for the message. Idempotent: when every command is there it returns at once, without
# apt-get, so `make test` pays nothing after the first run. Where it cannot install (no apt-get, no
# root or sudo) it says so and succeeds, so a developer can still run the other tests (those skip,
# naming what is missing); under CI=true it fails instead, as do those tests: a CI run must not
# pass with them skipped.
set -euo pipefail

what=$1
shift
need=()
for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || need+=("${pair#*=}")
done
((${#need[@]})) || exit 0

sudo=()
((EUID == 0)) || sudo=(sudo -n)
if ! command -v apt-get >/dev/null || ! "${sudo[@]}" true 2>/dev/null; then
    ci=${CI:-}
    if [[ ${ci,,} == true ]]; then
        echo "$what: CI=true and cannot install ${need[*]} here (needs apt-get and root)" >&2
        exit 1
    fi
    echo "$what: cannot install ${need[*]} here (needs apt-get and root); those tests will skip" >&2
    exit 0
fi
"${sudo[@]}" apt-get update -q
# No debconf questions: this runs unattended, from `make test`.
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"

#!/usr/bin/env bash
# Install the system services the integration tests need (Debian 12):
#   SLURM (slurmctld, slurmd, slurm-client, slurmdbd), munge, mariadb-server, chromium.
# Idempotent and non-interactive. Fast path: does nothing when every package is installed.
# Only installs packages; it neither configures nor starts any service (the tests start
# private instances, see tests/integration/slurm_cluster.py).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server chromium)

log() { echo "[install-services] $*"; }
die() { echo "[install-services] ERROR: $*" >&2; exit 1; }
trap 'echo "[install-services] FAILED (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
    log "all ${#PACKAGES[@]} packages already installed (${PACKAGES[*]}); nothing to do"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo: cannot install ${missing[*]}"
    SUDO=(sudo -n)
fi

export DEBIAN_FRONTEND=noninteractive
# Never let package post-install scripts start the system daemons (no init in CI
# containers, and the tests use private instances anyway): policy-rc.d exit 101 = "denied".
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod 755 "$policy"
    created_policy=1
fi
cleanup_policy() { [ "$created_policy" -eq 0 ] || "${SUDO[@]}" rm -f "$policy"; }

start=$SECONDS
apt_log=$(mktemp)
if ! { "${SUDO[@]}" apt-get update -q &&
       "${SUDO[@]}" apt-get install -y -q --no-install-recommends \
           -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
           "${missing[@]}"; } >"$apt_log" 2>&1; then
    cleanup_policy
    tail -n 40 "$apt_log" >&2
    die "apt-get failed installing: ${missing[*]} (full log: $apt_log)"
fi
cleanup_policy
rm -f "$apt_log"

# Verify the binaries the tests rely on are really there.
for bin in slurmctld slurmd slurmdbd sbatch squeue sacct sacctmgr scontrol sinfo munged \
           mariadbd mariadb-install-db; do
    command -v "$bin" >/dev/null || die "binary '$bin' missing after install"
done
log "installed ${#missing[@]} package(s) in $((SECONDS - start))s: ${missing[*]}"

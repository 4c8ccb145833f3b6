#!/usr/bin/env bash
# Installs what the cluster tests need from Debian, only if it is missing: a single-node Slurm
# (slurmctld + slurmd + the client commands + munge) and shellcheck. Idempotent; needs root.
#   bash scripts/install_slurm.sh      # prints how long the install took
# The test fixture (tests/slurm_fixture.py) calls this, so `pytest tests/test_cluster_slurm.py` works on a
# fresh Debian machine on its own. --no-install-recommends keeps it to ~8 small packages (no slurmdbd, no
# MySQL): this is a CI cluster without accounting.
set -euo pipefail

need=()
for cmd_pkg in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge shellcheck:shellcheck; do
  command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || need+=("${cmd_pkg#*:}")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "install_slurm: slurm, munge and shellcheck already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_slurm: missing ${need[*]} and not root: install them with apt-get as root" >&2
  exit 1
fi
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The munge postinst normally creates the key; create one if this image skipped it.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey -c -f -k /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 600 /etc/munge/munge.key
fi
echo "install_slurm: installed ${need[*]} in $(($(date +%s) - start)) s"

#!/usr/bin/env bash
# Validate sbatch scripts against the cluster without running them: `bash -n` (syntax), then
# `sbatch --test-only` (the scheduler checks every #SBATCH option against its partitions/limits and says
# when and where the job would start). `make slurm-check` runs it on every script in slurm/.
#
#   slurm/check.sh                        # all slurm/*.sh except this one
#   slurm/check.sh slurm/train.sh         # some scripts
#   SBATCH_ARGS="--partition=gpu --nodes=4" slurm/check.sh slurm/train.sh
#   SBATCH_ARGS="--gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1" slurm/check.sh   # CPU-only
#
# SBATCH_ARGS (word-split) are the options you will submit with; they override the scripts' #SBATCH lines.
# Exit status: 0 when every script passes, 1 otherwise; 2 when sbatch is not on PATH.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if ! command -v sbatch >/dev/null; then
  echo "check.sh: sbatch not found: run this on a Slurm login node" >&2
  exit 2
fi

scripts=("$@")
if [ ${#scripts[@]} -eq 0 ]; then
  for s in "$here"/*.sh; do [ "$(basename "$s")" = check.sh ] || scripts+=("$s"); done
fi

# shellcheck disable=SC2206  # SBATCH_ARGS is word-split on purpose
extra=(${SBATCH_ARGS:-})
failed=0
for s in "${scripts[@]}"; do
  if ! out=$(bash -n "$s" 2>&1); then
    echo "FAIL $s: syntax: $out"
    failed=1
    continue
  fi
  if out=$(sbatch --test-only "${extra[@]}" "$s" 2>&1); then
    echo "ok   $s: ${out##*sbatch: }"
  else
    echo "FAIL $s: $out"
    failed=1
  fi
done
exit $failed

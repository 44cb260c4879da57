#!/usr/bin/env bash
# Download the filtered metadata parts with img2dataset (data pipeline stage 2) as a Slurm CPU array job.
#
#   sbatch slurm/download.sh                                # 8 tasks (--array=0-7), DATA_CONFIG below
#   sbatch --array=0-63%16 slurm/download.sh                # 64 tasks, at most 16 at a time
#   DATA_CONFIG=configs/data/laion_aesthetic_6plus.yaml DATA_OUT=/scratch/laion6 sbatch slurm/download.sh
#
# Run the filter stage first (`python -m data_pipeline filter --config ...`, one process). Task k of an
# array of N downloads the parts i with i % N == k (`--shard-index k --num-shards N`), then their
# failed-row retry rounds. img2dataset's incremental mode makes it resumable: re-submit failed or cancelled
# tasks (`sbatch --array=<ids> slurm/download.sh`). Compute nodes need internet access; set img2dataset's
# processes/threads in the config's `download:` section to match --cpus-per-task.
#
# Environment knobs (sbatch exports the submitting shell's environment):
#   DATA_CONFIG  pipeline YAML (--config)          default: the pipeline's built-in defaults
#   DATA_OUT     run folder (--out)                default: `out:` of the config
#   PYTHON       interpreter                       default ./.venv/bin/python if present, else python3
#   EXTRA_ARGS   more `download` arguments, word-split (e.g. "--download.retry_failed_rounds 2")
#
#SBATCH --job-name=brushnet-download
#SBATCH --array=0-7
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

STAGE=download
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# This task's slice; --array=1-8 or 0-14:2 work like 0-7 (a plain job, not an array, does everything).
INDEX=$(((${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0}) / ${SLURM_ARRAY_TASK_STEP:-1}))
COUNT=${SLURM_ARRAY_TASK_COUNT:-1}

ARGS=("$STAGE" --shard-index "$INDEX" --num-shards "$COUNT")
if [ -n "${DATA_CONFIG:-}" ]; then ARGS+=(--config "$DATA_CONFIG"); fi
if [ -n "${DATA_OUT:-}" ]; then ARGS+=(--out "$DATA_OUT"); fi
# shellcheck disable=SC2206  # EXTRA_ARGS is word-split on purpose
if [ -n "${EXTRA_ARGS:-}" ]; then ARGS+=($EXTRA_ARGS); fi
ARGS+=("$@")

export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
echo "$STAGE.sh: job ${SLURM_JOB_ID:-none} task $INDEX/$COUNT restart ${SLURM_RESTART_COUNT:-0}" \
  "on $(hostname -s): $PYTHON -m data_pipeline ${ARGS[*]}"
exec "$PYTHON" -m data_pipeline "${ARGS[@]}"

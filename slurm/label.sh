#!/usr/bin/env bash
# Label downloaded images with object masks (data pipeline stage 3) as a Slurm array: one GPU per task.
#
#   sbatch slurm/label.sh                                   # 8 tasks (--array=0-7), DATA_CONFIG below
#   sbatch --array=0-31%8 slurm/label.sh                    # 32 tasks, at most 8 at a time
#   DATA_CONFIG=configs/data/laion_aesthetic_6plus.yaml DATA_OUT=/scratch/laion6 sbatch slurm/label.sh
#   sbatch slurm/label.sh --label.sam.checkpoint /models/sam_vit_h_4b8939.pth   # more `label` arguments
#
# Task k of an array of N labels the downloaded parts i with i % N == k (`--shard-index k --num-shards N`),
# so every output shard is written by exactly one task. The stage is resumable: finished shards are skipped
# and a shard appears only when complete, so a failed, cancelled or requeued task is simply run again
# (`sbatch --array=<failed ids> slurm/label.sh`). Run it after the download stage has finished for the parts.
#
# Environment knobs (sbatch exports the submitting shell's environment):
#   DATA_CONFIG  pipeline YAML (--config)          default: the pipeline's built-in defaults
#   DATA_OUT     run folder (--out)                default: `out:` of the config
#   LABELER      auto | sam | classical            default: the config's label.labeler
#   PYTHON       interpreter                       default ./.venv/bin/python if present, else python3
#   EXTRA_ARGS   more `label` arguments, word-split
#
#SBATCH --job-name=brushnet-label
#SBATCH --array=0-7
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

STAGE=label
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# This task's slice; --array=1-8 or 0-14:2 work like 0-7 (a plain job, not an array, does everything).
INDEX=$(((${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0}) / ${SLURM_ARRAY_TASK_STEP:-1}))
COUNT=${SLURM_ARRAY_TASK_COUNT:-1}

ARGS=("$STAGE" --shard-index "$INDEX" --num-shards "$COUNT")
if [ -n "${DATA_CONFIG:-}" ]; then ARGS+=(--config "$DATA_CONFIG"); fi
if [ -n "${DATA_OUT:-}" ]; then ARGS+=(--out "$DATA_OUT"); fi
if [ -n "${LABELER:-}" ]; then ARGS+=(--label.labeler "$LABELER"); fi
# shellcheck disable=SC2206  # EXTRA_ARGS is word-split on purpose
if [ -n "${EXTRA_ARGS:-}" ]; then ARGS+=($EXTRA_ARGS); fi
ARGS+=("$@")

export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
echo "$STAGE.sh: job ${SLURM_JOB_ID:-none} task $INDEX/$COUNT restart ${SLURM_RESTART_COUNT:-0}" \
  "on $(hostname -s), GPUs ${CUDA_VISIBLE_DEVICES:-none}: $PYTHON -m data_pipeline ${ARGS[*]}"
exec "$PYTHON" -m data_pipeline "${ARGS[@]}"

#!/usr/bin/env bash
# Train BrushNet on a Slurm cluster: one task per GPU, DDP over all nodes, requeue on preemption/time limit.
#
#   sbatch slurm/train.sh                                    # 1 node x 8 GPUs, CONFIG below
#   sbatch --nodes=4 slurm/train.sh                          # 4 nodes x 8 GPUs: nothing else changes
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 slurm/train.sh --model.learning_rate=2e-5
#   CONFIG=configs/sdxl_segmentation_mask.yaml RUN_DIR=runs/sdxl-a sbatch slurm/train.sh
#
# Submit from the project root (the job runs in the submit directory, or in sbatch --chdir). Options given
# to sbatch override the #SBATCH lines below; arguments after the script name go to `python -m train fit`.
# The trainer's num_nodes/devices always come from the allocation (Lightning refuses a mismatch), so keep
# --ntasks-per-node equal to --gpus-per-node. On a cluster without GPUs (CPU-only DDP over gloo) submit with
# --gpus-per-node=0 and a CPU config.
#
# Environment knobs (sbatch exports the submitting shell's environment):
#   CONFIG       trainer config(s), space-separated, composed in order (each one a --config), e.g.
#                "configs/sd15_segmentation_mask.yaml configs/fsdp.yaml"
#                default configs/sd15_segmentation_mask.yaml
#   RUN_DIR      run directory (trainer.default_root_dir: checkpoints, exports, hpc_ckpt_*.ckpt, logs)
#                default runs/<job name>-<job id>: a requeued job keeps its id, so it resumes from there;
#                submitting again with the same RUN_DIR continues that run (from its last checkpoint)
#   CKPT_PATH    --ckpt_path for `fit`             default auto (newest valid checkpoint by step)
#   PYTHON       interpreter                       default ./.venv/bin/python if present, else python3
#   EXTRA_ARGS   more `fit` arguments, word-split  e.g. "--trainer.max_steps=20000 --data.batch_size=4"
#   ACCELERATOR  sets --trainer.accelerator        default: the config's value
#   DDP_PORT     rendezvous port                   default: Lightning's, derived from the job id
#   WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, WANDB_API_KEY   passed to W&B as usual;
#   WANDB_RUN_ID default <job name>-<job id> and WANDB_RESUME=allow, so a requeued job continues its W&B run.
#
# Preemption / time limit: Slurm sends SIGUSR1 to every task 90 s before the limit (--signal); the trainer
# (train/requeue.py) finishes the current step, saves $RUN_DIR/hpc_ckpt_<n>.ckpt and requeues the job
# (--requeue), which restarts this script with the same job id, hence the same RUN_DIR, and
# `--ckpt_path auto` resumes from that checkpoint: the resumed run is bit-identical to an uninterrupted one.
# Send the signal by hand with `scancel --signal=USR1 <job id>` (not --batch: the tasks must get it).
#
#SBATCH --job-name=brushnet-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

: "${SLURM_JOB_ID:?run this script with sbatch (or inside an allocation): it launches its tasks with srun}"

CONFIG=${CONFIG:-configs/sd15_segmentation_mask.yaml}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-brushnet-train}-$SLURM_JOB_ID}
CKPT_PATH=${CKPT_PATH:-auto}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# One task per device on every node. SLURM_NTASKS_PER_NODE exists only when --ntasks-per-node was given.
NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
NTASKS=${SLURM_NTASKS:?no SLURM_NTASKS: submit with --ntasks-per-node}
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$((NTASKS / NNODES))}
if [ $((TASKS_PER_NODE * NNODES)) -ne "$NTASKS" ]; then
  echo "train.sh: $NTASKS tasks do not split evenly over $NNODES nodes; use --ntasks-per-node" >&2
  exit 2
fi
GPUS_ON_NODE=${SLURM_GPUS_ON_NODE:-0}
if [ "$GPUS_ON_NODE" -gt 0 ] && [ "$GPUS_ON_NODE" -ne "$TASKS_PER_NODE" ]; then
  echo "train.sh: $GPUS_ON_NODE GPUs but $TASKS_PER_NODE tasks per node:" \
    "set --ntasks-per-node=$GPUS_ON_NODE" >&2
  exit 2
fi

# sbatch exported the submitter's environment: a torchrun/DDP rendezvous from there must not reach the
# tasks (Lightning would use a stale MASTER_PORT, colliding with other jobs on the node).
unset MASTER_ADDR MASTER_PORT WORLD_SIZE RANK LOCAL_RANK NODE_RANK GROUP_RANK LOCAL_WORLD_SIZE
if [ -n "${DDP_PORT:-}" ]; then export MASTER_PORT=$DDP_PORT; fi

export WANDB_RUN_ID=${WANDB_RUN_ID:-${SLURM_JOB_NAME:-brushnet-train}-$SLURM_JOB_ID}
export WANDB_RESUME=${WANDB_RESUME:-allow}
export PYTHONUNBUFFERED=1
mkdir -p "$RUN_DIR"

ARGS=(fit)
for c in $CONFIG; do ARGS+=(--config "$c"); done
ARGS+=("--trainer.num_nodes=$NNODES" "--trainer.devices=$TASKS_PER_NODE"
  "--trainer.default_root_dir=$RUN_DIR" "--ckpt_path=$CKPT_PATH")
if [ -n "${ACCELERATOR:-}" ]; then ARGS+=("--trainer.accelerator=$ACCELERATOR"); fi
# shellcheck disable=SC2206  # EXTRA_ARGS is word-split on purpose
if [ -n "${EXTRA_ARGS:-}" ]; then ARGS+=($EXTRA_ARGS); fi
ARGS+=("$@")

echo "train.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}:" \
  "$NNODES node(s) x $TASKS_PER_NODE task(s), $GPUS_ON_NODE GPU(s)/node, run dir $RUN_DIR"
echo "train.sh: srun $PYTHON -m train ${ARGS[*]}"

# srun must launch the tasks (without it rank 0 waits for the others until the time limit). Since Slurm
# 22.11 srun no longer inherits --cpus-per-task from sbatch: pass it on.
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$PYTHON" -m train "${ARGS[@]}"

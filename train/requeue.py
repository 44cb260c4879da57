"""Slurm preemption: save at a step boundary, requeue the job, stop. The CLI always installs this callback.

Lightning's own SLURM auto-requeue saves its checkpoint inside the signal handler, i.e. wherever the main
thread happens to be. Mid-step, the loop's batch progress reads ready=n, processed=n-1 and the data
position and RNG state belong to no step boundary, so the resumed run is not the run it replaces. Here
the handler only sets a flag. After the current step, the ranks agree (one signalled rank is enough,
since Slurm may deliver the signal to them at different steps). Then every rank takes part in writing
``<default_root_dir>/hpc_ckpt_<n>.ckpt`` atomically, older ``hpc_ckpt_*`` files are removed, rank 0 runs
``scontrol requeue <job>``, and the processes exit. The requeued job restarts ``slurm/train.sh``, whose
``--ckpt_path auto`` resumes from the newest checkpoint: it is the same run, step for step. A SIGTERM
(preemption without warning, ``scancel``) saves the same way but does not requeue: Slurm decides that.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from brushnet.atomic import remove_partials
from train.checkpoint_io import remove_checkpoint_files, save_checkpoint_atomically, use_staged_io

log = logging.getLogger(__name__)

HPC_PREFIX = "hpc_ckpt_"  # Lightning's name for requeue checkpoints (it finds them with ckpt_path="hpc")


def hpc_checkpoints(root: str | os.PathLike) -> list[Path]:
    """``<root>/hpc_ckpt_<n>.ckpt`` files sorted by ``n``."""
    found = []
    for path in Path(root).glob(f"{HPC_PREFIX}*.ckpt"):
        number = path.stem[len(HPC_PREFIX) :]
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def slurm_job_id() -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` in an array, else ``SLURM_JOB_ID``."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


class SlurmRequeue(L.Callback):
    """On ``signal`` (what ``#SBATCH --signal=SIGUSR1@90`` sends before the time limit) save, requeue, stop.

    Active only when Lightning detects Slurm (``SLURM_NTASKS`` set, job not named bash/interactive).
    ``requeue=False`` saves and stops without requeueing (e.g. a job submitted with ``--no-requeue``).
    ``save_on_sigterm``: a SIGTERM (preemption without a warning signal, ``scancel``) also saves the hpc
    checkpoint at the end of the current step, within Slurm's KillWait, but never requeues: Slurm decides.
    """

    def __init__(self, signal: str = "SIGUSR1", requeue: bool = True, save_on_sigterm: bool = True) -> None:
        self.signum = signal_number(signal)
        self.requeue = requeue
        self.save_on_sigterm = save_on_sigterm
        self.signalled = False
        self._previous_handler = None
        self._active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not SLURMEnvironment.detect():
            return
        # Registered before the trainer installs its own signal handlers, which then leave this signal
        # alone (Lightning only adds its SLURM handler where none is set).
        self._previous_handler = signal.signal(self.signum, self._on_signal)
        self._active = True
        use_staged_io(trainer.strategy)  # verified loads, staged saves (also without BrushNetCheckpoint)
        if trainer.is_global_zero and os.path.isdir(trainer.default_root_dir):
            remove_partials(trainer.default_root_dir)  # a save killed midway
        log.info("Slurm job %s: on %s save hpc checkpoint, requeue, stop", slurm_job_id(), self.signum.name)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._active:
            signal.signal(self.signum, self._previous_handler or signal.SIG_DFL)
            self._active = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True  # nothing else here: the main thread may be anywhere in a step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if not self._active:
            return
        # requeue signal / SIGTERM (Lightning's own handler sets received_sigterm) on any rank: one collective
        terminated = self.save_on_sigterm and trainer.received_sigterm
        flags = torch.tensor(
            [self.signalled, terminated], dtype=torch.float32, device=trainer.strategy.root_device
        )
        requeue, sigterm = (trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()
        if not (requeue or sigterm):
            return
        root = Path(trainer.default_root_dir)
        older = hpc_checkpoints(root)
        number = int(older[-1].stem[len(HPC_PREFIX) :]) + 1 if older else 1
        path = root / f"{HPC_PREFIX}{number}.ckpt"
        why = self.signum.name if requeue else "SIGTERM"
        log.info("%s received: saving step %d to %s", why, trainer.global_step, path)
        save_checkpoint_atomically(trainer, str(path))
        # The run is not finished: only a requeued job exits 0 (its next start continues the run); a stop
        # without a requeue exits 128 + the signal number, the shell's convention for a signalled process.
        status = 0 if requeue and self.requeue else 128 + (self.signum if requeue else signal.SIGTERM)
        if not trainer.is_global_zero:
            raise SystemExit(status)
        for old in older:
            remove_checkpoint_files(old)
        if status:
            log.info("stopped after saving %s (exit %d): resume with --ckpt_path auto", path, status)
            raise SystemExit(status)
        job = slurm_job_id()
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if done.returncode != 0:
            log.error(
                "scontrol requeue %s failed (%s): %s. The checkpoint is saved: submit again with the same "
                "RUN_DIR to resume from %s",
                job,
                done.returncode,
                done.stderr.strip(),
                path,
            )
            raise SystemExit(1)
        log.info("requeued Slurm job %s; it resumes from %s", job, path)
        raise SystemExit(0)


def signal_number(name: str) -> signal.Signals:
    try:
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except KeyError:
        raise ValueError(f"SlurmRequeue signal={name!r}: not a signal name such as 'SIGUSR1'") from None

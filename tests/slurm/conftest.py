"""A real Slurm cluster of two nodes on this host for the tests in this folder.

The session fixture ``slurm_cluster`` runs ``tests/fixtures/local_slurm.sh start`` (installs slurmctld, slurmd
and munge with apt-get when missing, writes its own config under /var/lib/brushnet-test-slurm, starts the
daemons: one slurmd per node) and ``stop`` at the end when it started them. It skips, saying why, when the cluster cannot run
here: not Linux, not root, no apt-get, or apt-get failing. There is no accounting daemon: job state comes
from ``scontrol show job -o``. ``BRUSHNET_KEEP_SLURM=1`` leaves the cluster running after the session;
``SLURM_TEST_PYTHON`` gives the jobs another interpreter (default: this one).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "fixtures" / "local_slurm.sh"
TERMINAL = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
# Variables of the test process that must not reach a job: a DDP rendezvous, an enclosing Slurm job,
# pytest's own state.
_SCRUB = re.compile(
    r"^(SLURM_|SBATCH_|SRUN_|SALLOC_|PYTEST_|MASTER_ADDR$|MASTER_PORT$|WORLD_SIZE$|RANK$|LOCAL_RANK$)"
)
_FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9:/_]*)=(.*?)(?=\s[A-Za-z][A-Za-z0-9:/_]*=|$)")


def parse_job_line(line: str) -> dict[str, str]:
    """One line of ``scontrol show job -o`` as a dict (values may contain spaces)."""
    return dict(_FIELD.findall(line.strip()))


@dataclass
class SlurmCluster:
    conf: Path
    nodes: list[str]
    cpus: int  # per node
    jobs: list[str] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for clients and jobs: this process's, scrubbed, pointing at our cluster."""
        env = {k: v for k, v in os.environ.items() if not _SCRUB.match(k)}
        env.update(SLURM_CONF=str(self.conf), HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
        env.update(WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
        env["PYTHON"] = os.environ.get("SLURM_TEST_PYTHON", sys.executable)  # the jobs' interpreter
        env.update(extra)
        return env

    def run(self, *cmd: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 60):
        return subprocess.run(
            cmd, env=env or self.env(), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=check
        )

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Submits (from the repository root) and returns the job id; the job is cancelled at teardown."""
        out = self.run("sbatch", "--parsable", *args, env=env).stdout.strip()
        job_id = out.split(";")[0]
        assert job_id.isdigit(), f"sbatch printed {out!r}"
        self.jobs.append(job_id)
        return job_id

    def jobs_info(self, job_id: str) -> list[dict[str, str]]:
        """All records of a job (one per array task)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [parse_job_line(line) for line in out.splitlines() if line.strip()]

    def state(self, job_id: str) -> str:
        return self.jobs_info(job_id)[0]["JobState"]

    def wait_for_path(self, folder: Path, pattern: str, job_id: str, timeout: float) -> Path:
        """Polls for a file the running job writes; fails at once if the job ends without it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = sorted(folder.glob(pattern))
            if found:
                return found[0]
            state = self.state(job_id)
            if state in TERMINAL:
                pytest.fail(f"job {job_id} ended ({state}) before writing {folder / pattern}")
            time.sleep(0.5)
        pytest.fail(f"nothing matches {folder / pattern} after {timeout:.0f} s")

    def wait(self, job_id: str, timeout: float, until=TERMINAL, poll: float = 1.0) -> list[dict[str, str]]:
        """Polls until every record of the job is in one of the states ``until``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            infos = self.jobs_info(job_id)
            if infos and all(i["JobState"] in until for i in infos):
                return infos
            if time.monotonic() > deadline:
                states = [(i.get("JobId"), i["JobState"], i.get("Reason")) for i in infos]
                pytest.fail(f"job {job_id} not in {sorted(until)} after {timeout:.0f} s: {states}")
            time.sleep(poll)

    def cancel_all(self) -> None:
        for job_id in self.jobs:
            self.run("scancel", job_id, check=False)
        self.jobs.clear()


def python_stub(folder: Path, script: Path) -> Path:
    """An executable for ``PYTHON=``: drops train.sh's ``-m train`` and runs ``script`` with the rest."""
    stub = folder / "python"
    stub.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2" = "-m train" ] || { echo "stub: expected -m train, got $1 $2" >&2; exit 3; }\n'
        f'shift 2\nexec "{sys.executable}" "{script}" "$@"\n'
    )
    stub.chmod(0o755)
    return stub


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the local Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (it installs packages and starts munged/slurmctld/slurmd)"
    have = all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in ("slurmctld", "slurmd", "munged"))
    if not have and not shutil.which("sbatch") and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    conf = Path(subprocess.run(["bash", str(SCRIPT), "conf"], capture_output=True, text=True).stdout.strip())
    running = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    if not running:
        reason = _skip_reason()
        if reason:
            pytest.skip(reason)
        proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
        if proc.returncode in (3, 4):  # cannot install / not root: this machine cannot host the cluster
            pytest.skip(f"local Slurm cluster unavailable: {proc.stderr.strip()[-500:]}")
        assert proc.returncode == 0, f"local_slurm.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    info = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c"], env=env, capture_output=True, text=True)
    rows = [line.split() for line in info.stdout.splitlines() if line.strip()]
    cluster = SlurmCluster(conf=conf, nodes=[r[0] for r in rows], cpus=min(int(r[1]) for r in rows))
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        if not running and os.environ.get("BRUSHNET_KEEP_SLURM") != "1":
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The cluster, with every job this test submitted cancelled afterwards."""
    yield slurm_cluster
    slurm_cluster.cancel_all()

"""The local Slurm fixture itself: 2-task job steps on one node and on two nodes see their Slurm environment."""

from __future__ import annotations

import pytest

from tests.slurm.conftest import parse_job_line

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_parse_job_line_keeps_values_with_spaces():
    line = "JobId=7 JobName=a b JobState=COMPLETED Reason=None Command=/x y/z.sh WorkDir=/tmp"
    info = parse_job_line(line)
    assert info == {
        "JobId": "7",
        "JobName": "a b",
        "JobState": "COMPLETED",
        "Reason": "None",
        "Command": "/x y/z.sh",
        "WorkDir": "/tmp",
    }


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        (1, ["task 0/2 local 0 node 0", "task 1/2 local 1 node 0"]),
        (2, ["task 0/2 local 0 node 0", "task 1/2 local 0 node 1"]),
    ],
)
def test_two_task_step_runs_with_slurm_environment(slurm, tmp_path, nodes, expected):
    assert slurm.cpus >= 2 and len(slurm.nodes) == 2
    out = tmp_path / "out.txt"
    job = slurm.sbatch(
        "--job-name=smoke",
        f"--nodes={nodes}",
        f"--ntasks-per-node={2 // nodes}",
        "--cpus-per-task=1",
        "--time=5",
        f"--output={out}",
        "--wrap",
        "srun sh -c 'echo task $SLURM_PROCID/$SLURM_NTASKS local $SLURM_LOCALID node $SLURM_NODEID'",
    )
    (info,) = slurm.wait(job, timeout=60)
    assert info["JobState"] == "COMPLETED", info
    assert info["ExitCode"] == "0:0"
    lines = sorted(out.read_text().split("\n"))
    assert [line for line in lines if line] == expected

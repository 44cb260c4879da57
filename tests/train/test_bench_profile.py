"""``python -m train.tools.bench.profile``: one profiled step and the share of each op group."""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

from train.tools.bench.profile import GROUPS, group_shares


def test_group_shares_sum_to_one_and_sort_ops_into_groups():
    events = [
        SimpleNamespace(key="aten::mkldnn_convolution", self_cpu_time_total=60, self_device_time_total=0),
        SimpleNamespace(
            key="aten::_scaled_dot_product_flash_attention_for_cpu",
            self_cpu_time_total=20,
            self_device_time_total=0,
        ),
        SimpleNamespace(key="aten::copy_", self_cpu_time_total=10, self_device_time_total=0),
        SimpleNamespace(key="aten::frobnicate", self_cpu_time_total=10, self_device_time_total=0),
    ]
    shares = group_shares(events)
    assert set(shares) == {*GROUPS, "other"}
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert shares["convolution"] == 0.6 and shares["attention"] == 0.2
    assert shares["cast / copy"] == 0.1 and shares["other"] == 0.1


def test_profile_command_prints_the_op_table_and_group_shares():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.tools.bench.profile",
            "--config",
            "tiny",
            "--precision",
            "fp32",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Self CPU" in done.stdout
    shares = dict(re.findall(r"^  (\S.*?)\s+([\d.]+)%$", done.stdout, re.M))
    assert set(shares) == {*GROUPS, "other"}
    assert abs(sum(float(v) for v in shares.values()) - 100.0) < 0.5
    assert float(shares["convolution"]) > 5.0  # a UNet step is convolutions first

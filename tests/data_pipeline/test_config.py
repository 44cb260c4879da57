"""The typed pipeline config: YAML values are type-checked naming file and key, and the command line's flags
are the config's own fields (`--filter.min_side`), on top of the file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.cli import main
from data_pipeline.config import ConfigError, PipelineConfig, load_config
from tests.data_pipeline.helpers import laion_v2_frame

REPO = Path(__file__).resolve().parents[2]


def test_wrong_types_name_the_file_the_key_and_the_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("filter:\n  min_side: abc\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: .*filter\.min_side.*int.*abc"):
        load_config(bad)
    bad.write_text("label:\n  sam:\n    dtype: float8\n")
    with pytest.raises(ConfigError, match=r"label\.sam\.dtype.*float8"):
        load_config(bad)
    bad.write_text("download: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"download"):
        load_config(bad)
    bad.write_text("filter: {min_side: 3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_every_shipped_config_loads_and_a_single_metadata_string_is_a_list():
    for path in sorted((REPO / "configs" / "data").glob("*.yaml")):
        assert isinstance(load_config(path), PipelineConfig), path
    assert load_config(None, {"metadata": "a/*.parquet"}).metadata == ["a/*.parquet"]
    assert load_config(None) == PipelineConfig()


def test_cli_flags_are_config_fields_over_the_file(tmp_path, capsys):
    laion_v2_frame(6, AESTHETIC_SCORE=[5.0, 6.5, 7.5, 8.0, 6.0, 7.1]).to_parquet(tmp_path / "m.parquet")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("filter:\n  min_aesthetic: 6.0\n  seed: 5\n  rows_per_part: 2\n")
    run = tmp_path / "run"
    argv = ["filter", "--config", str(cfg), "--out", str(run), "--metadata", str(tmp_path / "m.parquet")]
    code = main([*argv, "--filter.min_aesthetic", "7", "--filter.columns.pwatermark", "null"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((run / "filtered" / "_SUMMARY.json").read_text())
    assert summary["kept"] == 3 and summary["parts"] == 2  # 7.5, 8.0, 7.1; two rows per part (the file)
    assert summary["config"]["min_aesthetic"] == 7.0 and summary["config"]["seed"] == 5
    assert (
        summary["config"]["columns"]["pwatermark"] is None and "dropped_pwatermark" not in summary["dropped"]
    )
    capsys.readouterr()
    assert main([*argv, "--filter.min_side", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "filter.min_side" in err and "abc" in err


def test_bad_config_file_is_one_line_and_exit_2_from_the_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("filter:\n  min_side: abc\n")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "filter", "--config", str(bad), "--out", str(tmp_path / "r")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert str(bad) in proc.stderr and "filter.min_side" in proc.stderr and "abc" in proc.stderr
    assert not (tmp_path / "r").exists()

"""The installed console scripts as a user runs them: exit 0 on success, a one-line error and exit 2 on a
bad input, a traceback only with ``--debug`` / ``BRUSHNET_DEBUG=1``, nothing written outside the run folder,
no bitsandbytes noise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.brushnet.branches import save_branch
from tests.train.cli_runs import TINY_CONFIG, overlay, tiny_data
from tests.train.data_builders import write_shards

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
BNB_WARNING = "gemm_4bit_forward"  # bitsandbytes' CPU-backend message on import


def run(script: str, *args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    environ.pop("BRUSHNET_DEBUG", None)
    return subprocess.run(
        [str(BIN / script), *args],
        cwd=cwd,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, prog: str, *needles: str) -> None:
    """Exit 2, no traceback, exactly one ``<prog>: error:`` line on stderr naming ``needles``."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data"))


def fit_args(base: Path, data: Path, run_dir: Path, config: Path, *more: str) -> list[str]:
    return [
        "fit",
        f"--config={TINY_CONFIG}",
        f"--config={config}",
        f"--model.pretrained_model_name_or_path={base}",
        f"--data.train_shards={data}",
        f"--trainer.default_root_dir={run_dir}",
        *more,
    ]


def test_brushnet_train_fit_exits_0_and_writes_only_in_its_run_folder(tmp_path, tiny_base_sd15, data):
    cwd, run_dir = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    config = overlay(tmp_path / "o.yaml", every=2, validate_every=2)
    proc = run(
        "brushnet-train", *fit_args(tiny_base_sd15, data, run_dir, config, "--trainer.max_steps=2"), cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BrushNetCLI object" not in proc.stdout + proc.stderr
    assert "not recommended to provide both args and command line" not in proc.stderr
    assert BNB_WARNING not in proc.stderr
    assert list(cwd.iterdir()) == []  # tiny_cpu.yaml's logger has no save_dir of its own any more
    logs = run_dir / "logs" / "version_0"
    assert (logs / "metrics.csv").is_file() and (logs / "config.yaml").is_file()
    assert (logs / "validation" / "step-00000002" / "00.png").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_brushnet_train_expected_error_is_one_line_exit_2(tmp_path, data):
    args = fit_args(tmp_path / "no-base", data, tmp_path / "run", TINY_CONFIG)
    assert_one_line_error(run("brushnet-train", *args), "brushnet-train", str(tmp_path / "no-base"))
    debug = run("brushnet-train", "--debug", *args)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "BaseModelError" in debug.stderr


def test_brushnet_train_help_has_no_bitsandbytes_output():
    proc = run("brushnet-train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Exit status" in proc.stdout and "--debug" in proc.stdout
    assert "bitsandbytes" not in proc.stderr and BNB_WARNING not in proc.stderr, proc.stderr


def test_import_train_cli_does_not_import_bitsandbytes():
    code = "import sys, train.cli; print(sorted(m for m in sys.modules if m.startswith('bitsandbytes')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert BNB_WARNING not in proc.stderr


def test_brushnet_inpaint_exit_codes(tmp_path, tiny_base_sd15):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(rgb).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    branch = save_branch(tiny_base_sd15, tmp_path / "branch", seed=1)
    args = [
        "inpaint",
        f"--base={tiny_base_sd15}",
        f"--brushnet={branch}",
        f"--image={tmp_path / 'image.png'}",
        f"--mask={tmp_path / 'mask.png'}",
        "--prompt=a red ball",
        "--steps=2",
    ]
    ok = run("brushnet", *args, f"--out={tmp_path / 'out.png'}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "out.png").is_file() and BNB_WARNING not in ok.stderr
    bad = run("brushnet", *args, f"--out={tmp_path / 'out.png'}", f"--base={tmp_path / 'no-base'}")
    assert_one_line_error(bad, "brushnet", str(tmp_path / "no-base"))


def test_brushnet_data_exit_codes(tmp_path):
    write_shards(tmp_path / "run" / "brushdata", [3])
    ok = run("brushnet-data", "validate", f"--out={tmp_path / 'run'}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "run" / "index.json").is_file()
    bad = run("brushnet-data", "validate", f"--config={tmp_path / 'missing.yaml'}")
    assert_one_line_error(bad, "brushnet-data", "missing.yaml")


def test_run_console_keeps_tracebacks_for_bugs_only(monkeypatch, capsys):
    from brushnet.console import run_console
    from brushnet.errors import BrushNetError

    monkeypatch.delenv("BRUSHNET_DEBUG", raising=False)
    seen: list[list[str]] = []

    def expected(argv: list[str]) -> None:
        seen.append(argv)
        raise BrushNetError("shard x.tar: bad\nsecond line")

    assert run_console("prog", expected, ["a"]) == 2
    assert (
        capsys.readouterr().err == "prog: error: shard x.tar: bad second line (--debug for the traceback)\n"
    )
    with pytest.raises(BrushNetError):
        run_console("prog", expected, ["a", "--debug"])
    assert seen == [["a"], ["a"]]  # --debug never reaches the command's own parser
    with pytest.raises(KeyError):  # a bug: its traceback, whatever the switches
        run_console("prog", lambda argv: {}["missing"], [])
    assert run_console("prog", lambda argv: None, []) == 0

"""``brushnet.atomic``: outputs (inpainting results, evaluation images, indexes, exports) get the umask's
permissions, a failed write names its file and leaves no temporary."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from brushnet.atomic import (
    atomic_folder,
    atomic_output,
    atomic_write_text,
    remove_partials,
    save_image_atomic,
)


@pytest.fixture
def group_umask():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_folders_get_the_umask_permissions(tmp_path, group_umask):
    save_image_atomic(PIL.Image.new("RGB", (4, 4)), tmp_path / "out" / "result.png")
    atomic_write_text(tmp_path / "index.json", "{}")
    with atomic_folder(tmp_path / "export" / "brushnet") as tmp:
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors creates it 0600
        (tmp / "config.json").write_text("{}")
    assert mode(tmp_path / "out") == 0o750 and mode(tmp_path / "out" / "result.png") == 0o640
    assert mode(tmp_path / "index.json") == 0o640
    assert mode(tmp_path / "export" / "brushnet") == 0o750
    assert mode(tmp_path / "export" / "brushnet" / "model.safetensors") == 0o640
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["out", "result.png", "index.json", "export", "brushnet", "model.safetensors", "config.json"]
    )


def test_failed_write_names_the_path_and_removes_the_temporary(tmp_path):
    target = tmp_path / "result.png"
    full = pytest.raises(OSError, match=r"No space left on device: '.*result\.png'")
    with full as error, atomic_output(target) as f:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert error.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())


def test_folder_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "brushnet"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("the export failed")
    assert (target / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["brushnet"]
    (tmp_path / ".brushnet.partial-0123456789ab").mkdir()  # left by a killed process
    assert [p.name for p in remove_partials(tmp_path)] == [".brushnet.partial-0123456789ab"]
    assert [p.name for p in tmp_path.iterdir()] == ["brushnet"]

"""Atomic writes: a temporary sibling of the target (in the target's folder, never ``$TMPDIR``), renamed over
the target when complete and removed on any error.

Temporaries are named ``.<name>.partial-<random>`` so a cleanup can find the ones a killed process left.
Files and folders are created with the process umask applied (``0o666`` / ``0o777``), as ``open()`` and
``mkdir`` would: ``tempfile.mkstemp``/``mkdtemp`` would make every output 0600/0700, unreadable to the
rest of a group on a shared file system. An ``OSError`` raised while writing names the target path.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import PIL.Image

PARTIAL = ".partial-"  # in every temporary name (``.<name>.partial-<hex>``)


def partial_name(path: str | os.PathLike) -> Path:
    """A fresh temporary sibling of ``path``: ``<folder>/.<name>.partial-<hex>``."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL}{uuid.uuid4().hex[:12]}")


def remove_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (files or folders) that an interrupted write left in ``folder``."""
    removed = []
    for stale in Path(folder).glob(f".*{PARTIAL}*"):
        remove_path(stale)
        removed.append(stale)
    return removed


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or a folder tree; nothing if it does not exist."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything inside the permissions ``open()``/``mkdir`` give under the umask
    (``0o666``/``0o777`` minus the umask): some writers (safetensors 0.8 ``save_file``) create 0600 files."""
    mask = umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def names_path(error: OSError, path: str | os.PathLike) -> bool:
    """Whether ``error``'s message names a file (``path`` or another one)."""
    return error.filename is not None or str(path) in str(error)


def naming(error: OSError, path: str | os.PathLike) -> OSError:
    """A copy of ``error`` (same type and errno) that names ``path``, for errors that name no file (a
    failed write on an open file); raise it ``from error``."""
    if error.errno is None:
        return type(error)(f"writing {path}: {error}")
    return type(error)(error.errno, error.strerror or str(error), str(path))


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file; on success it is fsynced and renamed to ``path``, on error it is removed."""
    path = Path(path)
    tmp = partial_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if names_path(e, path):
            raise
        raise naming(e, path) from e
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it replaces ``path`` (an existing folder is
    moved aside first and then deleted), on error it is removed. What was written inside gets the
    umask's permissions (:func:`apply_umask`)."""
    path = Path(path)
    tmp = partial_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        apply_umask(tmp)
        if path.exists():
            old = partial_name(path)
            path.rename(old)
            tmp.rename(path)
            remove_path(old)
        else:
            tmp.rename(path)
    except OSError as e:
        if names_path(e, path):
            raise
        raise naming(e, path) from e
    finally:
        remove_path(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    with atomic_output(path) as f:
        f.write(text.encode("utf-8"))


def save_image_atomic(image: PIL.Image.Image, path: str | os.PathLike) -> None:
    """Save ``image`` atomically in the format its suffix names (ValueError for an unknown suffix)."""
    path = Path(path)
    fmt = PIL.Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write {str(path)!r}: unknown image format {path.suffix!r}")
    with atomic_output(path) as f:
        image.save(f, format=fmt)

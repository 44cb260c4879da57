"""Checkpoint files: staged writes next to the destination, sha256 sidecars, and verification before a resume.

Every checkpoint ``<name>.ckpt`` written by :func:`save_checkpoint_atomically` gets a sidecar
``<name>.ckpt.sha256`` in ``sha256sum`` format (``cd checkpoints && sha256sum -c last.ckpt.sha256`` checks it
by hand; a sharded checkpoint folder lists one line per file). The sidecar is removed before the new
checkpoint is renamed into place and written (atomically) after it, so a kill in between leaves a
checkpoint without a sidecar, never a checkpoint with another one's checksum.

:func:`verify_checkpoint` refuses, with one :class:`CheckpointError` naming the file, a checkpoint that is
empty, unreadable (truncated), whose sha256 differs from its sidecar, that holds no ``global_step``, or
whose trained weights hold NaN/Inf. A checkpoint without a sidecar (older runs, other tools) is only
checked for readability and finite weights, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from brushnet.atomic import atomic_output, atomic_write_text, partial_name, remove_path

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
DCP_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a sharded (DCP) checkpoint folder
_CHUNK = 8 << 20
_verified: dict[str, tuple[tuple[int, int, int], int]] = {}  # path -> (stat key, global step)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (the message names the file and the reason)."""

    def __init__(self, path: str | os.PathLike, why: str) -> None:
        super().__init__(f"checkpoint {path}: {why}")
        self.path = Path(path)


def checksum_path(path: str | os.PathLike) -> Path:
    """The sidecar of checkpoint ``path``: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(path: str | os.PathLike, name: str | None = None) -> dict[str, str]:
    """``{relative name: sha256}`` of a checkpoint file (one entry) or of every file in a checkpoint folder;
    names start with ``name`` (default: the path's own name), as the sidecar lists them."""
    path = Path(path)
    name = name or path.name
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {f"{name}/{p.relative_to(path).as_posix()}": _sha256(p) for p in files}
    return {name: _sha256(path)}


def read_checksums(sidecar: Path) -> dict[str, str]:
    digests = {}
    for line in sidecar.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise CheckpointError(sidecar, f"not a sha256sum line: {line!r}")
        digests[name] = digest
    return digests


def _inner(name: str) -> str:
    """A sidecar entry's path inside its checkpoint ("" for a checkpoint file, "a/b" for "<name>/a/b")."""
    return name.partition("/")[2]


def remove_checkpoint_files(path: str | os.PathLike) -> None:
    """Remove a checkpoint (file or sharded folder) and its sidecar."""
    remove_path(checksum_path(path))
    remove_path(path)


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _load_metadata(path: Path) -> dict[str, Any]:
    """The checkpoint dict with its tensors memory-mapped (only the pickle is read), or CheckpointError."""
    source = path / DCP_METADATA if path.is_dir() else path
    if not source.is_file():
        raise CheckpointError(path, f"a checkpoint folder without {DCP_METADATA}: not a Lightning checkpoint")
    if source.stat().st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes): the save that wrote it was interrupted")
    try:
        checkpoint = torch.load(source, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        raise CheckpointError(path, f"cannot be read (truncated or not a checkpoint): {e}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("global_step"), int):
        raise CheckpointError(path, "holds no 'global_step': not a Lightning checkpoint")
    return checkpoint


def recorded_step(path: str | os.PathLike) -> int:
    """The ``global_step`` a checkpoint records (read from the file, not its name); CheckpointError."""
    return _load_metadata(Path(path))["global_step"]


def _first_non_finite(state: dict[str, Any]) -> str | None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return key
    return None


def verify_checkpoint(path: str | os.PathLike) -> int:
    """Check ``path`` (see the module docstring) and return its global step; :class:`CheckpointError` if bad.

    The verdict is remembered for the unchanged file, so the load that follows does not hash it again."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "does not exist")
    key = _stat_key(path)
    cached = _verified.get(str(path.resolve()))
    if cached is not None and cached[0] == key:
        return cached[1]
    sidecar = checksum_path(path)
    if path.is_file() and key[1] == 0:
        raise CheckpointError(path, "is empty (0 bytes): the save that wrote it was interrupted")
    if sidecar.is_file():
        # compared by the path inside the checkpoint, so a renamed copy (with its sidecar) still verifies
        recorded = {_inner(name): digest for name, digest in read_checksums(sidecar).items()}
        actual = {_inner(name): digest for name, digest in file_digests(path).items()}
        for inner, digest in recorded.items():
            if actual.get(inner) != digest:
                found = actual.get(inner, "no such file")[:16]
                what = f"{path.name}/{inner}" if inner else path.name
                raise CheckpointError(
                    path,
                    f"sha256 of {what} is {found}..., {sidecar.name} recorded {digest[:16]}...: the file "
                    "changed after it was saved (corrupt or truncated)",
                )
    else:
        log.warning(
            "%s has no %s (saved before checksums were recorded, or by another tool): checking that it "
            "loads and holds finite weights only",
            path,
            sidecar.name,
        )
    checkpoint = _load_metadata(path)
    bad = _first_non_finite(checkpoint.get("state_dict", {}))
    if bad is not None:
        raise CheckpointError(path, f"weight {bad} holds NaN/Inf: refusing to resume from non-finite weights")
    _verified[str(path.resolve())] = (key, checkpoint["global_step"])
    return checkpoint["global_step"]


class _HashingWriter:
    """A binary file that hashes what is written (torch's zip writer writes sequentially) and remembers the
    ``OSError`` of a failed write."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        try:
            written = self.file.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha256.update(memoryview(data)[:written])
        return written

    def flush(self) -> None:
        self.file.flush()


class StagedCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing straight into a temporary sibling of the destination.

    Lightning's own save serialises into memory and copies through an fsspec transaction staged in
    ``$TMPDIR`` (a small ``$TMPDIR`` fails the first save naming no path, and a kill leaves the temporary
    there). Here ``torch.save`` streams into ``.<name>.partial-<hex>`` next to the destination, created
    under the umask, renamed when complete and removed on any error; the error names the path. Loads
    are verified first (:func:`verify_checkpoint`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[
            str, str
        ] = {}  # sha256 of the files saved, until save_checkpoint_atomically takes it

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_output(path) as f:
            writer = _HashingWriter(f)
            try:
                torch.save(checkpoint, writer)
            except RuntimeError:  # torch's zip writer reports a failed write as "unexpected pos ..."
                if writer.error is None:
                    raise
                raise writer.error from None  # the OSError itself (ENOSPC, EFBIG, EIO, ...)
        self.digests[str(path)] = writer.sha256.hexdigest()  # spares reading the file back to hash it

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        verify_checkpoint(path)
        return super().load_checkpoint(
            path, map_location=map_location or (lambda storage, loc: storage), weights_only=weights_only
        )


def use_staged_io(strategy: Any) -> None:
    """Make ``strategy`` save and load through :class:`StagedCheckpointIO` unless it was given its own."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = StagedCheckpointIO()


def save_checkpoint_atomically(trainer: L.Trainer, filepath: str, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` (collective) to a temporary sibling, renamed on rank 0 when complete, then
    its sha256 sidecar; on any error the temporary is removed, and an ``OSError`` is re-raised (same type
    and errno) as "cannot save checkpoint <filepath>: <reason>"."""
    use_staged_io(trainer.strategy)
    target = Path(filepath)
    # Not "<name>.ckpt": Lightning's ckpt_path="last" search (last*.ckpt) must never pick it up.
    tmp = Path(trainer.strategy.broadcast(str(partial_name(target))))
    try:
        trainer.save_checkpoint(tmp, weights_only)  # collective; ends with a barrier
        if trainer.is_global_zero:
            io = trainer.strategy.checkpoint_io
            streamed = io.digests.pop(str(tmp), None) if isinstance(io, StagedCheckpointIO) else None
            digests = {target.name: streamed} if streamed else file_digests(tmp, name=target.name)
            checksum_path(target).unlink(missing_ok=True)
            if tmp.is_dir() and target.is_dir():  # sharded (distributed) checkpoint folders
                remove_path(target)
            os.replace(tmp, target)
            atomic_write_text(checksum_path(target), "".join(f"{d}  {n}\n" for n, d in digests.items()))
    except OSError as e:
        if trainer.is_global_zero:
            remove_path(tmp)
        if e.errno is None:
            raise type(e)(f"cannot save checkpoint {target}: {e}") from e
        raise type(e)(e.errno, f"cannot save checkpoint {target}: {e.strerror}") from e
    except BaseException:
        if trainer.is_global_zero:
            remove_path(tmp)
        raise
    trainer.strategy.barrier("save_checkpoint_atomically")

"""Checkpoint files that are either complete or absent, even after a crash or a power cut."""

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


def durable_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Let ``write`` fill ``path`` so that ``path`` holds either its old content or all that ``write`` wrote.

    ``write`` writes to the file it is given (no copy of the data in memory): a temporary file beside ``path``, which
    is flushed to the disk and renamed over ``path`` (atomic on POSIX); the directory is then flushed so that the
    rename itself survives a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> bool:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        return True

    _replace_from_temporary(path, fill)


def durable_link(source: Path, path: Path) -> bool:
    """Make ``path`` a second name of the file ``source`` (a hard link), replacing ``path`` as `durable_write` does.

    ``source`` is not copied: a later `durable_write` of either name replaces that name only, and removing one name
    leaves the other. False where the link cannot be made (a file system without hard links, ``source`` gone);
    ``path`` is then unchanged.
    """

    def fill(tmp: Path) -> bool:
        tmp.unlink(missing_ok=True)  # os.link does not overwrite
        try:
            os.link(source, tmp)
        except OSError:
            return False
        return True

    return _replace_from_temporary(path, fill)


def _replace_from_temporary(path: Path, fill: Callable[[Path], bool]) -> bool:
    """Let ``fill`` make a temporary file beside ``path``, rename it over ``path`` and flush the directory.

    ``fill`` returns False to leave ``path`` as it was; whatever it made is removed, also when it raises.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if not fill(tmp):
            return False
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _flush_directory(path.parent)
    return True


def _flush_directory(directory: Path) -> None:
    """Flush a directory's entries to the disk, so that a rename in it survives a power cut."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


class DurableCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with local files written by `durable_write`; remote paths go through Lightning.

    Attributes:
        last_full_save: The local file it wrote last and that checkpoint's training step, if that was a full checkpoint
            (with the optimizer's and the loops' state, not the weights only), so that another name can be linked to
            it (``mnist.callbacks.ResumableCheckpoint``); None otherwise, and once the fit has ended (a step count names
            a state only within one fit).
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_full_save: tuple[Path, int] | None = None

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        self.last_full_save = None
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        # Straight into the file: through a buffer in memory, a save of the MLP took 0.5 ms more (~2.5 ms in all).
        durable_write(Path(path), lambda file: torch.save(checkpoint, file))
        if "optimizer_states" in checkpoint and "loops" in checkpoint:
            self.last_full_save = (Path(path), checkpoint.get("global_step"))

    def teardown(self) -> None:
        self.last_full_save = None  # Lightning's strategy calls this at the end of every fit, also of one that failed
        super().teardown()

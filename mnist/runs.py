"""Run directories (``<save_dir>/<name>/version_N``) and the checkpoints inside them.

Lightning resolves ``--ckpt_path best`` / ``last`` only from the ModelCheckpoint of the process that trained;
in a new process it has nothing to look at. These functions find the files on disk instead.
"""

import pickle
import re
from pathlib import Path

import torch

from mnist.errors import UserError

_VERSION = re.compile(r"version_(\d+)")


def run_version(run_dir: Path) -> int | None:
    """``N`` for a directory named ``version_N``, else None."""
    match = _VERSION.fullmatch(run_dir.name)
    return int(match.group(1)) if match else None


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("*.ckpt"))


def newest_run_with_checkpoints(runs_root: Path) -> Path:
    """The ``version_N`` directory with the highest N that holds at least one checkpoint."""
    runs = [p for p in runs_root.glob("version_*") if p.is_dir() and run_version(p) is not None]
    for run in sorted(runs, key=run_version, reverse=True):
        if checkpoints(run):
            return run
    raise UserError(f"no checkpoint found in any run under {runs_root}/; train one first with: python main.py fit")


def last_checkpoint(run_dir: Path) -> Path:
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    return max(checkpoints(run_dir), key=lambda p: p.stat().st_mtime)


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint the run's ModelCheckpoint ranked best, as recorded in its ``last.ckpt``."""
    candidates = [p for p in checkpoints(run_dir) if not p.name.startswith("last")]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
        for key, value in state.items():
            best = value.get("best_model_path") if key.startswith("ModelCheckpoint") else None
            # The recorded path may be absolute or from another working directory: match by file name.
            if best and (run_dir / "checkpoints" / Path(best).name).is_file():
                return run_dir / "checkpoints" / Path(best).name
    if len(candidates) == 1:
        return candidates[0]
    raise UserError(
        f"cannot tell which checkpoint in {run_dir / 'checkpoints'} is best (no ModelCheckpoint record); "
        "pass --ckpt_path with a file"
    )


def check_checkpoint(path: Path, weights_only: bool = True) -> dict:
    """Load a checkpoint, or say in one line why it cannot be used.

    With ``weights_only`` (the default) only tensors and plain containers are loaded, never pickled code.
    """
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except PermissionError as err:
        raise UserError(f"checkpoint {path} cannot be read: {err.strerror}") from err
    except pickle.UnpicklingError as err:
        # A real checkpoint that pickles Python objects fails on an "Unsupported global"; anything else
        # (a YAML file, a truncated download) fails on the file's format.
        if weights_only and "Unsupported global" in str(err):
            raise UserError(
                f"checkpoint {path} holds Python objects whose loading could run arbitrary code; "
                "if you trust where it comes from, add --weights_only false"
            ) from err
        raise UserError(f"{path} is not a readable checkpoint (UnpicklingError): is it the right file?") from err
    except Exception as err:
        raise UserError(f"{path} is not a readable checkpoint ({type(err).__name__}): is it the right file?") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint (it holds no state_dict)")
    return checkpoint

"""Finding runs and their checkpoints on disk, whichever logger wrote them.

Lightning resolves ``--ckpt_path best`` / ``last`` only from the ModelCheckpoint of the process that trained; in a
new process it has nothing to look at. Lightning's ModelCheckpoint writes into ``<save_dir>/<name>/<version>/
checkpoints/`` of the first logger (TensorBoard, CSV, MLflow and W&B alike), or ``<default_root_dir>/checkpoints/``
without a logger; these functions look in both places. A run's checkpoints also carry the run's whole config
(``RUN_CONFIG_KEY``), so that a run can be evaluated or continued from a checkpoint alone.
"""

import pickle
from collections.abc import Iterable
from pathlib import Path

import torch

from mnist.errors import UserError

RUN_CONFIG_KEY = "RunConfig"  # the state key under which a checkpoint's "callbacks" entry holds the run's config


def checkpoint_dirs(roots: Iterable[Path]) -> list[Path]:
    """The ``checkpoints`` folders holding ``*.ckpt`` files under any of ``roots``, at the depths Lightning uses."""
    found = set()
    for root in roots:
        for pattern in ("*.ckpt", "checkpoints/*.ckpt", "*/*/checkpoints/*.ckpt"):
            found.update(path.parent for path in Path(root).glob(pattern))
    return sorted(found)


def newest_checkpoint_dir(roots: list[Path]) -> Path:
    """The checkpoint folder that was written to last: the newest run's."""
    dirs = checkpoint_dirs(roots)
    if not dirs:
        where = " or ".join(f"{root}/" for root in roots)
        raise UserError(f"no checkpoint found under {where}; train one first with: python main.py fit")
    return max(dirs, key=lambda d: max(p.stat().st_mtime for p in d.glob("*.ckpt")))


def find_checkpoint(ckpt_path: str, roots: list[Path]) -> Path:
    """``best`` or ``last`` of the newest run under ``roots``, or any other value as a path."""
    if ckpt_path not in ("best", "last"):
        return Path(ckpt_path)
    ckpt_dir = newest_checkpoint_dir(roots)
    return best_checkpoint(ckpt_dir) if ckpt_path == "best" else last_checkpoint(ckpt_dir)


def last_checkpoint(ckpt_dir: Path) -> Path:
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        return last
    return max(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)


def best_checkpoint(ckpt_dir: Path) -> Path:
    """The checkpoint the run's ModelCheckpoint ranked best, as recorded in its ``last.ckpt``."""
    candidates = [p for p in ckpt_dir.glob("*.ckpt") if not p.name.startswith("last")]
    last = ckpt_dir / "last.ckpt"
    if last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
        for key, value in state.items():
            best = value.get("best_model_path") if key.startswith("ModelCheckpoint") else None
            # The recorded path may be absolute or from another working directory: match by file name.
            if best and (ckpt_dir / Path(best).name).is_file():
                return ckpt_dir / Path(best).name
    if len(candidates) == 1:
        return candidates[0]
    raise UserError(
        f"cannot tell which checkpoint in {ckpt_dir} is best (no ModelCheckpoint record); pass --ckpt_path with a file"
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


def saved_config(checkpoint: dict) -> str | None:
    """The YAML config of the run that wrote ``checkpoint``, or None for a checkpoint from elsewhere."""
    state = checkpoint.get("callbacks", {}).get(RUN_CONFIG_KEY, {})
    return state.get("config") if isinstance(state, dict) else None

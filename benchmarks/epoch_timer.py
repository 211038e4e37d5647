"""A callback that records how long each training epoch takes, its validation included."""

import json
import time

import pytorch_lightning as pl


class EpochTimer(pl.Callback):
    """Appends ``{"epoch": N, "seconds": S}`` per training epoch to a JSON-lines file.

    Args:
        path: The file to append to.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook, so it is included.
        seconds = time.perf_counter() - self.start
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps({"epoch": trainer.current_epoch, "seconds": seconds}) + "\n")

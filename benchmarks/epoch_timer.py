"""A callback that records how long each training epoch takes, its validation included."""

import json
import time

import pytorch_lightning as pl
import torch


class EpochTimer(pl.Callback):
    """Appends ``{"epoch": N, "seconds": S, "cpu_seconds": C}`` per training epoch to a JSON-lines file.

    ``cpu_seconds`` is the process's CPU time over the epoch (all its threads): on a shared machine it moves less
    than the wall time when other tenants take the CPU.

    Args:
        path: The file to append to.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = self.cpu_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(pl_module.device)
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook, so it is included.
        synchronize(pl_module.device)
        seconds, cpu_seconds = time.perf_counter() - self.start, time.process_time() - self.cpu_start
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                record = {"epoch": trainer.current_epoch, "seconds": seconds, "cpu_seconds": cpu_seconds}
                f.write(json.dumps(record) + "\n")


def synchronize(device: torch.device) -> None:
    """Wait for a GPU, which runs behind the host: otherwise the time measured is only the time to queue the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

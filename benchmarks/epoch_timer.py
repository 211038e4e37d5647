"""A callback that records how long each training epoch takes, its validation included, and a step's quiet time."""

import json
import os
import statistics
import time

import pytorch_lightning as pl
import torch


class EpochTimer(pl.Callback):
    """Appends ``{"epoch": N, "seconds": S, "cpu_seconds": C, "step_ms": T}`` per training epoch to a JSON-lines file.

    An epoch runs from its start to the next one's (or to the end of training): its training steps, its validation
    and all the work at its end, the checkpoints that Lightning's checkpoint callback saves there included (Lightning
    calls that callback after all others, so a timer stopped in ``on_train_epoch_end`` would miss them).
    ``cpu_seconds`` is the process's CPU time over the epoch (all its threads): on a shared machine it moves less than
    the wall time when other tenants take the CPU. ``step_ms`` is a training step's time when the machine is quiet
    (see ``quiet_step_ms``).

    Args:
        path: The file to append to.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.epoch: int | None = None  # the epoch being timed
        self.start = self.cpu_start = 0.0
        self.step_starts: list[float] = []
        self.baton = Baton()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The fit's own preparation (data, sanity check, compiling) runs while the other contenders wait.
        self.baton.take()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._record(trainer, pl_module):
            self.baton.give()
        self.baton.take()
        self.epoch, self.start, self.cpu_start = trainer.current_epoch, time.perf_counter(), time.process_time()
        self.step_starts = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.step_starts.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The turn is kept to the end: what the process does before it exits would run in another's epoch.
        self._record(trainer, pl_module)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Write the epoch that has just ended, if one is being timed; whether one was."""
        if self.epoch is None:
            return False
        synchronize(pl_module.device)
        end = time.perf_counter()
        settled = self.baton.settle()
        cpu_seconds = time.process_time() - self.cpu_start
        if trainer.is_global_zero:
            write_record(self.path, self.epoch, settled - self.start, cpu_seconds, self.step_starts, end - self.start)
        self.epoch = None
        return True


class Baton:
    """Turns at epochs for processes that run at once: one runs an epoch while the others wait.

    benchmark.py runs the contenders of one batch size this way, handing the turn round epoch by epoch: their epochs
    then lie seconds apart, and a slow spell of a shared machine (seconds to minutes long here) slows neighbouring
    epochs alike. It names two pipes in the environment, ``BENCHMARK_BATON="<fd to wait on>,<fd to hand over on>"``;
    without it there are no turns, and every method returns at once.
    """

    def __init__(self) -> None:
        spec = os.environ.get("BENCHMARK_BATON")
        self.fds = tuple(int(fd) for fd in spec.split(",")) if spec else None
        for fd in self.fds or ():
            os.set_inheritable(fd, False)  # not to the process's own children: its end must be seen when it ends
        self.holding = False

    def take(self) -> None:
        """Wait for this process's turn (at once if it has it, or if the benchmark is gone)."""
        if self.fds and not self.holding:
            os.read(self.fds[0], 1)
            self.holding = True

    def give(self) -> None:
        """Hand the turn on."""
        if self.fds and self.holding:
            os.write(self.fds[1], b".")
            self.holding = False

    def settle(self, poll: float = 0.002, idle: float = 0.0002, limit: float = 1.0) -> float:
        """The time this process's work ended: now, or, taking turns, when its other threads stopped working.

        Work a thread of the process goes on with (a picture encoded, an event file written) belongs to its epoch;
        taking turns, it would otherwise run in the next contender's. The process has stopped when it uses less than
        ``idle`` seconds of CPU in ``poll`` seconds; a thread that never stops is waited for ``limit`` seconds.
        """
        start = end = time.perf_counter()
        while self.fds and end - start < limit:
            cpu = time.process_time()
            time.sleep(poll)
            if time.process_time() - cpu < idle:
                break
            end = time.perf_counter()
        return end


def write_record(
    path: str, epoch: int, seconds: float, cpu_seconds: float, step_starts: list[float], own_seconds: float
) -> None:
    """Append one epoch's record to ``path``; ``step_starts`` are the times its training steps began.

    ``seconds`` is the epoch's time with its threads' work after it (``Baton.settle``), ``own_seconds`` without.
    """
    record = {
        "epoch": epoch,
        "seconds": seconds,
        "own_seconds": own_seconds,
        "cpu_seconds": cpu_seconds,
        "step_ms": quiet_step_ms(step_starts),
        "ended": time.time(),  # the same clock in every process: which epochs ran when
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def quiet_step_ms(step_starts: list[float], window: int = 50, quantile: float = 0.1) -> float:
    """A training step's time in ms when the machine is quiet, from the times the steps began.

    The mean step time over each run of ``window`` consecutive steps, and of these the ``quantile``: another tenant's
    slow spell only lengthens the windows it falls in, so a low quantile compares the code and not the machine's
    mood, which changes epoch times by 2x within minutes here. On a GPU the host can run ahead of the device by a
    few steps' work; over 50 steps that is small, and the epoch's time is exact.
    """
    steps = [b - a for a, b in zip(step_starts, step_starts[1:], strict=False)]
    if not steps:
        return float("nan")
    windows = [statistics.fmean(steps[i : i + window]) for i in range(0, len(steps) - window + 1, window)]
    windows = sorted(windows or [statistics.fmean(steps)])
    return 1000 * windows[int(quantile * len(windows))]


def synchronize(device: torch.device) -> None:
    """Wait for a GPU, which runs behind the host: otherwise the time measured is only the time to queue the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

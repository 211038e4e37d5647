import sys

import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel
from pytorch_lightning.profilers import SimpleProfiler

from mnist.callbacks import BATCH_HOOKS, skip_unused_batch_hooks
from mnist.cli import MNISTCLI

STEP_HOOKS = [h for h in BATCH_HOOKS if "_batch_" not in h or h.startswith("on_train_")]


class Counting(pl.Callback):
    """Counts its own training-step hooks: the one its class overrides and the one its instance is given."""

    def __init__(self) -> None:
        self.calls = {"on_train_batch_end": 0, "on_after_backward": 0}
        self.on_after_backward = lambda trainer, module: self._count("on_after_backward")

    def _count(self, hook: str) -> None:
        self.calls[hook] += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._count("on_train_batch_end")


class CountingSubclass(Counting):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_skipped_hooks_leave_the_ones_a_callback_uses_running(tmp_path):
    callbacks = [Counting(), CountingSubclass()]
    skip_unused_batch_hooks(callbacks)
    assert callbacks[0].on_before_backward is None and callbacks[0].on_train_batch_start is None
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=5, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(BoringModel())
    for callback in callbacks:
        assert callback.calls == {"on_train_batch_end": 5, "on_after_backward": 5}


def test_lightning_calls_the_template_callbacks_only_at_the_step_hooks_they_use(tmp_path, fast_args, monkeypatch):
    # Lightning profiles every callback hook it calls, under "[Callback]<state key>.<hook>".
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["main.py"])
    cli = MNISTCLI(args=["fit", *fast_args, "--trainer.enable_progress_bar", "true", "--trainer.profiler", "simple"])
    assert isinstance(cli.trainer.profiler, SimpleProfiler)
    called = set(cli.trainer.profiler.recorded_durations)
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"TQDMProgressBar", "ModelCheckpoint", "ResumableCheckpoint", "NonFiniteLossGuard"} <= names
    for callback in cli.trainer.callbacks:
        uses = {h for h in STEP_HOOKS if getattr(type(callback), h) is not getattr(pl.Callback, h)}
        hooks = {h for h in STEP_HOOKS if f"[Callback]{callback.state_key}.{h}" in called}
        assert hooks == uses, type(callback).__name__
    assert "[Callback]NonFiniteLossGuard.on_train_batch_end" in called

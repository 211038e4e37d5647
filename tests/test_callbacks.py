import os
import signal
import sys

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.demos.boring_classes import BoringModel
from pytorch_lightning.profilers import SimpleProfiler

from mnist import checkpoint_io
from mnist.callbacks import (
    BATCH_HOOKS,
    MODULE_STEP_HOOKS,
    NonFiniteLossGuard,
    ProgressBar,
    ResumableCheckpoint,
    all_finite,
    skip_unused_batch_hooks,
    skip_unused_step_hooks,
)
from mnist.checkpoint_io import durable_write
from mnist.cli import MNISTCLI
from mnist.errors import UserError
from mnist.profiler import NullProfiler
from tests.conftest import cli_in_process as cli

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


def plain_trainer(tmp_path, callbacks: list[pl.Callback], **kwargs) -> pl.Trainer:
    """A Trainer with only ``callbacks`` of its own: no logger, checkpoints, progress bar, summary or validation,
    unless ``kwargs`` switch one on."""
    plain = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
             "enable_model_summary": False, "limit_val_batches": 0}  # fmt: skip
    return pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, **{**plain, **kwargs})


def test_skipped_hooks_leave_the_ones_a_callback_uses_running(tmp_path):
    callbacks = [Counting(), CountingSubclass()]
    skip_unused_batch_hooks(callbacks)
    assert callbacks[0].on_before_backward is None and callbacks[0].on_train_batch_start is None
    trainer = plain_trainer(tmp_path, callbacks, max_steps=5)
    trainer.fit(BoringModel())
    for callback in callbacks:
        assert callback.calls == {"on_train_batch_end": 5, "on_after_backward": 5}


class CountingModel(BoringModel):
    """Counts the one training-step hook its class overrides, and its validation steps."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_ends = self.validation_steps = 0

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.batch_ends += 1

    def validation_step(self, batch, batch_idx: int):
        self.validation_steps += 1
        return super().validation_step(batch, batch_idx)


def test_skipped_module_hooks_leave_its_own_and_the_evaluation_hooks_running(tmp_path):
    model = CountingModel()
    skip_unused_step_hooks(model, clips_gradients=False)
    assert model.on_before_backward is None and model.on_train_batch_start is None
    assert model.configure_gradient_clipping is None
    # Lightning reads the evaluation hooks' signatures: they must stay methods.
    assert callable(model.on_validation_batch_end)
    trainer = plain_trainer(
        tmp_path, [], max_steps=5, limit_val_batches=2, val_check_interval=5, num_sanity_val_steps=0
    )
    trainer.fit(model)
    assert model.batch_ends == 5 and model.validation_steps == 2


def profiled_fit(tmp_path, monkeypatch, args: list[str]) -> tuple[MNISTCLI, set[str]]:
    """A fit through the command line, and every hook Lightning called in it, as its profiler names them.

    Lightning profiles each hook it calls: "[Callback]<state key>.<hook>", "[LightningModule]<class>.<hook>".
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["main.py"])
    cli = MNISTCLI(args=["fit", *args, "--trainer.profiler", "simple"])
    assert isinstance(cli.trainer.profiler, SimpleProfiler)
    return cli, set(cli.trainer.profiler.recorded_durations)


def step_hooks_called(tmp_path, monkeypatch, args: list[str]) -> dict[type, set[str]]:
    """The training-step hooks at which Lightning called each callback of a fit, by the callback's class."""
    cli, called = profiled_fit(tmp_path, monkeypatch, [*args, "--trainer.enable_progress_bar", "true"])
    return {type(c): {h for h in STEP_HOOKS if f"[Callback]{c.state_key}.{h}" in called} for c in cli.trainer.callbacks}


def test_lightning_calls_the_template_callbacks_only_at_the_step_hooks_they_use(tmp_path, fast_args, monkeypatch):
    called = step_hooks_called(tmp_path, monkeypatch, fast_args)
    assert {ProgressBar, ModelCheckpoint, ResumableCheckpoint, NonFiniteLossGuard} <= called.keys()
    # The checkpoints save at epoch ends only, and one process has nothing to agree on: no work at a step.
    idle = {ModelCheckpoint, ResumableCheckpoint}
    for kind, hooks in called.items():
        uses = {h for h in STEP_HOOKS if getattr(kind, h) is not getattr(pl.Callback, h)}
        assert hooks == (uses - {"on_train_batch_end"} if kind in idle else uses), kind.__name__
    assert called[NonFiniteLossGuard] == called[ProgressBar] == {"on_train_batch_end"}


@pytest.mark.parametrize("clip", [None, 0.5])
def test_lightning_calls_the_template_model_at_no_empty_step_hook(tmp_path, fast_args, monkeypatch, clip):
    clipping = ["--trainer.gradient_clip_val", str(clip)] if clip else []
    _, profiled = profiled_fit(tmp_path, monkeypatch, [*fast_args, *clipping])
    called = {name.removeprefix("[LightningModule]MNISTClassifier.") for name in profiled}
    assert {"optimizer_step", "on_train_epoch_start", "on_validation_batch_end"} <= called
    assert not called & set(MODULE_STEP_HOOKS)
    # Lightning clips in the module's hook: called when clipping is asked for, and only then.
    assert ("configure_gradient_clipping" in called) == bool(clip)


def test_a_run_that_asks_for_no_profiler_gets_one_that_does_nothing(tmp_path, fast_args, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["main.py"])
    cli = MNISTCLI(args=["fit", *fast_args])
    profiler = cli.trainer.profiler
    assert isinstance(profiler, NullProfiler)
    with profiler.profile("[Callback]NonFiniteLossGuard.on_train_batch_end") as action:
        assert action == "[Callback]NonFiniteLossGuard.on_train_batch_end"
    # An error in a hook reaches the trainer, as with Lightning's own profilers.
    with pytest.raises(ValueError, match="a hook failed"), profiler.profile("training_step"):
        raise ValueError("a hook failed")
    assert profiler.summary() == ""


def test_a_guard_used_for_a_second_fit_checks_its_weights_again(tmp_path):
    # Both fits end at step 2, and the first one's weights were found finite there: the second one's, broken after
    # its fit, must be checked on their own.
    guard = NonFiniteLossGuard()
    for broken in (False, True):
        model = BoringModel()
        trainer = plain_trainer(tmp_path, [guard], max_steps=2)
        trainer.fit(model)
        path = tmp_path / f"broken-{broken}.ckpt"
        if not broken:
            trainer.save_checkpoint(path)
        else:
            torch.nn.init.constant_(model.layer.weight, float("nan"))
            with pytest.raises(UserError, match="the weights are no longer finite"):
                trainer.save_checkpoint(path)
        assert path.exists() != broken


class LossTurnsNaN(BoringModel):
    """Its loss is NaN from the fourth training step on."""

    def training_step(self, batch, batch_idx: int):
        output = super().training_step(batch, batch_idx)
        return {"loss": output["loss"] * float("nan")} if batch_idx >= 3 else output


class LossTurnsNaNOnAnAccelerator(LossTurnsNaN):
    @property
    def device(self) -> torch.device:  # what the guard sees; the fit runs on the CPU
        return torch.device("cuda")


@pytest.mark.parametrize(("model", "stopped_at"), [(LossTurnsNaN, 4), (LossTurnsNaNOnAnAccelerator, 5)])
def test_the_guard_checks_the_loss_at_every_step_on_a_cpu_and_at_logging_steps_elsewhere(tmp_path, model, stopped_at):
    # The fourth step (step 3 before its update, 4 after it) is the first with a NaN loss; with log_every_n_steps 5
    # the first check on an accelerator comes after the fifth step.
    trainer = plain_trainer(tmp_path, [NonFiniteLossGuard()], max_steps=20, log_every_n_steps=5)
    with pytest.raises(UserError, match=f"training stopped at step {stopped_at} .*the loss is nan"):
        trainer.fit(model())


class ShowsItsStep(BoringModel):
    def training_step(self, batch, batch_idx: int):
        self.log("seen", float(batch_idx), prog_bar=True)  # a value beside the bar that changes at every step
        return super().training_step(batch, batch_idx)


def training_bar_draws(tmp_path, bar: TQDMProgressBar) -> list[list[tuple[int, str]]]:
    """For every training step of a fit, what the training bar showed (count, values) at each draw of the step."""
    steps = []
    hook = bar.on_train_batch_end

    def recording(trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        shown, tqdm_bar = [], bar.train_progress_bar
        draw = tqdm_bar.refresh
        tqdm_bar.refresh = lambda *args, **kwargs: (shown.append((tqdm_bar.n, tqdm_bar.postfix)), draw(*args, **kwargs))
        try:
            hook(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            del tqdm_bar.refresh
        steps.append(shown)

    bar.on_train_batch_end = recording
    trainer = plain_trainer(tmp_path, [bar], enable_progress_bar=True, max_epochs=2, limit_train_batches=7)
    trainer.fit(ShowsItsStep())
    return steps


@pytest.mark.parametrize("refresh_rate", [3, 0])
def test_the_progress_bar_draws_once_what_lightnings_draws_twice(tmp_path, refresh_rate):
    lightning = training_bar_draws(tmp_path, TQDMProgressBar(refresh_rate=refresh_rate))
    ours = training_bar_draws(tmp_path, ProgressBar(refresh_rate=refresh_rate))
    assert len(ours) == len(lightning) == 14
    # Lightning draws the new count with the old values, then both; this bar only the second.
    assert ours == [draws[-1:] for draws in lightning]
    drawn_at = [n for draws in ours for n, _ in draws]
    assert drawn_at == ([3, 6, 7] * 2 if refresh_rate else [])
    if refresh_rate:
        assert ours[2] == [(3, "seen=2.000")]


def test_checkpoints_saving_every_n_steps_are_called_at_every_step(tmp_path, fast_args, monkeypatch):
    steps = ["--checkpoint.every_n_train_steps", "2", "--resumable.every_n_train_steps", "3"]
    called = step_hooks_called(tmp_path, monkeypatch, [*fast_args, *steps])
    assert called[ModelCheckpoint] == called[ResumableCheckpoint] == {"on_train_batch_end"}


class SignalAtStep(pl.Callback):
    """Sends this process a signal when training step ``step`` starts."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_a_signal_switches_the_resumable_checkpoints_step_hook_on(tmp_path, fast_args, monkeypatch, capsys):
    # Without step saves, Lightning does not call the resumable checkpoint at steps until a stop signal comes.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli(["fit", *fast_args, "--trainer.callbacks+=tests.test_callbacks.SignalAtStep",
             "--trainer.callbacks.step", "5"])  # fmt: skip
    assert stop.value.code == 128 + signal.SIGTERM
    assert "Stopped by SIGTERM; checkpoint saved" in capsys.readouterr().err
    last = torch.load(tmp_path / "logs/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 6, "stopped after the step under way, mid-epoch"


def test_a_signal_stops_cleanly_with_checkpointing_off(tmp_path, fast_args, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli(["fit", *fast_args, "--trainer.enable_checkpointing", "false",
             "--trainer.callbacks+=tests.test_callbacks.SignalAtStep", "--trainer.callbacks.step", "5"])  # fmt: skip
    assert stop.value.code == 128 + signal.SIGTERM
    assert "Stopped by SIGTERM; checkpointing is off, nothing saved" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


def record_writes(monkeypatch) -> list[str]:
    """The names of the checkpoint files written from now on, in order (links are not writes)."""
    written = []

    def recording_write(path, write):
        written.append(path.name)
        durable_write(path, write)

    monkeypatch.setattr(checkpoint_io, "durable_write", recording_write)
    return written


def test_an_epoch_that_improves_makes_last_ckpt_a_link_to_the_best_not_a_second_save(tmp_path, fast_args, monkeypatch):
    # The logged step grows, so with mode max every epoch improves and the checkpoint callback saves the best; the
    # resumable checkpoint, called after it, gives last.ckpt that file instead of saving the same state again.
    written = record_writes(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, "--trainer.max_epochs", "2", "--checkpoint.monitor", "step", "--checkpoint.mode", "max"])
    assert [name[:7] for name in written] == ["epoch00", "epoch01"]
    checkpoints = tmp_path / "logs/lightning_logs/version_0/checkpoints"
    (best,) = checkpoints.glob("epoch*.ckpt")  # the first epoch's best removed, as before
    assert best.name.startswith("epoch01")
    assert (checkpoints / "last.ckpt").samefile(best)


def test_an_epoch_that_does_not_improve_saves_last_ckpt_and_leaves_the_best_linked_before(
    tmp_path, fast_args, monkeypatch
):
    # With mode min the growing step improves at the first epoch only: last.ckpt is first a link to that best
    # checkpoint, then saved in full at the two later epochs, which must replace the link, not write through it.
    written = record_writes(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, "--trainer.max_epochs", "3", "--checkpoint.monitor", "step", "--checkpoint.mode", "min"])
    assert [name[:7] for name in written] == ["epoch00", "last.ck", "last.ck"]
    checkpoints = tmp_path / "logs/lightning_logs/version_0/checkpoints"
    (best,) = checkpoints.glob("epoch*.ckpt")
    best_state = torch.load(best, weights_only=True)
    last_state = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (best_state["epoch"], last_state["epoch"]) == (0, 2)
    assert last_state["global_step"] == 3 * best_state["global_step"]


def test_without_hard_links_last_ckpt_is_saved_in_full(tmp_path, fast_args, monkeypatch):
    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")  # as a file system without hard links answers

    written = record_writes(monkeypatch)
    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.chdir(tmp_path)
    cli(["fit", *fast_args, "--trainer.max_epochs", "2", "--checkpoint.monitor", "step", "--checkpoint.mode", "max"])
    assert [name[:7] for name in written] == ["epoch00", "last.ck", "epoch01", "last.ck"]
    checkpoints = tmp_path / "logs/lightning_logs/version_0/checkpoints"
    (best,) = checkpoints.glob("epoch*.ckpt")
    last = checkpoints / "last.ckpt"
    assert not last.samefile(best)
    assert torch.load(last, weights_only=True)["global_step"] == torch.load(best, weights_only=True)["global_step"]
    assert not list(checkpoints.glob(".*"))  # no temporary file left


def test_the_record_of_the_last_full_save_ends_with_its_fit(tmp_path):
    # A later fit counts its steps from where it starts: a save of an earlier one at the same step count holds
    # another state, and last.ckpt must not become a name of it.
    io = checkpoint_io.DurableCheckpointIO()
    trainer = plain_trainer(tmp_path, [], plugins=[io], max_steps=2)
    trainer.fit(BoringModel())
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    assert io.last_full_save == (tmp_path / "full.ckpt", 2)
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    assert io.last_full_save is None, "not a full checkpoint"
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    trainer.strategy.teardown()
    assert io.last_full_save is None


class FailsAtStep3(BoringModel):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            raise RuntimeError("failed at step 3")
        return super().training_step(batch, batch_idx)


def test_a_fit_that_fails_leaves_the_checkpoint_callback_saving_last_ckpt_as_configured(tmp_path):
    # During a fit the resumable checkpoint writes last.ckpt in the checkpoint callback's place. Lightning calls no
    # teardown hook after an exception: the callbacks used again (in a notebook, say) must still write last.ckpt.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callbacks = [checkpoint, ResumableCheckpoint()]

    def trainer() -> pl.Trainer:
        return plain_trainer(tmp_path, callbacks, enable_checkpointing=True, max_epochs=1, limit_train_batches=5)

    with pytest.raises(RuntimeError, match="failed at step 3"):
        trainer().fit(FailsAtStep3())
    assert checkpoint.save_last is True
    trainer().fit(BoringModel())
    assert checkpoint.save_last is True
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 5


class WeightsTurnNaN(BoringModel):
    """Its last update of the second epoch leaves a weight NaN, with the loss of that step still finite."""

    def __init__(self) -> None:
        super().__init__()
        self.validated_at: list[int] = []  # the steps at which a validation started

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.current_epoch == 1 and batch_idx == self.trainer.num_training_batches - 1:
            with torch.no_grad():
                self.layer.weight[0, 0] = float("nan")

    def on_validation_start(self) -> None:
        self.validated_at.append(self.global_step)


def test_weights_that_are_not_finite_stop_the_fit_before_its_validation(tmp_path):
    # The epoch-end checkpoints follow the validation; the guard stops the fit before either.
    saving = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = plain_trainer(
        tmp_path, [NonFiniteLossGuard(), saving], enable_checkpointing=True, limit_val_batches=2,
        limit_train_batches=4, max_epochs=3, num_sanity_val_steps=0,
    )  # fmt: skip
    model = WeightsTurnNaN()
    with pytest.raises(UserError, match="training stopped at step 8 .*the weights are no longer finite"):
        trainer.fit(model)
    assert model.validated_at == [4]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([1.0, -2.0], True),
        ([3e38, 3e38], True),  # finite, though their sum is not: looked at element by element
        ([1.0, float("nan")], False),
        ([1.0, float("inf")], False),
        ([float("inf"), float("-inf")], False),  # a NaN sum
    ],
)
def test_all_finite_looks_at_every_element(values, finite):
    assert all_finite([torch.zeros(3), torch.tensor(values)]) is finite
    assert all_finite([torch.tensor(values, dtype=torch.bfloat16)]) is finite  # summed as float32


def test_a_checkpoint_never_keeps_weights_that_are_not_finite(tmp_path, fast_args, monkeypatch, capsys):
    # With a checkpoint at every step, the step whose update overflows would save its weights before any loss shows
    # it; the guard refuses that save, so last.ckpt keeps the step before.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli(["fit", *fast_args, "--model.optimizer.init_args.lr", "1e30", "--resumable.every_n_train_steps", "1"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    last = tmp_path / "logs/lightning_logs/version_0/checkpoints/last.ckpt"
    assert f"The last good checkpoint is kept: {last.relative_to(tmp_path)}" in err
    checkpoint = torch.load(last, weights_only=True)
    weights = {k: t for k, t in checkpoint["state_dict"].items() if k.startswith("network.")}
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert f"training stopped at step {checkpoint['global_step'] + 1} " in err

"""Callbacks the command line adds to every run."""

import csv
import math
import signal
import sys
import threading
from pathlib import Path

import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from pytorch_lightning.callbacks import BasePredictionWriter, Checkpoint, ModelCheckpoint, TQDMProgressBar

from mnist.checkpoint_io import DurableCheckpointIO, durable_link
from mnist.errors import TrainingInterrupted, UserError

# The hooks Lightning calls for every batch, each through one function that skips a hook which is not callable.
BATCH_HOOKS = (
    *(f"on_{stage}_batch_{when}" for stage in ("train", "validation", "test", "predict") for when in ("start", "end")),
    *("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad"),
)


def skip_unused_batch_hooks(callbacks: list[pl.Callback]) -> None:
    """Keep Lightning from calling each callback at the batch hooks it leaves as ``Callback``'s empty methods.

    Lightning calls every callback at each of the six hooks of a training step, in a profiler context and with the
    callback's state key formatted, whether the callback uses the hook or not. A run of this project has five
    callbacks with work at one batch hook at most; the empty calls were 5-6 % of the MLP's step at batch 32 on a CPU.
    Set to None on the instance, an unused hook is skipped; one the class overrides or the instance was given stays.
    There is no public way to say which hooks a callback uses (skipping the others came up in the review of
    Lightning-AI/pytorch-lightning#10575); should Lightning ever call a None hook, every run fails at once.
    """
    for callback in callbacks:
        _skip_unused(callback, pl.Callback, BATCH_HOOKS)


# The module's hooks of a training step that return nothing. Lightning reads the signatures of the evaluation batch
# hooks (for a `dataloader_idx` argument) before it runs them, so those are left alone.
MODULE_STEP_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)


def skip_unused_step_hooks(module: pl.LightningModule, clips_gradients: bool) -> None:
    """Keep Lightning from calling the module at the training-step hooks it leaves as ``LightningModule``'s empty ones.

    Lightning calls the module at six such hooks every training step, each in a profiler context and with the module's
    current hook name set and restored through ``nn.Module.__setattr__``: ~190 Python calls a step for nothing in
    this project's model, ~2 % of the MLP's step at batch 32 on a CPU. Without gradient clipping (``clips_gradients``:
    the trainer's ``gradient_clip_val`` is set), ``configure_gradient_clipping`` is skipped too: as
    ``LightningModule``'s own, it only finds that out, in ~55 calls a step. Skipped as `skip_unused_batch_hooks`
    skips a callback's hooks (the same upstream discussion); a subclass's own hooks stay.
    """
    _skip_unused(module, pl.LightningModule, MODULE_STEP_HOOKS)
    if not clips_gradients:
        _skip_unused(module, pl.LightningModule, ("configure_gradient_clipping",))


def _skip_unused(instance: object, base: type, hooks: tuple[str, ...]) -> None:
    for name in hooks:
        if getattr(type(instance), name) is getattr(base, name) and name not in vars(instance):
            setattr(instance, name, None)


def skip_idle_checkpoint_batch_hook(
    checkpoint: pl.Callback, every_n_train_steps: int | None, train_time_interval
) -> None:
    """Keep Lightning from calling a ``ModelCheckpoint`` at every training step when it saves at epoch ends only.

    ModelCheckpoint saves during training only with ``every_n_train_steps`` or ``train_time_interval`` set (its
    documented arguments, given here as configured); otherwise its ``on_train_batch_end`` only finds that out, at every
    step, through Lightning's profiler context and its state key (a formatted dict): ~50 Python calls, 1-2 % of the
    MLP's step at batch 32 on a CPU. Skipped as ``skip_unused_batch_hooks`` skips hooks (same upstream discussion).
    """
    if not every_n_train_steps and train_time_interval is None:
        checkpoint.on_train_batch_end = None


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar, drawn once at each refresh of a training epoch and idle between refreshes.

    Lightning's bar draws the training bar twice at each refresh (the count, then the values beside it: ~0.1 ms each
    in a terminal or a log file) and, at every other step, reads its bar and settings through six property calls to
    find out that there is nothing to do. This one sets the count and the values and draws once, and returns at once
    between refreshes (worked out once an epoch). It shows what Lightning's shows; the other bars are Lightning's.

    Args:
        refresh_rate: Redraw the bars every this many batches (and at the last batch); 0 hides them.
        process_position: Line offset of the bars, for several trainings printing to one terminal.
        leave: Keep each epoch's training bar on screen instead of redrawing one bar.
    """

    def __init__(
        self, refresh_rate: NonNegativeInt = 1, process_position: NonNegativeInt = 0, leave: bool = False
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._draw_every = 0  # the training bar's refresh rate in this epoch; 0: not drawn
        self._last_batch: int | None = None  # the epoch's batch count, drawn too; None when unknown

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        self._draw_every = self.refresh_rate if self.is_enabled and not bar.disable else 0
        self._last_batch = bar.total

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        n, every = batch_idx + 1, self._draw_every
        if not every or (n % every and n != self._last_batch):
            return
        bar = self.train_progress_bar
        bar.n = n
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # draws the bar


class StopOnSignal(pl.Callback):
    """Ends a fit after the step under way on Ctrl-C (SIGINT) or SIGTERM (sent by schedulers such as SLURM).

    With several processes they stop at the step where they next agree, within ``log_every_n_steps`` steps. The command
    then ends with ``TrainingInterrupted``; a second Ctrl-C quits at once. Used as it is when checkpointing is off.
    """

    every_n_train_steps = 0  # steps with work even without a signal: none here

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, as Python would have the first time
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signum = signum
        self._call_at_every_step()  # to stop after the step under way
        print(
            f"\n{signal.Signals(signum).name} received: {self._stopping}, then stopping (Ctrl-C again to quit at once)",
            file=sys.stderr,
        )

    _stopping = "finishing this step"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installs a SIGTERM handler of its own after `on_fit_start`, wrapping this one. It ends the fit at
        # the end of the step with exit code 0 and no checkpoint, so a SIGTERM landing after this callback's check
        # in `on_train_batch_end` (while a step checkpoint is written, say) was lost. Training answers to this
        # handler alone; Lightning restores its own, and `teardown` the ones from before the fit.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self._on_signal)
        # Lightning calls `on_train_batch_end` at every step (~20 Python calls); it has work there only with step
        # saves, or with several processes, which must agree on a stop. Otherwise a stop signal switches it on.
        if not self.every_n_train_steps and trainer.world_size == 1 and self.signum is None:
            self.on_train_batch_end = None  # Lightning skips a hook that is not callable, see skip_unused_batch_hooks

    def _call_at_every_step(self) -> None:
        vars(self).pop("on_train_batch_end", None)  # the class's own hook again

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning calls no teardown hook after an exception

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        self._call_at_every_step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stop = self.signum is not None
        if trainer.world_size > 1:
            # Every process must take the same decision, or the ones that stop leave the others waiting. Agreeing
            # is a collective, a wait for the device on GPUs: done every log_every_n_steps steps and at the
            # epoch's last batch (the same steps on every process), not at every step.
            last_batch = batch_idx + 1 >= trainer.num_training_batches
            if trainer.global_step % trainer.log_every_n_steps == 0 or last_batch:
                stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            else:
                stop = False
        every = self.every_n_train_steps
        path = None
        if stop or (every and trainer.global_step % every == 0):
            path = self._save(trainer)
        if stop:
            raise TrainingInterrupted(self.signum or signal.SIGTERM, path)

    def _save(self, trainer: pl.Trainer) -> str | None:
        return None  # nothing to save: checkpointing is off


class ResumableCheckpoint(StopOnSignal, Checkpoint):
    """Keeps ``checkpoints/last.ckpt`` current: every N training steps, at every epoch's end, on a stop signal.

    With the ``checkpoint`` callback's ``save_last: true`` this callback writes ``last.ckpt`` in its place, at every
    epoch's end. Ctrl-C (SIGINT) or SIGTERM lets the current step finish, saves the checkpoint and ends the command
    (``StopOnSignal``); ``fit --ckpt_path last`` then continues at the next batch.

    Lightning calls checkpoint callbacks (subclasses of ``Checkpoint``) after all others and after the model's own
    epoch-end hook, in the order given: this one comes after the ``checkpoint`` callback, and so knows whether that
    one has just saved the same state under another name. ``last.ckpt`` is then a second name of that file (a hard
    link), not a second save.

    Args:
        every_n_train_steps: Also save ``last.ckpt`` every this many training steps; 0 saves it only at epoch ends.
            Bounds the work a crash can lose to this many steps.
    """

    _stopping = "saving a checkpoint after this step"

    def __init__(self, every_n_train_steps: NonNegativeInt = 0) -> None:
        super().__init__()
        self.every_n_train_steps = every_n_train_steps
        self._last_at_step: int | None = None  # the training step last.ckpt was last written at
        self._keeps_last_of: ModelCheckpoint | None = None  # the checkpoint callback whose last.ckpt this one writes

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._last_at_step = None  # step counts name states only within one fit
        callback = model_checkpoint(trainer)
        if stage == "fit" and callback is not None and callback.save_last is True:
            # With a monitor, Lightning 2.6 writes last.ckpt only at a step where it saves the monitored checkpoint,
            # that is where the monitored value improved: after an epoch that did not improve it, last.ckpt held an
            # older epoch and `--ckpt_path last` went back to it. Where it did, it saved the same state twice. This
            # callback writes last.ckpt at every epoch's end instead; the setting is given back in `teardown`.
            callback.save_last = False
            self._keeps_last_of = callback

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._keeps_last_of is not None:
            self._keeps_last_of.save_last = True
            self._keeps_last_of = None
        super().teardown(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._keeps_last_of is not None and not trainer.fast_dev_run and self._last_at_step != trainer.global_step:
            self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> str | None:
        # The checkpoint callback's own last.ckpt (it has no version counter in this project): overwritten.
        path = last_checkpoint_path(trainer)
        if path is None:
            return None
        if self._keeps_last_of is not None:
            self._keeps_last_of.last_model_path = str(path)  # as the callback sets it, before the save
        if not self._link_to_save_of_this_step(trainer, path):
            trainer.save_checkpoint(path)
        self._last_at_step = trainer.global_step
        return str(path)

    def _link_to_save_of_this_step(self, trainer: pl.Trainer, path: Path) -> bool:
        """Make ``path`` a second name of the full checkpoint just saved at this step, if there is one.

        Nothing changes the state between that save and this one, so the file is the same; a link with its directory
        flush costs a fraction of a save (about 1 % of an epoch of the MLP at batch 256 on a CPU). Single process
        only: `Trainer.save_checkpoint` waits for every process, so all must do the same, and only process 0 knows
        which file it wrote.
        """
        io = trainer.strategy.checkpoint_io
        saved = io.last_full_save if isinstance(io, DurableCheckpointIO) else None
        if trainer.world_size > 1 or saved is None:
            return False
        source, step = saved
        return step == trainer.global_step and source != path and durable_link(source, path)


def model_checkpoint(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The run's first ModelCheckpoint: ``trainer.checkpoint_callback`` is the first of any kind of checkpoint."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)


def last_checkpoint_path(trainer: pl.Trainer) -> Path | None:
    """Where the run's ModelCheckpoint keeps ``last.ckpt``; None without checkpointing."""
    callback = model_checkpoint(trainer)
    if callback is None or callback.dirpath is None:
        return None
    return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of the tensors is finite (not NaN, not infinite); one wait for an accelerator.

    A NaN or an infinity makes a sum NaN or infinite, and a sum is one pass over the data: `torch.isfinite` over every
    element took ~12x as long on a CPU (~300 µs against ~25 µs for the MLP's weights, timed alone; ~2 ms a checkpoint
    amid training). Finite values can still add up past the largest float, so a sum that is not finite is followed by
    the check element by element.
    """
    total = torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum()
    if bool(torch.isfinite(total)):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class NonFiniteLossGuard(pl.Callback):
    """Stops training at the first NaN or infinite loss or weight, before it reaches a checkpoint.

    Lightning would carry on, training and saving a model of NaNs. Checking the loss costs a host sync, which is
    free on a CPU; on an accelerator, checking every few steps saves that wait at the price of a later stop. The
    weights are checked too, before every checkpoint and when a validation starts (the checkpoints after it hold
    those weights): a step's loss says nothing of the update it made, and one that overflowed leaves weights that are
    not finite, which a checkpoint saved at that step's end would keep as the last good one.

    Args:
        check_every_n_steps: Check the loss every this many training steps. By default every step on a CPU, and on
            an accelerator every ``log_every_n_steps`` steps, when Lightning reads the logged loss anyway.
    """

    def __init__(self, check_every_n_steps: PositiveInt | None = None) -> None:
        self.check_every_n_steps = check_every_n_steps
        self._every = 1  # the loss checks' interval in this fit
        self._weights_checked_at: int | None = None  # the training step whose weights were last found finite

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Settled once per fit: at every step, reading the module's device took ~2 µs of a ~1 ms step (MLP, CPU).
        every = self.check_every_n_steps
        self._every = every or (1 if pl_module.device.type == "cpu" else trainer.log_every_n_steps)
        # A step count names the weights only within one run: a callback reused for another fit, or a fit after
        # Lightning's learning-rate finder restored the weights, counts its steps from the start again.
        self._weights_checked_at = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        every = self._every
        if every > 1 and trainer.global_step % every:  # the step count is ~3 µs of Lightning properties to read
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or math.isfinite(loss.item()):
            return
        self._stop(trainer, f"the loss is {loss.item()}")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The checkpoints saved after a validation hold the weights as they are now: checked here, before the
        # validation hands its pictures to a thread of their own (mnist.reporting.log_image). Beside that thread the
        # check's operations waited for a core, 1-3.5 ms instead of ~0.25 (MLP, 2-core CPU, amid training).
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._check_weights(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Raised before the file is written: the one from before stays (see mnist.checkpoint_io).
        self._check_weights(trainer, pl_module)

    def _check_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The parameters, not the whole state dict: a metric's state may rightly be infinite (the best loss so far
        # starts at inf). Weights change only at an optimizer step: a validation and the saves after it at one step
        # need one check.
        if self._weights_checked_at == trainer.global_step:
            return
        weights = [p.detach() for p in pl_module.parameters()]
        if weights and not all_finite(weights):
            self._stop(trainer, "the weights are no longer finite after the last update")
        self._weights_checked_at = trainer.global_step

    @staticmethod
    def _stop(trainer: pl.Trainer, what: str) -> None:
        lrs = sorted({group["lr"] for opt in trainer.optimizers for group in opt.param_groups})
        last = last_checkpoint_path(trainer)
        kept = ""
        if last is not None:
            kept = str(last) if last.is_file() else model_checkpoint(trainer).best_model_path
        raise UserError(
            f"training stopped at step {trainer.global_step} (epoch {trainer.current_epoch}): {what}. The learning "
            f"rate ({', '.join(f'{lr:g}' for lr in lrs)}) is probably too high; lower "
            "--model.optimizer.init_args.lr. "
            + (f"The last good checkpoint is kept: {kept}" if kept else "No checkpoint was saved before it.")
        )


class PredictionCSVWriter(BasePredictionWriter):
    """Writes ``predict`` results to ``<run dir>/predictions-<checkpoint>.csv``, one row per image.

    For the test set the columns are ``index`` (position in the test set), ``target``, ``prediction``,
    ``class_name`` (the predicted class's name) and ``confidence`` (the prediction's softmax probability); for the
    user's own images (``--data.predict_path``) ``path``, ``prediction``, ``class_name``, ``confidence`` and each
    class's probability ``p0`` ... ``p9``. With several processes, each writes its share and process 0 merges them.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        self.ckpt_name = "model"
        self.path: Path | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:
            self.ckpt_name = Path(trainer.ckpt_path).stem

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        own_images = getattr(trainer.datamodule, "predict_paths", None)
        path = run_dir / f"predictions-{'images-' if own_images else ''}{self.ckpt_name}.csv"
        # The data set positions this process predicted, in order; the sampler knows them under DDP too.
        index = trainer.predict_dataloaders.sampler.indices().tolist()
        columns = {key: torch.cat([p[key] for p in predictions]).float().cpu() for key in predictions[0]}
        rows = [
            [i, int(t), int(p), round(float(c), 6), *(round(float(q), 6) for q in probs)]
            for i, t, p, c, probs in zip(
                index, columns["target"], columns["prediction"], columns["confidence"], columns["probs"], strict=False
            )
        ]
        if trainer.world_size > 1:
            part = path.with_suffix(f".rank{trainer.global_rank}.pt")
            run_dir.mkdir(parents=True, exist_ok=True)
            torch.save(rows, part)
            trainer.strategy.barrier()
            if not trainer.is_global_zero:
                return
            parts = [path.with_suffix(f".rank{r}.pt") for r in range(trainer.world_size)]
            rows = sorted(row for p in parts for row in torch.load(p))
            for p in parts:
                p.unlink()
        names = pl_module.class_names
        if own_images:
            header = ["path", "prediction", "class_name", "confidence", *(f"p{k}" for k in range(len(names)))]
            rows = [[str(own_images[i]), p, names[p], c, *probs] for i, _, p, c, *probs in rows]
        else:
            header = ["index", "target", "prediction", "class_name", "confidence"]
            rows = [[i, t, p, names[p], c] for i, t, p, c, *_ in rows]
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        tmp.replace(path)
        self.path = path
        if own_images:
            width = max(len(str(row[0])) for row in rows[:20])
            for row in rows[:20]:
                print(f"{row[0]:<{width}}  {row[2]}  ({100 * row[3]:.1f} %)")
            if len(rows) > 20:
                print(f"... and {len(rows) - 20} more")
        print(f"Predictions for {len(rows)} images written to {path}")

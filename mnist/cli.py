"""The command line: ``LightningCLI`` with run directories, checkpoint lookup, runs carried by their checkpoints.

python main.py fit --config config.yaml
python main.py test --ckpt_path best
"""

import importlib
import re
import signal
import sys
import textwrap
from pathlib import Path

import torch
import yaml
from jsonargparse import Namespace, set_parsing_settings
from jsonargparse.typing import PositiveInt
from lightning_fabric.plugins import CheckpointIO
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import TensorBoardLogger

from mnist import runs
from mnist.callbacks import (
    NonFiniteLossGuard,
    PredictionCSVWriter,
    ResumableCheckpoint,
    StopOnSignal,
    model_checkpoint,
    skip_idle_checkpoint_batch_hook,
    skip_unused_batch_hooks,
    skip_unused_step_hooks,
)
from mnist.checkpoint_io import DurableCheckpointIO
from mnist.console import quiet_console
from mnist.data import MNISTDataModule
from mnist.errors import TrainingInterrupted, UserError, exit_with_message
from mnist.logger import StageTensorBoardLogger
from mnist.model import MNISTClassifier
from mnist.profiler import NullProfiler
from mnist.reporting import log_hyperparameters, print_model_summary, run_summary

# `--print_completion shtab-bash` (or shtab-zsh) prints a shell completion script; it needs the optional `shtab`.
set_parsing_settings(add_print_completion_argument=True)
quiet_console()

# TensorBoard's address with smoothing off: its default (0.6) bends the epoch curves below their values.
TENSORBOARD_URL = "http://localhost:6006/?smoothing=0"

# What a checkpoint's saved config holds that belongs to the command that wrote it, not to the run.
COMMAND_KEYS = ("ckpt_path", "weights_only", "verbose", "return_predictions")


class MNISTArgumentParser(LightningArgumentParser):
    """Prints a one-line usage above a parse error instead of all ~80 options; ``--help`` still lists them."""

    def print_usage(self, file=None) -> None:
        print(f"usage: {self.prog.replace(' [options]', '')} [--help] [--config CONFIG] [--KEY VALUE ...]", file=file)

    def error(self, message: str, ex: Exception | None = None):
        super().error(_condense(message), ex)


class RunConfigSaver(SaveConfigCallback):
    """Saves the exact config of every command into its run directory and every checkpoint, never over an earlier one.

    A resumed ``fit`` or a test of the same run writes ``config-1.yaml``, ``config-2.yaml``, ... . A ``fit`` also
    sends a summary of the settings people compare runs by to every logger (TensorBoard's HParams tab).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._dumped: str | None = None

    @property
    def state_key(self) -> str:
        return runs.RUN_CONFIG_KEY

    def state_dict(self) -> dict[str, str]:
        # In every checkpoint: `--ckpt_path` without `--config` continues or evaluates the run as it was configured.
        # Dumped once: the config does not change during a run, and a dump costs ~40 ms, two per epoch.
        if self._dumped is None:
            self._dumped = self.parser.dump(self.config, skip_none=False)
        return {"config": self._dumped}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = Path(trainer.log_dir)
        name = None
        if trainer.is_global_zero:
            name, n = "config.yaml", 0
            while (log_dir / name).exists():
                n += 1
                name = f"config-{n}.yaml"
        self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero:
            # Printed here, after the data module's setup, so that bad input fails before a run is announced.
            print(f"Run directory: {log_dir} (config saved as {self.config_filename})", file=sys.stderr)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            log_hyperparameters(trainer.loggers, run_summary(self.config, trainer, pl_module))


class MNISTCLI(LightningCLI):
    """LightningCLI for this project; see the module docstring for how to run it."""

    def __init__(self, args=None, **kwargs) -> None:
        kwargs.setdefault("parser_class", MNISTArgumentParser)
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        # Runs go where plain Lightning puts them, under default_root_dir: logs/lightning_logs/version_N. A caller's
        # own defaults come on top, e.g. `trainer_defaults={"callbacks": [...]}` (mnist.sweep's trial reporter).
        kwargs["trainer_defaults"] = {"default_root_dir": "logs", **(kwargs.get("trainer_defaults") or {})}
        # The optimizer and scheduler are the model's own typed arguments (--model.optimizer), so the CLI's
        # generic top-level --optimizer / --lr_scheduler would only be a second way to say the same thing.
        kwargs.setdefault("auto_configure_optimizers", False)
        # The same seed as config.yaml, also for commands run without it (`python main.py test --ckpt_path ...`).
        kwargs.setdefault("seed_everything_default", 42)
        # Any data module: --data mnist.data.FashionMNISTDataModule, or one of your own.
        kwargs.setdefault("subclass_mode_data", True)
        self.resumed_from: tuple[Path, int, int] | None = None  # a checkpoint's path, epoch and step, with --ckpt_path
        self._print_summary = False  # set by instantiate_trainer: the summary is printed before fit, not by a callback
        super().__init__(MNISTClassifier, MNISTDataModule, args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": "mnist.data.MNISTDataModule"}})
        # What the model must know about the data, stated once, by the data module.
        for name in ("num_classes", "image_shape", "mean", "std", "class_names"):
            parser.link_arguments("data", f"model.{name}", compute_fn=_attribute(name), apply_on="instantiate")
        parser.add_argument(
            "--num_threads",
            type=PositiveInt | None,
            default=None,
            help="CPU threads PyTorch may use in this process (torch.set_num_threads); PyTorch's default if not given.",
        )
        parser.add_class_arguments(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:02d}-val_loss{val/loss:.4f}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                # Every run has a directory of its own: nothing in it is from another run to protect by numbering.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_class_arguments(ResumableCheckpoint, "resumable")
        parser.add_class_arguments(NonFiniteLossGuard, "nan_guard")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        args = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict | Namespace) else args
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        if config.get("weights_only") is None:
            # Load checkpoints as tensors and plain containers only: unpickling can run arbitrary code.
            config.weights_only = True
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        path = self._resolve_checkpoint(ckpt_path, config)
        checkpoint = runs.check_checkpoint(path, weights_only=config.weights_only)
        saved = runs.saved_config(checkpoint)
        if saved and not config.get("config") and isinstance(args, list):
            # The run's own config is the base; what the command line says comes on top of it.
            print(
                f"Using the config of the run that wrote {path}; flags on the command line override it", file=sys.stderr
            )
            where = args.index(subcommand) + 1
            self.config = parser.parse_args([*args[:where], "--config", _run_settings(saved), *args[where:]])
            config = self.config[subcommand]
            config.weights_only = True if config.get("weights_only") is None else config.weights_only
        config.ckpt_path = str(path)
        self.resumed_from = (path, checkpoint.get("epoch", 0), checkpoint.get("global_step", 0))
        if not config.weights_only:
            _trust_globals_of(path)
        _continue_run_of(path, config)

    def _resolve_checkpoint(self, ckpt_path: str, config: Namespace) -> Path:
        path = runs.find_checkpoint(ckpt_path, _checkpoint_roots(config))
        if ckpt_path in ("best", "last"):
            print(f"Using the {ckpt_path} checkpoint of {path.parent.parent}: {path}", file=sys.stderr)
        return path

    def before_instantiate_classes(self) -> None:
        threads = self.config[self.subcommand].get("num_threads") if self.subcommand else None
        if threads:
            torch.set_num_threads(threads)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        init = self.config_init[self.subcommand]
        trainer = init["trainer"]
        callbacks = trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        # config.yaml configures a progress bar; a command line that turns the bar off means that one too.
        if trainer.get("enable_progress_bar") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        # The model summary is printed by `before_fit`, without the metric objects Lightning's callback would list.
        self._print_summary = trainer.get("enable_model_summary") is not False and not any(
            isinstance(c, ModelSummary) for c in callbacks
        )
        if self._print_summary:
            kwargs["enable_model_summary"] = False
        if trainer.get("logger") in (None, True):
            # Lightning's default logger, laid out for reading at a glance (mnist/logger.py).
            kwargs.setdefault("logger", StageTensorBoardLogger(save_dir=trainer.get("default_root_dir") or "."))
        if trainer.get("profiler") is None:
            kwargs.setdefault("profiler", NullProfiler())
        checkpointing = trainer.get("enable_checkpointing") is not False
        if checkpointing:
            # Also when evaluating: Lightning warns when a checkpoint's callbacks are missing.
            callbacks.append(init["checkpoint"])
        if self.subcommand == "fit":
            # Lightning refuses checkpoint callbacks with checkpointing off; a stop signal still stops cleanly.
            callbacks += [init["resumable"] if checkpointing else StopOnSignal(), init["nan_guard"]]
        if self.subcommand == "predict":
            # Only where it has work.
            callbacks.append(PredictionCSVWriter())
        plugins = trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(DurableCheckpointIO())
        trainer = super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)
        # All of them, LightningCLI's config saver and the caller's own included.
        skip_unused_batch_hooks(trainer.callbacks)
        # The model is built before the trainer (LightningCLI.instantiate_classes).
        skip_unused_step_hooks(self.model, clips_gradients=bool(trainer.gradient_clip_val))
        if init["checkpoint"] in trainer.callbacks:
            saving = self.config[self.subcommand].checkpoint
            skip_idle_checkpoint_batch_hook(init["checkpoint"], saving.every_n_train_steps, saving.train_time_interval)
        return trainer

    def before_fit(self) -> None:
        if self._print_summary and self.trainer.is_global_zero:
            print_model_summary(self.model)

    def after_fit(self) -> None:
        resumed = self.resumed_from
        if resumed is not None and self.trainer.global_step == resumed[2]:
            # Lightning ends such a fit quietly, with nothing trained.
            raise UserError(
                f"{resumed[0]} has already trained to epoch {resumed[1]} and --trainer.max_epochs is "
                f"{self.trainer.max_epochs}: nothing was trained. Raise --trainer.max_epochs to continue the run"
            )
        self._report_where_logged("fit")

    def after_validate(self) -> None:
        self._report_where_logged("validate")

    def after_test(self) -> None:
        self._report_where_logged("test")

    def _report_where_logged(self, stage: str) -> None:
        # `trainer.log_dir` broadcasts, a collective call that only process 0 would make here; the logger's does not.
        log_dir = self.trainer.logger.log_dir if self.trainer.logger is not None else None
        if not self.trainer.is_global_zero:
            return
        callback = model_checkpoint(self.trainer)
        if stage == "fit" and callback is not None and callback.best_model_path:
            score = callback.best_model_score
            best = f" ({callback.monitor} {score:.4f})" if score is not None and callback.monitor else ""
            print(f"Best checkpoint{best}: {callback.best_model_path}", file=sys.stderr)
        if log_dir is not None:
            print(f"{'Run directory' if stage == 'fit' else 'Logged to'}: {log_dir}", file=sys.stderr)
        tensorboard = [lg for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if tensorboard:
            # Unsmoothed: a curve of a few epoch values under TensorBoard's default smoothing ends below its value.
            print(
                f"Curves: tensorboard --logdir {tensorboard[0].root_dir}, then open {TENSORBOARD_URL}", file=sys.stderr
            )


def _condense(message: str) -> str:
    """A data-module option's parse error, said as for any other option.

    The data module is a class chosen by ``--data``, so jsonargparse reports a bad ``--data.KEY`` as a failure to
    match each possible type; only the chosen class's complaint matters.
    """
    match = re.search(
        r'Parser key "([^"]+)":\n\s+Does not validate against any of the Union subtypes.*?'
        r"- Problem with given class_path '[^']+':\n(.*?)\n\s+- ",
        message,
        re.S,
    )
    if match is None:
        return message
    key, inner = match.group(1), textwrap.dedent(match.group(2)).strip()
    inner = re.sub(r'^Parser key "([^"]+)"', lambda m: f'Parser key "{key}.{m.group(1)}"', inner)
    return re.sub(
        r"^Option '([^']+)' is not accepted", lambda m: f"unrecognized arguments: --{key}.{m.group(1)}", inner
    )


def _attribute(name: str):
    """A link's value: the data module's attribute, a tuple as a list, as it reads in the checkpoint's YAML config."""

    def compute(data):
        value = getattr(data, name)
        return list(value) if isinstance(value, tuple | list) else value

    return compute


def _run_settings(saved: str) -> str:
    """A run's saved config without the keys that belonged to the command that saved it."""
    settings = yaml.safe_load(saved)
    for key in COMMAND_KEYS:
        settings.pop(key, None)
    return yaml.safe_dump(settings, sort_keys=False)


def _loggers(config: Namespace) -> list[Namespace]:
    logger = config.trainer.get("logger")
    listed = logger if isinstance(logger, list) else [logger]
    return [item for item in listed if isinstance(item, Namespace)]


def _root_dir(config: Namespace) -> Path:
    return Path(config.trainer.get("default_root_dir") or ".")


def _checkpoint_roots(config: Namespace) -> list[Path]:
    """Where runs of this config keep checkpoints: the loggers' folders, default_root_dir, the checkpoint dirpath."""
    roots = [_root_dir(config)]
    for logger in _loggers(config):
        save_dir = (logger.get("init_args") or Namespace()).get("save_dir")
        if save_dir:
            roots.append(Path(save_dir))
    if config.get("checkpoint") and config.checkpoint.get("dirpath"):
        roots.append(Path(config.checkpoint.dirpath))
    return list(dict.fromkeys(roots))


def _continue_run_of(path: Path, config: Namespace) -> None:
    """Log a resumed fit or an evaluation of a TensorBoard run's checkpoint into that run, beside its curves.

    Other loggers open a new run of their own, as Lightning's do by default.
    """
    run_dir = path.parent.parent
    if path.parent.name != "checkpoints":
        return
    if config.trainer.get("logger") in (None, True):
        # Lightning's default logger, spelled out to give it the run's version.
        if run_dir.parent.resolve() != (_root_dir(config) / "lightning_logs").resolve():
            return
        config.trainer.logger = Namespace(
            class_path="mnist.logger.StageTensorBoardLogger",
            init_args=Namespace(save_dir=str(_root_dir(config)), name="lightning_logs"),
        )
    first = _loggers(config)[:1]
    if not first or not str(first[0].class_path).endswith("TensorBoardLogger"):
        return
    args = first[0].init_args
    if run_dir.parent.resolve() == (Path(args.save_dir) / (args.get("name") or "")).resolve():
        args.version = run_dir.name


def _trust_globals_of(path: Path) -> None:
    """Allow the Python objects of a checkpoint the user said to trust (--weights_only false).

    Lightning's CLI reads a checkpoint's hyperparameters with ``weights_only=True`` whatever ``--weights_only`` says;
    listing the file's own globals as safe lets that read succeed for this file only.
    """
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
        module, _, attribute = name.rpartition(".")
        try:
            torch.serialization.add_safe_globals([getattr(importlib.import_module(module), attribute)])
        except (ImportError, AttributeError):
            continue  # torch.load will name it


def run_cli(args=None) -> None:
    """Run the command line, turning the user's mistakes into one line on stderr instead of a traceback.

    A `UserError` or a Lightning misconfiguration exits with code 1 (MNIST_DEBUG=1 shows the traceback);
    jsonargparse's parse errors exit with code 2.
    """
    try:
        MNISTCLI(args=args)
    except TrainingInterrupted as stop:
        name = signal.Signals(stop.signum).name
        where = f"checkpoint saved: {stop.checkpoint}" if stop.checkpoint else "checkpointing is off, nothing saved"
        print(f"Stopped by {name}; {where}. Resume with the same command plus --ckpt_path last", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except (UserError, MisconfigurationException) as err:
        exit_with_message(err)

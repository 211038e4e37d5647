"""The command line: ``LightningCLI`` with run directories, checkpoint lookup and one-line errors.

python main.py fit --config config.yaml
python main.py test --ckpt_path best
"""

import pickle
import signal
import sys
import warnings
from pathlib import Path

from jsonargparse import Namespace, lazy_instance
from lightning_fabric.plugins import CheckpointIO
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import TensorBoardLogger

from mnist import runs
from mnist.callbacks import NonFiniteLossGuard, PredictionCSVWriter, ResumableCheckpoint
from mnist.checkpoint_io import DurableCheckpointIO
from mnist.data import MNISTDataModule
from mnist.errors import TrainingInterrupted, UserError, exit_with_message
from mnist.model import MNISTClassifier

# The CSV writer takes each sample's index from the loader's sampler, not from Lightning's batch indices.
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")


class MNISTArgumentParser(LightningArgumentParser):
    """Prints a one-line usage above a parse error instead of all ~80 options; ``--help`` still lists them."""

    def print_usage(self, file=None) -> None:
        print(f"usage: {self.prog.replace(' [options]', '')} [--help] [--config CONFIG] [--KEY VALUE ...]", file=file)


class RunConfigSaver(SaveConfigCallback):
    """Saves the exact config of every command into its run directory, never over an earlier one.

    A resumed ``fit`` or a second ``test`` of the same run writes ``config-1.yaml``, ``config-2.yaml``, ...
    """

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


class MNISTCLI(LightningCLI):
    """LightningCLI for this project; see the module docstring for how to run it."""

    def __init__(self, args=None, **kwargs) -> None:
        kwargs.setdefault("parser_class", MNISTArgumentParser)
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault(
            "trainer_defaults",
            {"logger": lazy_instance(TensorBoardLogger, save_dir="logs", name="mnist", default_hp_metric=False)},
        )
        # The optimizer and scheduler are the model's own typed arguments (--model.optimizer), so the CLI's
        # generic top-level --optimizer / --lr_scheduler would only be a second way to say the same thing.
        kwargs.setdefault("auto_configure_optimizers", False)
        # The same seed as config.yaml, also for commands run without it (`python main.py test --ckpt_path ...`).
        kwargs.setdefault("seed_everything_default", 42)
        super().__init__(MNISTClassifier, MNISTDataModule, args=args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:02d}-val_loss{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                # Every run has a directory of its own: nothing in it is from another run to protect by numbering.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(ResumableCheckpoint, "resumable")
        parser.add_lightning_class_args(NonFiniteLossGuard, "nan_guard")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # config.yaml always configures a progress bar, checkpoints and a learning-rate monitor; drop them where
        # the command line turns that feature off, where Lightning would otherwise refuse to start.
        unwanted: list[type] = []
        if config.get("enable_progress_bar") is False:
            unwanted.append(ProgressBar)
        if config.get("enable_checkpointing") is False:
            unwanted.append(ModelCheckpoint)
        if config.get("logger") in (False, None) or config.get("fast_dev_run"):
            unwanted.append(LearningRateMonitor)
        if unwanted:
            callbacks = [c for c in callbacks if not isinstance(c, tuple(unwanted))]
            listed = config.get("callbacks")
            if isinstance(listed, list):
                config["callbacks"] = [c for c in listed if not isinstance(c, tuple(unwanted))]
        if self.subcommand == "predict":
            # Only where it has work: Lightning calls every callback at every hook of every step, ~5 µs each here.
            callbacks = [*callbacks, PredictionCSVWriter()]
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, DurableCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
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
        logger = _tensorboard_logger_args(config)
        runs_root = _runs_root(config, logger)
        if ckpt_path in ("best", "last"):
            run = runs.newest_run_with_checkpoints(runs_root)
            path = runs.best_checkpoint(run) if ckpt_path == "best" else runs.last_checkpoint(run)
            print(f"Using the {ckpt_path} checkpoint of {run}: {path}", file=sys.stderr)
            config.ckpt_path = str(path)
        path = Path(config.ckpt_path)
        runs.check_checkpoint(path, weights_only=config.weights_only)
        run_dir = path.parent.parent
        if (
            logger is not None
            and path.parent.name == "checkpoints"
            and runs.run_version(run_dir) is not None
            and run_dir.parent.resolve() == runs_root.resolve()
        ):
            # Continue the checkpoint's own run: a resumed fit extends its curves, and an evaluation lands in a
            # sub-directory of it (`version_N/test`) so that its step-0 points never mix with the training curves.
            logger.version = runs.run_version(run_dir)
            if subcommand != "fit":
                logger.sub_dir = subcommand

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters with weights_only=True, even for a checkpoint the user
        # chose to trust with --weights_only false; such a checkpoint then takes its network from the config.
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError:
            pass

    def after_fit(self) -> None:
        # `trainer.log_dir` broadcasts, a collective call that only process 0 would make here; the logger's does not.
        log_dir = self.trainer.logger.log_dir if self.trainer.logger is not None else None
        if not self.trainer.is_global_zero:
            return
        callback = self.trainer.checkpoint_callback
        if callback is not None and callback.best_model_path:
            print(f"Best checkpoint: {callback.best_model_path}", file=sys.stderr)
        if log_dir is not None:
            print(f"Run directory: {log_dir}", file=sys.stderr)
            print(f"Curves: tensorboard --logdir {Path(log_dir).parent.parent}", file=sys.stderr)


def _tensorboard_logger_args(config: Namespace) -> Namespace | None:
    """The init_args of the configured TensorBoardLogger, editable in place; None for any other logger."""
    logger = config.trainer.get("logger")
    if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return logger.init_args
    return None


def _runs_root(config: Namespace, logger: Namespace | None) -> Path:
    if logger is not None:
        return Path(logger.save_dir) / (logger.get("name") or "")
    return Path(config.trainer.get("default_root_dir") or ".") / "lightning_logs"


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

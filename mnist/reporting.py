"""What a run reports to its loggers beyond scalars: pictures and a hyperparameter summary, for any logger.

Lightning's loggers share ``log_metrics`` and ``log_hyperparams`` but no way to log a picture, and TensorBoard's
HParams tab reads hyperparameters from a summary of its own. The per-logger code lives here, so that the model and
the callbacks name no logger class.
"""

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_lightning.callbacks import ModelSummary
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities.model_summary import get_human_readable_count, summarize
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from torch.utils.tensorboard.writer import FileWriter

from mnist.logger import StageTensorBoardLogger


def log_image(loggers: Iterable[Logger], tag: str, image: Image.Image, step: int, background: bool = False) -> None:
    """Log an RGB picture to every logger that can take one.

    TensorBoard, W&B and MLflow through their own image APIs; CSVLogger, which has none, as a PNG file beside
    its ``metrics.csv`` (``images/<tag>/step_<step>.png``). ``background``: this project's TensorBoard logger may
    encode and write it on a thread of its own (``StageTensorBoardLogger.log_image``), which ``wait_for_pictures``
    waits for.
    """
    for logger in loggers:
        if isinstance(logger, StageTensorBoardLogger):
            logger.log_image(tag, image, step, background)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, np.asarray(image), step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[image], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, f"{tag}/step_{step:06d}.png")
        elif isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / "images" / tag / f"step_{step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)


def wait_for_pictures(loggers: Iterable[Logger]) -> None:
    """Wait until every picture ``log_image`` handed to a thread of its own is written."""
    for logger in loggers:
        if isinstance(logger, StageTensorBoardLogger):
            logger.wait_for_pictures()


def log_hyperparameters(loggers: Iterable[Logger], params: dict[str, bool | int | float | str]) -> None:
    """Record a run's hyperparameters with every logger.

    For TensorBoard only the run's session is written, in an event file of its own, and no experiment summary
    (``TensorBoardLogger.log_hyperparams`` writes one, plus a placeholder metric at step 0). Without one, the HParams
    tab lists the settings of every run, not only of the first it reads, marks those that differ between runs
    and shows them first, and takes the metrics from the scalars each run logged.
    """
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            _, session_start, _ = hparams_summaries(params, {})
            writer = FileWriter(logger.log_dir)
            writer.add_summary(session_start)
            writer.close()
        else:
            logger.log_hyperparams(params)


def _init_args(spec) -> dict:
    """The ``init_args`` of a configured class (a ``class_path`` / ``init_args`` Namespace); {} for none."""
    args = spec.get("init_args") if spec is not None else None
    return dict(vars(args)) if args is not None else {}


def _value(value) -> bool | int | float | str:
    # Plain types only: jsonargparse's PositiveInt and the like would reach YAML files as Python objects.
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def run_summary(config, trainer, model) -> dict[str, bool | int | float | str]:
    """The settings people compare runs by, as they take effect, most telling first.

    Taken from the objects the command built where they exist at setup (network, optimizer defaults, data module,
    trainer), and from the config for the rest. Paths and library internals are left out. The learning rate is the
    one that applies: a one-cycle schedule's ``max_lr`` rather than the optimizer's ``lr``, which it overrides.
    """
    # The optimizer as configured, with every default filled in, built on a stand-in parameter: the model's own
    # is only built after setup.
    optimizer = model.optimizer([torch.zeros(1, requires_grad=True)])
    scheduler = config.model.get("lr_scheduler")
    spans_run = model.spans_run()
    data = trainer.datamodule.hparams
    network_args = _init_args(config.model.get("network"))
    summary = {
        "lr": _value(_init_args(scheduler)["max_lr"] if model.one_cycle() else optimizer.defaults["lr"]),
        "batch_size": _value(data.batch_size),
        # With its sizes: runs of different networks show them in one column, the only one that differs.
        "network": f"{type(model.network).__name__}({', '.join(f'{k}={v}' for k, v in network_args.items())})",
        "optimizer": type(optimizer).__name__,
        "lr_scheduler": str(scheduler.class_path).rsplit(".", 1)[-1] if scheduler is not None else "none",
    }
    for key in ("momentum", "weight_decay", "nesterov", "betas"):
        if key in optimizer.defaults:
            summary[f"optimizer.{key}"] = _value(optimizer.defaults[key])
    if scheduler is not None:
        summary["lr_scheduler.interval"] = "step" if spans_run else model.hparams.scheduler_interval
    for key, value in network_args.items():
        summary[f"network.{key}"] = _value(value)
    presets = [Path(str(p)).name for p in (config.get("config") or []) if Path(str(p)).suffix in (".yaml", ".yml")]
    summary.update(
        {
            "max_epochs": _value(trainer.max_epochs),
            "seed": _value(config.get("seed_everything")),
            "data.seed": _value(data.seed),
            "precision": _value(trainer.precision),
            "dataset": type(trainer.datamodule).__name__.removesuffix("DataModule"),
            "preset": "+".join(presets) or "none",
        }
    )
    return summary


def print_model_summary(model) -> None:
    """Lightning's model summary table, with only the modules that hold parameters (not the metric objects).

    Printed once before ``fit`` instead of by Lightning's ModelSummary callback, whose table would also list the ten
    validation and test metric objects.
    """
    summary = summarize(model, max_depth=1)
    rows = [i for i, n in enumerate(summary.param_nums) if n > 0]
    flops = [sum(counts.values()) for counts in summary.flop_counts.values()]
    columns = [
        (" ", [str(k) for k in range(len(rows))]),
        ("Name", [summary.layer_names[i] for i in rows]),
        ("Type", [summary.layer_types[i] for i in rows]),
        ("Params", [get_human_readable_count(summary.param_nums[i]) for i in rows]),
        ("Mode", ["train" if summary.training_modes[i] else "eval" for i in rows]),
        ("FLOPs", [get_human_readable_count(flops[i]) for i in rows]),
        ("In sizes", [str(summary.in_sizes[i]) for i in rows]),
        ("Out sizes", [str(summary.out_sizes[i]) for i in rows]),
    ]
    ModelSummary.summarize(
        columns,
        summary.total_parameters,
        summary.trainable_parameters,
        summary.model_size,
        summary.total_training_modes,
        total_flops=summary.total_flops,
    )

"""What a run reports to its loggers beyond scalars: pictures and a hyperparameter summary, for any logger.

Lightning's loggers share ``log_metrics`` and ``log_hyperparams`` but no way to log a picture, and TensorBoard's
HParams tab needs the metrics declared next to the hyperparameters. The per-logger code lives here, so that the
model and the callbacks name no logger class.
"""

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from torch.utils.tensorboard.writer import FileWriter

# The metrics TensorBoard's HParams tab shows next to each run's hyperparameters (its last value of each tag).
SUMMARY_METRICS = ("val/loss_best", "val/acc", "test/loss", "test/acc")


def log_image(loggers: Iterable[Logger], tag: str, image: np.ndarray, step: int) -> None:
    """Log an RGB ``(H, W, 3)`` uint8 picture to every logger that can take one.

    TensorBoard, W&B and MLflow through their own image APIs; CSVLogger, which has none, as a PNG file beside
    its ``metrics.csv`` (``images/<tag>/step_<step>.png``).
    """
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[image], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, f"{tag}/step_{step:06d}.png")
        elif isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / "images" / tag / f"step_{step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)


def log_hyperparameters(loggers: Iterable[Logger], params: dict[str, bool | int | float | str]) -> None:
    """Record a run's hyperparameters with every logger.

    For TensorBoard the summary also declares ``SUMMARY_METRICS``, so its HParams tab compares runs by them; it is
    written to an event file of its own, since ``TensorBoardLogger.log_hyperparams`` would also log each declared
    metric as a point at step 0.
    """
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            experiment, session_start, _ = hparams_summaries(params, dict.fromkeys(SUMMARY_METRICS, 0.0))
            writer = FileWriter(logger.log_dir)
            writer.add_summary(experiment)
            writer.add_summary(session_start)
            writer.close()
        else:
            logger.log_hyperparams(params)


def _class_name(spec) -> str:
    if spec is None:
        return "none"
    path = spec.get("class_path") if hasattr(spec, "get") else None
    return str(path or getattr(spec, "__name__", type(spec).__name__)).rsplit(".", 1)[-1]


def _init_args(spec) -> dict:
    args = spec.get("init_args") if hasattr(spec, "get") else None
    return dict(vars(args)) if args is not None and not isinstance(args, dict) else dict(args or {})


def _value(value) -> bool | int | float | str:
    # Plain types only: jsonargparse's PositiveInt and the like would reach YAML files as Python objects.
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def run_summary(config, model) -> dict[str, bool | int | float | str]:
    """The settings people compare runs by, as they took effect, most telling first.

    Paths and library internals are left out. The learning rate is the one that applies: a one-cycle schedule's
    ``max_lr`` rather than the optimizer's ``lr``, which it overrides.
    """
    model_cfg, data_cfg, trainer_cfg = config.model, config.data, config.trainer
    optimizer, scheduler = model_cfg.get("optimizer"), model_cfg.get("lr_scheduler")
    opt_args, sched_args = _init_args(optimizer), _init_args(scheduler)
    spans_run = model.spans_run()
    lr = sched_args.get("max_lr") if spans_run else opt_args.get("lr")
    summary = {
        "lr": _value(lr if lr is not None else 0.01),
        "batch_size": _value(_init_args(data_cfg).get("batch_size")),
        "network": _class_name(model_cfg.get("network") or {"class_path": "MLP"}),
        "optimizer": _class_name(optimizer) if optimizer is not None else "SGD",
        "lr_scheduler": _class_name(scheduler),
    }
    for key in ("momentum", "weight_decay", "nesterov", "betas"):
        if key in opt_args:
            summary[f"optimizer.{key}"] = _value(opt_args[key])
    if scheduler is not None:
        summary["lr_scheduler.interval"] = "step" if spans_run else model_cfg.get("scheduler_interval")
    for key, value in _init_args(model_cfg.get("network") or {}).items():
        summary[f"network.{key}"] = _value(value)
    presets = [Path(str(p)).name for p in (config.get("config") or []) if Path(str(p)).suffix in (".yaml", ".yml")]
    summary.update(
        {
            "max_epochs": _value(trainer_cfg.get("max_epochs")),
            "seed": _value(config.get("seed_everything")),
            "data.seed": _value(_init_args(data_cfg).get("seed")),
            "precision": _value(trainer_cfg.get("precision") or "32-true"),
            "dataset": _class_name(data_cfg).removesuffix("DataModule"),
            "preset": "+".join(presets) or "none",
        }
    )
    return summary

"""The LightningModule: trains any network from ``mnist.networks`` with cross-entropy and logs its metrics."""

from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mnist.errors import UserError
from mnist.metrics import LossAccuracy, WorstMistakes
from mnist.networks import MLP
from mnist.visuals import confusion_matrix_image, digit_grid_image


def sgd(params) -> torch.optim.Optimizer:
    """The tutorial's optimizer, used when none is configured: SGD with learning rate 0.01."""
    return torch.optim.SGD(params, lr=0.01)


class MNISTClassifier(pl.LightningModule):
    """Classifies MNIST digits with a configurable network, optimizer and learning-rate schedule.

    Args:
        network: The network mapping images ``(B, 1, 28, 28)`` to logits ``(B, num_classes)``; the tutorial's
            ``MLP`` when not given.
        optimizer: Optimizer class and its arguments, e.g. ``--model.optimizer SGD --model.optimizer.lr 0.1``;
            SGD with lr 0.01 when not given.
        lr_scheduler: Optional learning-rate scheduler class and its arguments.
        scheduler_interval: When the scheduler steps: after every ``epoch`` or every training ``step``.
        num_classes: Number of classes the network predicts.
    """

    def __init__(
        self,
        network: nn.Module | None = None,
        optimizer: OptimizerCallable = sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = network if network is not None else MLP(num_classes=num_classes)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        # Training metrics accumulate in one cheap update (see LossAccuracy); validation and test use torchmetrics'
        # own, one object per stage and quantity, so that each is reset and synced across processes on its own.
        # The loss is a weighted mean, exact with a smaller last batch and across processes. Accuracy is the share of
        # right predictions ("micro"), not torchmetrics' default mean over classes.
        self.train_metrics = LossAccuracy()
        for stage in ("val", "test"):
            setattr(self, f"{stage}_loss", MeanMetric())
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, average="micro"))
            setattr(self, f"{stage}_confusion", MulticlassConfusionMatrix(num_classes))
            setattr(self, f"{stage}_worst", WorstMistakes(WORST_SHOWN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # Metric objects only accumulate here, with tensor operations and no host sync; they are logged once per
        # epoch, in the `on_*_epoch_end` hooks, since each `self.log` costs about as much as this network's whole step.
        if stage == "train":
            self.train_metrics.update(loss, logits, y)
        else:
            getattr(self, f"{stage}_loss").update(loss, weight=y.numel())
            getattr(self, f"{stage}_acc").update(logits, y)
            # The pictures come from the predictions just made: no second pass over the data.
            getattr(self, f"{stage}_confusion").update(logits, y)
            getattr(self, f"{stage}_worst").update(x, y, logits)
        return loss

    def _log_evaluation(self, stage: str) -> None:
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), prog_bar=True)
        self.log(f"{stage}/acc", getattr(self, f"{stage}_acc"), prog_bar=stage == "val")
        self._log_pictures(stage)

    def _log_pictures(self, stage: str) -> None:
        confusion, worst = getattr(self, f"{stage}_confusion"), getattr(self, f"{stage}_worst")
        matrix = confusion.compute()  # synced across processes by torchmetrics
        mistakes = worst.gather(self)
        confusion.reset()
        worst.reset()
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        if not isinstance(self.logger, TensorBoardLogger):
            return
        step = self.global_step
        writer = self.logger.experiment
        writer.add_image(f"{stage}/confusion_matrix", confusion_matrix_image(matrix), step, dataformats="HWC")
        images, targets, predictions, confidences = mistakes
        if len(images):
            data = self.trainer.datamodule.hparams
            pixels = images * data.std + data.mean  # back to [0, 1] for display
            grid = digit_grid_image(pixels, targets, predictions, confidences)
            writer.add_image(f"{stage}/most_confident_mistakes", grid, step, dataformats="HWC")

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        # The step curve. Lightning writes step values only every `log_every_n_steps` steps, and a `self.log`
        # call costs about as much as this network's whole step, so it is made only on those steps.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss", loss.detach(), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_train_epoch_end(self) -> None:
        # compute() sums the states across processes, so the values are already global and Lightning's own
        # reduction (a mean of equal values) changes nothing; asking for it keeps Lightning from warning, under
        # DDP, that an epoch value was logged unsynced.
        values = self.train_metrics.compute()
        self.train_metrics.reset()
        self.log("train/loss_epoch", values["loss"], sync_dist=True)
        self.log("train/acc", values["acc"], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        probs = self(x).softmax(dim=1)
        confidence, prediction = probs.max(dim=1)
        return {"target": y, "prediction": prediction, "confidence": confidence, "probs": probs}

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        interval = self.hparams.scheduler_interval
        given = getattr(self.lr_scheduler, "keywords", {})
        extra = {}
        if "total_steps" in given and not (
            given["total_steps"] or (given.get("epochs") and given.get("steps_per_epoch"))
        ):
            # A schedule whose `total_steps` is left empty (OneCycleLR) spans the whole run, stepping every batch:
            # the config then stays right when the batch size, the split or the number of epochs changes.
            extra["total_steps"] = int(self.trainer.estimated_stepping_batches)
            interval = "step"
        scheduler = self.lr_scheduler(optimizer, **extra)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": "val/loss"},
        }

    def on_fit_start(self) -> None:
        # Lightning only fills TensorBoard's hparams tab with a placeholder `hp_metric`; declaring the real
        # validation metrics makes the tab show each run's hyperparameters against its val/loss and val/acc.
        if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            params = _flatten({"model": dict(self.hparams), "data": dict(self.trainer.datamodule.hparams)})
            writer = self.logger.experiment._get_file_writer()
            for summary in hparams_summary(params, {"val/loss": 0.0, "val/acc": 0.0}):
                writer.add_summary(summary)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning would fail later with a page of size mismatches; one line says what is wrong.
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
        if expected != found:
            differ = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            raise UserError(
                f"the checkpoint's network does not match the configured one ({len(differ)} tensors differ, "
                f"first {differ[0]}: checkpoint {found.get(differ[0])}, configured {expected.get(differ[0])}); "
                "drop the --model settings or --config that change the network, or use a matching checkpoint"
            )


WORST_SHOWN = 16


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Flatten nested hyperparameters to ``{"model.network.init_args.hidden_sizes": "[256, 128]", ...}``.

    Lightning's private entries (``_instantiator``) are left out: they are not hyperparameters.
    """
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat

"""The LightningModule: trains any network from ``mnist.networks`` with cross-entropy and logs its metrics."""

import copy
import sys
from collections.abc import Callable
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric, MinMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mnist.errors import UserError
from mnist.metrics import LossAccuracy, WorstMistakes
from mnist.networks import MLP, Network
from mnist.reporting import log_image, wait_for_pictures
from mnist.visuals import confusion_matrix_image, digit_grid_image

WORST_SHOWN = 16
# Training batches the training metric is updated with at once.
TRAIN_METRIC_BATCHES = 50


def sgd(params) -> torch.optim.Optimizer:
    """The tutorial's optimizer, used when none is configured: SGD with learning rate 0.01."""
    return torch.optim.SGD(params, lr=0.01)


class MNISTClassifier(pl.LightningModule):
    """Classifies images with a configurable network, optimizer and learning-rate schedule.

    The model takes pixels in [0, 1] and normalises them itself, so that a checkpoint, an export or a server needs
    nothing from the data module; in training it takes the batches of ``mnist.data``'s data modules as they are, since
    those hold images normalised once in memory. ``num_classes``, ``image_shape``, ``mean``, ``std`` and
    ``class_names`` describe the data: the command line takes them from the data module.

    Args:
        num_classes: Number of classes.
        image_shape: Shape of one image, ``(channels, height, width)``.
        mean: Mean pixel value of the training images, subtracted before the network.
        std: Standard deviation of the training pixels, divided by after subtracting ``mean``.
        class_names: Name of each class, for predictions and pictures.
        network: The network: a ``mnist.networks.Network`` class and its own arguments, e.g.
            ``--model.network mnist.networks.ConvNet``; the tutorial's ``MLP`` when not given.
        optimizer: Optimizer class and its arguments, e.g. ``--model.optimizer Adam
            --model.optimizer.init_args.lr 0.001``; SGD with lr 0.01 when not given.
        lr_scheduler: Optional learning-rate scheduler class and its arguments. A ``OneCycleLR`` without
            ``total_steps`` spans the whole run, stepped every batch.
        scheduler_interval: When any other scheduler steps: after every ``epoch`` or every training ``step``.
        compile: Run the network through ``torch.compile`` (compiled when training or evaluation starts, tens of
            seconds). The checkpoint and export are those of the plain network.
        label_smoothing: Share of each training target spread evenly over all classes (``F.cross_entropy``'s
            ``label_smoothing``), so that the network is not pushed to ever more confident logits. Only the loss
            trained on: every logged loss is plain cross-entropy, comparable between runs.
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int],
        mean: float,
        std: float,
        class_names: list[str] | None = None,
        network: Callable[[tuple[int, int, int], int], Network] | None = None,
        optimizer: OptimizerCallable = sgd,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        compile: bool = False,
        label_smoothing: ClosedUnitInterval = 0.0,
    ) -> None:
        super().__init__()
        # Into the checkpoint, so that it can be loaded and continued alone; the loggers get a curated summary of
        # the whole run instead (mnist.cli.RunConfigSaver).
        self.save_hyperparameters(logger=False)
        self.class_names = list(class_names) if class_names else [str(k) for k in range(num_classes)]
        self.network = (
            network(tuple(image_shape), num_classes) if network is not None else MLP(image_shape, num_classes)
        )
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        # The compiled forward is a function, not a module: the state dict keeps the plain network's keys.
        self.compiled_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Not saved (persistent=False): the checkpoint holds mean and std as hyperparameters.
        self.register_buffer("shift", torch.tensor(-mean / std), persistent=False)
        self.scale = 1 / std
        # The model summary runs it through the network to count FLOPs and show the shapes.
        self.example_input_array = torch.zeros(1, *image_shape)
        self.checkpoint_step: int | None = None  # the training step of the checkpoint an evaluation loaded
        # The (mean, std) the data module normalised its batches with; None: they hold pixels in [0, 1].
        self.batches_normalized_with: tuple[float, float] | None = None
        # Read at every step: plain attributes cost a fraction of a lookup in `self.hparams` (~1 µs each on a CPU).
        self.normalization = (mean, std)  # what the pixels are normalised with
        self.label_smoothing = label_smoothing
        # Training metrics accumulate in one cheap update per TRAIN_METRIC_BATCHES batches (see LossAccuracy);
        # validation and test use torchmetrics' own, one object per stage and quantity, so that each is reset and
        # synced across processes on its own. The loss is a weighted mean, exact with a smaller last batch and across
        # processes. Accuracy is the share of right predictions ("micro"), not torchmetrics' default mean over classes.
        self.train_metrics = LossAccuracy()
        self._train_batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # (loss, right) not yet in train_metrics
        # (steps made before the epoch, batches a step, the epoch's last batch, log_every_n_steps): see _is_curve_step
        self._epoch_steps: tuple[int, int, float, int] | None = None
        self.val_loss_best = MinMetric()
        self.val_loss_best.persistent(True)  # in checkpoints: a resumed run goes on from the best so far
        for stage in ("val", "test"):
            setattr(self, f"{stage}_loss", MeanMetric())
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, average="micro"))
            setattr(self, f"{stage}_confusion", MulticlassConfusionMatrix(num_classes))
            setattr(self, f"{stage}_worst", WorstMistakes(WORST_SHOWN, image_shape))

    def __deepcopy__(self, memo: dict) -> "MNISTClassifier":
        # Lightning's EMAWeightAveraging and StochasticWeightAveraging copy the whole module. The optimizer and
        # scheduler factories LightningCLI builds hold a lock of jsonargparse's and cannot be copied; they never
        # change, so a copy shares them. A compiled forward runs this network's weights: a copy compiles its own.
        memo[id(self.optimizer)], memo[id(self.lr_scheduler)] = self.optimizer, self.lr_scheduler
        if self.compiled_forward is not None:
            memo[id(self.compiled_forward)] = None
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for images ``(B, C, H, W)`` with pixels in [0, 1]."""
        # (x - mean) / std as one operation, shift + scale * x. With the scale a Python number it costs ~4 µs for a
        # batch of 32 on a CPU; `addcmul` with a tensor scale took ~13 µs, and two operations ~8 µs.
        network = self.compiled_forward or self.network
        return network(torch.add(self.shift, pixels, alpha=self.scale))

    def setup(self, stage: str) -> None:
        if self.hparams.get("compile") and self.compiled_forward is None:
            self.compiled_forward = torch.compile(self.network.forward)
        # The data modules of mnist.data normalise their images once, in memory: one operation over every batch less
        # (it cost ~40 µs of a ~2.6 ms step at batch 256 on a CPU, and more on a busy machine). Other data gives pixels.
        self.batches_normalized_with = getattr(self.trainer.datamodule, "normalized_with", None)

    def _network_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of the data module as the network takes it: normalised with this model's mean and std."""
        if self.batches_normalized_with == self.normalization:
            return x
        # Pixels, or normalised with another data set's statistics (a model evaluated on other data).
        return torch.add(self.shift, self._pixels(x), alpha=self.scale)

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of the data module as pixels in [0, 1], for pictures."""
        if self.batches_normalized_with is None:
            return x
        mean, std = self.batches_normalized_with
        return x * std + mean

    def _batch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of the data module, as ``forward`` gives them for its pixels."""
        return (self.compiled_forward or self.network)(self._network_input(x))

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to train on, and the plain cross-entropy to report: the same but for label smoothing in training."""
        x, y = batch
        logits = self._batch_logits(x)
        # Metric objects only accumulate here, with tensor operations and no host sync; they are logged once per
        # epoch, in the `on_*_epoch_end` hooks, since each `self.log` costs about as much as this network's whole step.
        if stage == "train":
            smoothing = self.label_smoothing
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
            plain = F.cross_entropy(logits.detach(), y) if smoothing else loss.detach()
            # Kept for one update of many batches, which costs what an update of one does (mnist.metrics).
            self._train_batches.append((plain, logits.detach().argmax(dim=1) == y))
            if len(self._train_batches) >= TRAIN_METRIC_BATCHES:
                self._update_train_metrics()
            return loss, plain
        loss = F.cross_entropy(logits, y)
        getattr(self, f"{stage}_loss").update(loss, weight=y.numel())
        getattr(self, f"{stage}_acc").update(logits, y)
        # The pictures come from the predictions just made: no second pass over the data.
        getattr(self, f"{stage}_confusion").update(logits, y)
        getattr(self, f"{stage}_worst").update(x, y, logits)
        return loss, loss

    def _update_train_metrics(self) -> None:
        if self._train_batches:
            self.train_metrics.update(*zip(*self._train_batches, strict=True))
            self._train_batches.clear()

    def _step_axis(self) -> float:
        """The x-axis value for an epoch's values: the training step, or the evaluated checkpoint's."""
        if self.trainer.state.fn != "fit" and self.checkpoint_step is not None:
            return float(self.checkpoint_step)
        return float(self.global_step)

    def _log_evaluation(self, stage: str) -> None:
        loss, acc = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val")
        if stage == "val" and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.val_loss_best.update(loss.compute())
            # `best_val/loss`, not `val/loss_best`: TensorBoard then draws it on the loss chart, as a run of its own.
            self.log("best_val/loss", self.val_loss_best.compute(), sync_dist=True)
        # Lightning puts a value named `step` on the x-axis: evaluations of a checkpoint then sit at its step.
        # (Every value logged here is already the same on every process; sync_dist only keeps Lightning quiet.)
        self.log("step", self._step_axis(), sync_dist=True)
        self._log_pictures(stage)

    def _log_pictures(self, stage: str) -> None:
        confusion, worst = getattr(self, f"{stage}_confusion"), getattr(self, f"{stage}_worst")
        matrix = confusion.compute()  # synced across processes by torchmetrics
        mistakes = worst.gather(self)
        confusion.reset()
        worst.reset()
        if self.trainer.sanity_checking or not self.trainer.is_global_zero or not self.loggers:
            return
        step = int(self._step_axis())
        title = f"{stage} at step {step}: accuracy {matrix.diag().sum() / matrix.sum().clamp(min=1):.2%}"
        picture = confusion_matrix_image(matrix, title, self.class_names)
        # Encoded on a thread of their own. On a CPU it runs while the checkpoints of the epoch's end are written,
        # which mostly wait on the disk, and the next training epoch waits for it (`on_train_epoch_start`).
        log_image(self.loggers, f"{stage}/confusion_matrix", picture, step, background=True)
        images, targets, predictions, confidences = mistakes
        if len(images):
            grid = digit_grid_image(self._pixels(images), targets, predictions, confidences, self.class_names)
            log_image(self.loggers, f"{stage}/most_confident_mistakes", grid, step, background=True)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, plain = self._shared_step(batch, "train")
        if self._is_curve_step(batch_idx):
            self._log_step_curves(plain)
        return loss

    def _is_curve_step(self, batch_idx: int) -> bool:
        """Whether this batch makes an optimizer step Lightning writes step values on (every ``log_every_n_steps``).

        Worked out from the batch index and the steps made before the epoch, read once an epoch: `global_step` walks
        ~8 of Lightning's properties, ~10 µs of a ~2 ms step amid training (MLP, batch 256, CPU). With gradients
        accumulated over k batches the k-th makes the step (or the epoch's last); only that one logs it.
        """
        if not self.automatic_optimization:  # the steps are the user's own
            return (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        if self._epoch_steps is None:  # the epoch's first step, or its first after resuming
            trainer = self.trainer
            k = trainer.accumulate_grad_batches
            last = trainer.num_training_batches - 1  # inf for a loader without a length
            self._epoch_steps = (self.global_step - batch_idx // k, k, last, trainer.log_every_n_steps)
        before, k, last, every = self._epoch_steps
        makes_step = (batch_idx + 1) % k == 0 or batch_idx == last
        return makes_step and (before + batch_idx // k + 1) % every == 0

    def _log_step_curves(self, loss: torch.Tensor) -> None:
        # Straight to the loggers, not through `self.log`: Lightning keeps a logged value for the rest of the epoch and
        # reads it back at every step (~13 µs a value, for a step of ~1 ms: MLP, batch 32, CPU), and converts one
        # shown in the progress bar to a number at every step, a host sync per step on a GPU. Lightning's loggers
        # write on process 0 only; the others skip the sync of `item()`.
        if self.trainer.is_global_zero:
            values = {"train/loss_step": loss.item(), "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"]}
            for logger in self.loggers:
                logger.log_metrics(values, step=self.global_step)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_train_epoch_start(self) -> None:
        self._train_batches.clear()  # what an epoch an error cut short left
        self._epoch_steps = None  # settled again at the epoch's first training step (_is_curve_step)
        if self.device.type == "cpu":
            # Training uses every core of a CPU, and a thread encoding pictures beside it slowed epochs by 1-3 %
            # (MLP, batch 256, 2 cores); an accelerator leaves cores to spare.
            wait_for_pictures(self.loggers)

    def on_train_epoch_end(self) -> None:
        # compute() sums the states across processes, so the values are already global and Lightning's own
        # reduction (a mean of equal values) changes nothing; asking for it keeps Lightning from warning, under
        # DDP, that an epoch value was logged unsynced.
        self._update_train_metrics()
        values = self.train_metrics.compute()
        self.train_metrics.reset()
        # `train/loss` is the epoch's mean, the one comparable to `val/loss` (TensorBoard draws them on one chart).
        self.log("train/loss", values["loss"], sync_dist=True)
        self.log("train/acc", values["acc"], sync_dist=True)
        self.log("step", self._step_axis(), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        probs = self._batch_logits(x).softmax(dim=1)
        confidence, prediction = probs.max(dim=1)
        return {"target": y, "prediction": prediction, "confidence": confidence, "probs": probs}

    def one_cycle(self) -> bool:
        """Whether the scheduler is a one-cycle schedule, which sets the learning rate itself."""
        # Under LightningCLI the hyperparameters hold the scheduler as configured (class_path and init_args).
        spec = self.hparams.get("lr_scheduler")
        return isinstance(spec, dict) and str(spec.get("class_path", "")).endswith("OneCycleLR")

    def spans_run(self) -> bool:
        """Whether the scheduler is a one-cycle schedule left to span the whole run (no ``total_steps``)."""
        if not self.one_cycle():
            return False
        given = self.hparams.lr_scheduler.get("init_args") or {}
        return not (given.get("total_steps") or (given.get("epochs") and given.get("steps_per_epoch")))

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        max_lr = (self.hparams.lr_scheduler.get("init_args") or {}).get("max_lr") if self.one_cycle() else None
        if max_lr is not None and optimizer.defaults["lr"] != max_lr and self.trainer.is_global_zero:
            print(
                f"warning: the one-cycle schedule sets the learning rate (up to max_lr {max_lr}); the optimizer's "
                f"lr {optimizer.defaults['lr']} is not used. Set --model.lr_scheduler.init_args.max_lr instead",
                file=sys.stderr,
            )
        if self.spans_run():
            # The config stays right when the batch size, the split or the number of epochs changes.
            total_steps = int(self.trainer.estimated_stepping_batches)
            scheduler, interval = self.lr_scheduler(optimizer, total_steps=total_steps), "step"
        else:
            scheduler, interval = self.lr_scheduler(optimizer), self.hparams.scheduler_interval
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": "val/loss"},
        }

    def on_train_start(self) -> None:
        # Here the trainer has restored a checkpoint it resumes from: say in one line what cannot go on.
        trainer = self.trainer
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
                needed = int(trainer.estimated_stepping_batches)
                if needed > scheduler.total_steps:
                    raise UserError(
                        f"the checkpoint's one-cycle schedule spans {scheduler.total_steps} steps and has run "
                        f"{scheduler.last_epoch} of them; this run needs {needed}. A one-cycle schedule cannot "
                        "be extended: start a new run with the epochs you want (fit without --ckpt_path), or continue "
                        "with the same --trainer.max_epochs as the run was made with"
                    )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.checkpoint_step = checkpoint.get("global_step")
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

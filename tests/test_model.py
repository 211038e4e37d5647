import copy
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mnist.errors import UserError
from mnist.loader import BatchLoader
from mnist.metrics import LossAccuracy, WorstMistakes
from mnist.model import TRAIN_METRIC_BATCHES, MNISTClassifier
from mnist.networks import MLP, ConvNet
from tests.conftest import DATA_INFO
from tests.conftest import cli_in_process as cli
from tests.fake_mnist import digit_images

SHAPE, CLASSES = (1, 28, 28), 10


@pytest.mark.parametrize(
    "network",
    [
        MLP(SHAPE, CLASSES),
        MLP(SHAPE, CLASSES, hidden_sizes=[32]),
        ConvNet(SHAPE, CLASSES, channels=[4, 8], hidden_size=16),
    ],
)
def test_networks_map_images_to_ten_logits(network):
    assert network(torch.randn(5, *SHAPE)).shape == (5, CLASSES)


def test_networks_take_the_image_shape_and_classes_they_are_given():
    image = torch.randn(2, 3, 32, 32)
    assert MLP((3, 32, 32), 7)(image).shape == (2, 7)
    assert ConvNet((3, 32, 32), 7, channels=[4, 8], hidden_size=16)(image).shape == (2, 7)


def test_default_is_the_tutorial_mlp():
    model = MNISTClassifier(**DATA_INFO)
    shapes = [tuple(p.shape) for p in model.network.parameters()]
    assert shapes == [(256, 784), (256,), (128, 256), (128,), (10, 128), (10,)]
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.01


def test_the_model_normalises_raw_pixels_with_the_data_statistics():
    model = MNISTClassifier(**DATA_INFO)
    pixels = torch.rand(3, 1, 28, 28)
    expected = model.network((pixels - DATA_INFO["mean"]) / DATA_INFO["std"])
    torch.testing.assert_close(model(pixels), expected)


@pytest.mark.parametrize("normalized_with", [None, (DATA_INFO["mean"], DATA_INFO["std"]), (0.2860, 0.3530)])
def test_steps_see_the_data_modules_batches_as_forward_sees_pixels(normalized_with):
    # The data modules normalise their images once in memory and say so; other data gives pixels in [0, 1]; a model
    # evaluated on another data set's batches gets them normalised with that one's statistics. The network must get
    # what forward gives it for the same pixels, and the pictures the pixels.
    model = MNISTClassifier(**DATA_INFO)
    model.batches_normalized_with = normalized_with
    pixels = torch.rand(3, 1, 28, 28)
    batch = pixels if normalized_with is None else (pixels - normalized_with[0]) / normalized_with[1]
    torch.testing.assert_close(model._batch_logits(batch), model(pixels))
    torch.testing.assert_close(model._pixels(batch), pixels)


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = MNISTClassifier(**DATA_INFO)
    y = torch.arange(64) % 10
    pixels = torch.from_numpy(digit_images(y.numpy(), np.random.default_rng(0))).float().div(255)
    x = pixels.unsqueeze(1)  # (64, 1, 28, 28) in [0, 1]: the model normalises
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_a_copy_has_weights_of_its_own_and_shares_the_optimizer_factory():
    model = MNISTClassifier(**DATA_INFO, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    model.compiled_forward = torch.compile(model.network.forward)  # compiled lazily: nothing runs here
    clone = copy.deepcopy(model)
    assert clone.optimizer is model.optimizer and clone.compiled_forward is None
    with torch.no_grad():
        clone.network.layers[1].weight.add_(1)
    assert not torch.equal(clone.network.layers[1].weight, model.network.layers[1].weight)
    assert clone.val_acc is not model.val_acc


def test_checkpoint_of_another_shape_is_refused_in_one_line():
    checkpoint = {
        "state_dict": MNISTClassifier(
            **DATA_INFO, network=lambda shape, n: MLP(shape, n, hidden_sizes=[64])
        ).state_dict()
    }
    with pytest.raises(
        UserError, match=r"does not match the configured one .*checkpoint \(64,\), configured \(256,\)"
    ) as err:
        MNISTClassifier(**DATA_INFO).on_load_checkpoint(checkpoint)
    assert "\n" not in str(err.value)


def test_training_metric_agrees_with_torchmetrics():
    torch.manual_seed(0)
    ours, mean, accuracy = LossAccuracy(), MeanMetric(), MulticlassAccuracy(10, average="micro")
    batches = []
    for size in (32, 7, 32, 32, 7):  # the smaller batches must weigh less in both
        y = torch.randint(0, 10, (size,))
        logits = torch.randn(size, 10) + 2 * F.one_hot(y, 10)  # mostly right, not all
        loss = F.cross_entropy(logits, y, reduction="none")[: size // 2].mean()  # not the batch's own mean
        batches.append((loss, logits.argmax(dim=1) == y))
        mean.update(loss, weight=size)
        accuracy.update(logits, y)
    ours.update(*zip(*batches[:2], strict=True))  # in two updates of several batches
    ours.update(*zip(*batches[2:], strict=True))
    values = ours.compute()
    torch.testing.assert_close(values["loss"], mean.compute())
    torch.testing.assert_close(values["acc"], accuracy.compute())
    assert 0.3 < values["acc"] < 0.95
    ours.reset()
    ours.update([torch.tensor(1.5)], [torch.tensor([True, True, True, False])])
    assert ours.compute() == {"loss": torch.tensor(1.5), "acc": torch.tensor(0.75)}


def test_worst_mistakes_are_the_most_confident_wrong_predictions_of_all_batches():
    torch.manual_seed(0)
    worst = WorstMistakes(5, (1, 28, 28))
    single = SimpleNamespace(trainer=SimpleNamespace(world_size=1))
    xs, ys, all_logits = [], [], []
    for size in (40, 3, 40, 40):  # a batch smaller than k, too
        x, y = torch.rand(size, 1, 28, 28), torch.randint(0, 10, (size,))
        logits = 3 * torch.randn(size, 10) + 2 * F.one_hot(y, 10)
        worst.update(x, y, logits)
        xs.append(x), ys.append(y), all_logits.append(logits)
    x, y, logits = torch.cat(xs), torch.cat(ys), torch.cat(all_logits)
    confidence, prediction = logits.softmax(1).max(1)
    wrong = torch.nonzero(prediction != y).flatten()
    expected = wrong[confidence[wrong].argsort(descending=True)[:5]]  # by brute force over every image
    images, targets, predictions, confidences = worst.gather(single)
    assert torch.equal(images, x[expected]) and torch.equal(targets, y[expected])
    assert torch.equal(predictions, prediction[expected]) and torch.equal(confidences, confidence[expected])
    worst.reset()
    right = F.one_hot(torch.tensor([1, 2, 3]), 10).float() * 10
    worst.update(torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 9]), right)  # one mistake among right predictions
    images, targets, predictions, _ = worst.gather(single)
    assert len(images) == 1 and targets.tolist() == [9] and predictions.tolist() == [3]


class TrainedLosses(pl.Callback):
    """Records the loss each training step returned, the one the optimizer trained on."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].item())


@pytest.mark.parametrize(("at_once", "smoothing"), [(3, 0.0), (TRAIN_METRIC_BATCHES, 0.0), (3, 0.3)])
def test_the_training_metric_of_an_epoch_counts_each_of_its_batches_once(tmp_path, monkeypatch, at_once, smoothing):
    # With a learning rate of 0 the network stays as it starts, so the epoch's values can be computed afterwards.
    # 10 batches (the last of 5) updated 3 at a time leave one for the epoch's end; 50 at a time, all ten.
    # Label smoothing changes the loss trained on, not the one logged: that stays plain cross-entropy.
    monkeypatch.setattr("mnist.model.TRAIN_METRIC_BATCHES", at_once)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 293)
    x = torch.from_numpy(digit_images(labels, rng)).unsqueeze(1).float() / 255  # (N, 28, 28) -> (N, 1, 28, 28)
    y = torch.from_numpy(labels)
    model = MNISTClassifier(
        **DATA_INFO, optimizer=lambda params: torch.optim.SGD(params, lr=0.0), label_smoothing=smoothing
    )
    trained = TrainedLosses()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[trained],
    )  # fmt: skip
    trainer.fit(model, BatchLoader(x, y, 32))
    with torch.no_grad():
        batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 293, 32)]
        losses = torch.stack([F.cross_entropy(model(bx), by) * len(by) for bx, by in batches])
        correct = sum((model(bx).argmax(1) == by).sum() for bx, by in batches)
        smoothed = [F.cross_entropy(model(bx), by, label_smoothing=smoothing).item() for bx, by in batches]
    torch.testing.assert_close(trainer.callback_metrics["train/loss"], losses.sum() / 293)
    np.testing.assert_allclose(trained.losses, smoothed * 2, rtol=1e-5)  # two epochs of the same batches
    torch.testing.assert_close(trainer.callback_metrics["train/acc"], correct / 293)


class StepStartCounter(pl.Callback):
    """Records ``count()`` at the start of each training step: what a step did is the difference to the next."""

    count: Callable[[], int]
    per_step: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        StepStartCounter.per_step.append(StepStartCounter.count())


def assert_only_logging_steps_wait(fast_args: list[str], count: Callable[[], int], *args: str) -> None:
    """Fit 2 epochs of 16 steps, logging every 5 steps, with the NaN guard checking then too (its default on a GPU)
    and the progress bar on: ``count()`` must not move during a step between logging steps, and must at each."""
    StepStartCounter.count, StepStartCounter.per_step = count, []
    cli(["fit", *fast_args, "--trainer.log_every_n_steps", "5", "--nan_guard.check_every_n_steps", "5",
         "--trainer.enable_progress_bar", "true", "--trainer.callbacks+=tests.test_model.StepStartCounter",
         "--trainer.limit_val_batches", "0", *args])  # fmt: skip
    steps = StepStartCounter.per_step
    assert len(steps) == 32  # 2 epochs of 16 batches
    waits = dict(enumerate(b - a for a, b in zip(steps, steps[1:], strict=False)))  # training step -> waits
    del waits[15]  # the epoch boundary: epoch-end metrics and the checkpoint are read there
    logging = {step for step in waits if (step + 1) % 5 == 0}
    assert all(waits[step] == 0 for step in waits.keys() - logging), waits
    # Writing the step curves reads the loss on the host: a count that does not see that wait saw nothing.
    assert all(waits[step] > 0 for step in logging), waits


def test_training_steps_read_no_tensor_on_the_host_between_logging_steps(tmp_path, fast_args, monkeypatch):
    # On CUDA each such read (item, tolist, float(), bool(), .cpu()) waits for the device; between logging steps
    # a training step must make none, so that the data path and the loop run ahead of the GPU. Once a value has been
    # logged, nothing of it may be read again at the later steps (a value shown in the progress bar was, every step).
    reads = [0]
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            reads[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    monkeypatch.chdir(tmp_path)
    assert_only_logging_steps_wait(fast_args, lambda: reads[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_on_cuda_training_steps_wait_for_the_device_only_at_logging_steps(tmp_path, fast_args, monkeypatch, precision):
    # The test above sees the host reads made from Python. PyTorch's sync debug mode sees every wait for the device,
    # also those inside an operation (a copy to the host, a data-dependent shape) and from Lightning's own code.
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            assert_only_logging_steps_wait(
                fast_args,
                lambda: sum("synchronizing CUDA operation" in str(w.message) for w in caught),
                "--trainer.accelerator", "gpu", "--trainer.precision", precision,
            )  # fmt: skip
        finally:
            torch.cuda.set_sync_debug_mode("default")

"""What the classifier measures beyond torchmetrics' stock metrics: a cheap training metric and the worst mistakes."""

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import Metric


class LossAccuracy(Metric):
    """Mean loss and accuracy over an epoch, kept as three running sums, updated with many batches at a time.

    This is the training step's metric. An update costs about as much for fifty batches as for one (~50 µs in a
    training step of ~1 ms: MLP, batch 32, CPU), so the model keeps each step's detached loss and which of its
    predictions were right, and passes them in together: the count is made once per update. Amid a training step
    each small operation costs 8-20 µs on a CPU, several times what it costs timed alone; counting a step's right
    predictions (argmax, compare, sum) took ~25 µs of a ~1 ms step at batch 32, ~40 µs at batch 256. Nothing of the
    batch itself is kept: a data loader may reuse its batches' memory. Nor are the logits: tensors of 10 KB kept
    across steps lay among each step's large temporaries in the heap, and glibc's allocator then returned the heap's
    top to the system and faulted it back in at every step (80-240 page faults a step at batch 256, ~1 µs each, in
    about two epochs of five). What is kept instead is one byte a sample. ``MeanMetric`` plus ``MulticlassAccuracy``
    would cost more again per update, mostly in their argument checks and generality; validation and test use them,
    and a test checks that both agree. The sums are added across processes, so the values are exact under DDP and
    with a smaller last batch.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("loss_sum", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, losses: Sequence[torch.Tensor], right: Sequence[torch.Tensor]) -> None:
        """Add batches: each one's mean loss (a scalar tensor) and which predictions were right (``(B,)`` bool)."""
        # `shape[0]`, not `len`: Tensor.__len__ is Python that costs ~0.7 µs a call, most of an update's 50 µs.
        sizes = [r.shape[0] for r in right]
        # Each batch's loss weighs by its size; batches of one size are summed in one operation (all but an epoch's
        # last are of one size). In place: assigning a state goes through nn.Module.__setattr__, which costs more.
        for size in set(sizes):
            same = [loss for loss, n in zip(losses, sizes, strict=True) if n == size]
            self.loss_sum.add_(torch.stack(same).sum(), alpha=size)
        self.correct.add_(torch.cat(list(right)).sum())
        self.count.add_(sum(sizes))

    def compute(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss_sum / self.count, "acc": self.correct / self.count}


class WorstMistakes(nn.Module):
    """Keeps the ``k`` wrong predictions made with the highest confidence, updated batch by batch on the device.

    Args:
        k: How many to keep.
        image_shape: Shape of one image, ``(channels, height, width)``.
    """

    def __init__(self, k: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.k, self.image_shape = k, tuple(image_shape)
        self.reset()

    def reset(self) -> None:
        self.images = torch.empty(0, *self.image_shape)
        self.scores = torch.empty(0)  # confidence of a wrong prediction; -1 for a right one
        self.targets = torch.empty(0, dtype=torch.long)
        self.predictions = torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        confidence, prediction = logits.softmax(dim=1).max(dim=1)
        # No host sync: right predictions score -1 and lose to any mistake in the top-k.
        score = torch.where(prediction != y, confidence, torch.full_like(confidence, -1.0))
        # The batch's own top k first: only those can enter the top k, and the rest of the batch is not copied.
        best = score.topk(min(self.k, len(score))).indices
        images = torch.cat([self.images.to(x.device), x.detach()[best]])
        scores = torch.cat([self.scores.to(x.device), score[best]])
        targets = torch.cat([self.targets.to(y.device), y[best]])
        predictions = torch.cat([self.predictions.to(y.device), prediction[best]])
        keep = scores.topk(min(self.k, len(scores))).indices
        self.images, self.scores = images[keep], scores[keep]
        self.targets, self.predictions = targets[keep], predictions[keep]

    def gather(self, module: pl.LightningModule) -> tuple[torch.Tensor, ...]:
        """The top-k mistakes over all processes: images, targets, predictions, confidences."""
        images, scores, targets, predictions = self.images, self.scores, self.targets, self.predictions
        if module.trainer.world_size > 1:
            # Every process sends exactly k entries (padded with non-mistakes), as all_gather needs equal shapes.
            pad = self.k - len(scores)
            device = module.device
            images = torch.cat([images.to(device), torch.zeros(pad, *self.image_shape, device=device)])
            scores = torch.cat([scores.to(device), torch.full((pad,), -1.0, device=device)])
            targets = torch.cat([targets.to(device), torch.zeros(pad, dtype=torch.long, device=device)])
            predictions = torch.cat([predictions.to(device), torch.zeros(pad, dtype=torch.long, device=device)])
            images, scores, targets, predictions = (
                module.all_gather(t).flatten(0, 1) for t in (images, scores, targets, predictions)
            )
        order = scores.argsort(descending=True)[: self.k]
        order = order[scores[order] >= 0]  # only real mistakes
        return images[order], targets[order], predictions[order], scores[order]

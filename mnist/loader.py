"""Batches served straight from tensors in memory: one indexing operation per batch, no per-sample work.

For MNIST the whole data set is 220 MB as float32, so a `DataLoader` that converts one PIL image at a time and
collates 32 of them per step costs far more than the network itself.
"""

import math
from collections.abc import Callable, Iterator

import torch


class EpochSampler:
    """The order in which one process visits a data set in one epoch.

    Shuffled orders are a function of ``(seed, epoch)`` alone, so a resumed run sees the same batches as an
    uninterrupted one. With several processes, process ``rank`` takes every ``world_size``-th index of the order;
    for training each takes the same count, so that all processes run the same number of steps.

    Args:
        size: Number of samples in the data set.
        shuffle: Whether to visit the samples in a new random order every epoch.
        seed: Seed of the shuffled order.
        rank: Index of this process among all training processes.
        world_size: Number of training processes.
        even: Give every process the same number of samples, dropping at most ``world_size - 1`` per epoch.
    """

    def __init__(
        self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1, even: bool = False
    ) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this on `loader.sampler` at the start of every training epoch.
        self.epoch = epoch

    def __len__(self) -> int:
        if self.even:
            return self.size // self.world_size
        return len(range(self.rank, self.size, self.world_size))

    def indices(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        return order[self.rank :: self.world_size][: len(self)]


class BatchLoader:
    """An iterable of ``(images, labels)`` batches taken from in-memory tensors, on whatever device they live.

    Args:
        images: All images of the data set, ``(N, 1, 28, 28)``.
        labels: Their labels, ``(N,)``.
        batch_size: Samples per batch.
        sampler: The order of the samples; sequential over all of them when not given.
        drop_last: Drop the last batch of an epoch when it is smaller than ``batch_size``.
        augment: Applied to each batch of images with a random generator of its own, seeded by the sampler's seed,
            epoch and rank and the batch's number, so that a resumed epoch gets the same batches as an
            uninterrupted one (``mnist.augment.RandomShift``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        sampler: EpochSampler | None = None,
        drop_last: bool = False,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.sampler = sampler if sampler is not None else EpochSampler(len(labels), shuffle=False)
        self.drop_last = drop_last
        self.augment = augment
        self.served = 0  # batches handed out so far in the current epoch
        self._resume: tuple[int, int] | None = None  # (epoch, batches already served) from a checkpoint

    # Lightning calls `loader.sampler.set_epoch(epoch)` every epoch, and reads `batch_sampler` of any loader
    # that has a `sampler`, as a DataLoader would.
    batch_sampler = None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.sampler.indices().to(self.labels.device)
        first = 0
        if self._resume is not None and self._resume[0] == self.sampler.epoch and self._resume[1] < len(self):
            first = self._resume[1]
        self._resume = None
        self.served = first
        if self.augment is not None:
            generator = torch.Generator(self.images.device)
        for start in range(first * self.batch_size, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.images[index]
            if self.augment is not None:
                images = self.augment(images, generator.manual_seed(self._batch_seed(self.served)))
            self.served += 1
            yield images, self.labels[index]

    def _batch_seed(self, batch: int) -> int:
        seed = self.sampler.seed
        for part in (self.sampler.epoch, self.sampler.rank, batch):
            seed = seed * 1_000_003 + part
        return seed % 2**63

    # Lightning saves these with every checkpoint and restores them on resume, so that a run resumed from a
    # mid-epoch checkpoint continues with the next batch of the same epoch instead of starting the epoch over.
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Applies only if the resumed epoch is the saved one; an epoch-end checkpoint resumes with the next epoch.
        self._resume = (state["epoch"], state["served"])

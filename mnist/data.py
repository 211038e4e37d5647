"""Data modules for MNIST-format datasets: torchvision finds, downloads and parses the files; batches come from memory.

``MNISTDataModule`` is the base: a subclass for another dataset in the same format (FashionMNIST, KMNIST) names
its torchvision class and its pixel statistics, and nothing else. Each data module states what the model must know
about its data — number of classes, their names, image shape, normalisation — and the command line passes it on
(``link_arguments`` in ``mnist.cli``), so that none of it is written twice.
"""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import random_split
from torchvision.datasets import KMNIST, MNIST, FashionMNIST

from mnist.augment import RandomShift
from mnist.errors import UserError
from mnist.images import image_files, load_digits
from mnist.loader import BatchLoader, EpochSampler

# Splits kept by data modules with `keep_loaded`: (class, folder, train) -> (images, labels).
_LOADED: dict[tuple[type, str, bool], tuple[torch.Tensor, torch.Tensor]] = {}

# name: (IDX type code and number of dimensions, shape of one item)
IDX_FILES = {
    "train-images-idx3-ubyte": (0x0803, (28, 28)),
    "train-labels-idx1-ubyte": (0x0801, ()),
    "t10k-images-idx3-ubyte": (0x0803, (28, 28)),
    "t10k-labels-idx1-ubyte": (0x0801, ()),
}


def check_idx_file(path: Path, type_and_ndim: int, item_shape: tuple[int, ...]) -> int:
    """Check an IDX file's header against its size and return its number of items.

    A checksum would reject a user's own correct copy; the header and the file size catch what actually
    happens to these files: truncated downloads, HTML error pages saved under the file's name, mixed-up files.
    """
    with open(path, "rb") as f:
        header = f.read(4 + 4 * (1 + len(item_shape)))
    if len(header) < 8 or int.from_bytes(header[:4], "big") != type_and_ndim:
        raise UserError(f"{path} is not an IDX file of the expected kind (wrong header); delete it and get it again")
    count, *shape = (int.from_bytes(header[i : i + 4], "big") for i in range(4, len(header), 4))
    if tuple(shape) != item_shape:
        raise UserError(f"{path} holds items of shape {tuple(shape)}, expected {item_shape}")
    expected = len(header) + count * max(1, torch.Size(item_shape).numel())
    actual = path.stat().st_size
    if actual != expected:
        raise UserError(
            f"{path} is {actual} bytes but its header promises {expected}: "
            "it is truncated or corrupted; delete it and get it again"
        )
    return count


class MNISTDataModule(pl.LightningDataModule):
    """MNIST: 60,000 training images split into training and validation sets, and 10,000 test images.

    ``load`` gives pixels in [0, 1]; the batches hold them normalised with this data module's ``mean`` and ``std``,
    ``(B, 1, 28, 28)``, computed once in memory rather than for every batch (``normalized_with`` says so to the model).
    The model's own ``forward`` takes pixels in [0, 1] and normalises them, so that an exported or served model takes
    raw pixels.

    Args:
        data_dir: Folder holding ``<Dataset>/raw/`` (``MNIST/raw/`` here; created when downloading).
        batch_size: Samples per training batch.
        val_size: Training images held out for validation.
        download: Download the dataset into ``data_dir`` when it is not there yet.
        seed: Seed of the train/validation split and of the shuffling order, independent of the global seed so
            that runs with different model seeds see the same data.
        eval_batch_size: Samples per validation, test and prediction batch; ``batch_size`` when not given.
        predict_path: An image, or a folder of PNG / JPEG / BMP images, for ``predict``; the test set when not given.
        max_shift: Move each training image by a random number of pixels, up to this many along each axis, drawn
            anew for every batch of every epoch (augmentation); 0 leaves them as they are. Validation, test and
            prediction images are never moved.
    """

    dataset = MNIST  # the torchvision class that downloads and parses the files
    mean, std = 0.1307, 0.3081  # pixel statistics of the training images, in [0, 1]
    image_shape = (1, 28, 28)
    # Keep each split in memory once loaded, for the next data module of the same class and folder in this
    # process: a sweep's trials then read the files once (mnist/sweep.py turns it on).
    keep_loaded = False

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: PositiveInt = 32,
        val_size: PositiveInt = 5000,
        download: bool = True,
        seed: int = 42,
        eval_batch_size: PositiveInt | None = None,
        predict_path: str | None = None,
        max_shift: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        # The data's settings go into the checkpoint (a run can be continued from it alone); the loggers get the
        # run's settings from the command line, curated (mnist.cli.RunConfigSaver).
        self.save_hyperparameters(logger=False)
        self.raw_dir = Path(data_dir) / self.dataset.__name__ / "raw"
        self.train_images = self.train_labels = None
        self.val_images = self.val_labels = None
        self.test_images = self.test_labels = None
        self.predict_paths: list[Path] = []

    @property
    def normalized_with(self) -> tuple[float, float] | None:
        """The (mean, std) the batches are normalised with: the model then feeds them to its network as they are."""
        return self.mean, self.std

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _how_to_get(self) -> str:
        return (
            f"download them on a machine with internet access (python main.py fit does it) and copy them there, "
            f"or point --data.data_dir at a folder that holds {self.dataset.__name__}/raw/"
        )

    def _missing_files(self) -> list[Path]:
        return [self.raw_dir / name for name in IDX_FILES if not (self.raw_dir / name).is_file()]

    def _check_files(self) -> dict[str, int]:
        missing = self._missing_files()
        if missing:
            names = ", ".join(p.name for p in missing)
            hint = "" if self.hparams.download else " (downloading is off: --data.download false)"
            raise UserError(
                f"{self.dataset.__name__} not found{hint}: expected {names} in {self.raw_dir}/; {self._how_to_get()}"
            )
        return {name: check_idx_file(self.raw_dir / name, *spec) for name, spec in IDX_FILES.items()}

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """All images of one split as pixels in [0, 1], ``(N, C, H, W)`` float32, and their labels ``(N,)`` int64.

        The one method to override, with ``prepare_data`` and ``class_names``, for data in another format.
        """
        self._check_files()  # on every process: prepare_data ran on one per machine
        dataset = self.dataset(self.hparams.data_dir, train=train, download=False)
        images = dataset.data.unsqueeze(1)  # (N, 28, 28) uint8 -> (N, 1, 28, 28)
        labels = dataset.targets
        if labels.numel() and int(labels.max()) >= self.num_classes:
            name = "train" if train else "t10k"
            raise UserError(
                f"{self.raw_dir / name}-labels-idx1-ubyte holds labels above {self.num_classes - 1}; get it again"
            )
        return images.float().div_(255), labels

    def _load_to_device(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = (type(self), str(Path(self.hparams.data_dir).resolve()), train)
        if self.keep_loaded and key in _LOADED:
            images, labels = _LOADED[key]
        else:
            images, labels = self.load(train)
            if self.keep_loaded:
                _LOADED[key] = images, labels
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return images.to(device), labels.to(device)

    def prepare_data(self) -> None:
        if self.trainer is not None and self.trainer.state.fn == "predict" and self.hparams.predict_path:
            return  # the user's own images need no dataset
        # Lightning calls prepare_data on one process per node, so the download never races with itself.
        if self._missing_files() and self.hparams.download:
            try:
                for train in (True, False):
                    self.dataset(self.hparams.data_dir, train=train, download=True)
            except Exception as err:  # torchvision raises several types for one cause: no network
                # torchvision's message lists every mirror it tried; the last line holds the cause.
                cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                raise UserError(
                    f"could not download {self.dataset.__name__} into {self.raw_dir}/ ({cause}). "
                    f"Expected {', '.join(IDX_FILES)} there; {self._how_to_get()}"
                ) from err
        self._check_files()

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.hparams.predict_path:
            images, self.predict_paths, skipped = load_digits(image_files(Path(self.hparams.predict_path)))
            for line in skipped:
                print(line, file=sys.stderr)
            self.test_images = self._normalised(images)
            self.test_labels = torch.full((len(images),), -1)  # unknown
            return
        if stage in ("fit", "validate") and self.train_images is None:
            images, labels = self._load_to_device(train=True)
            n_train = len(labels)
            if self.hparams.val_size >= n_train:
                raise UserError(
                    f"data.val_size ({self.hparams.val_size}) must be smaller than the {n_train} training images"
                )
            # A generator of its own: the split stays the same whatever the global seed.
            generator = torch.Generator().manual_seed(self.hparams.seed)
            train, val = random_split(
                range(n_train), [n_train - self.hparams.val_size, self.hparams.val_size], generator
            )
            train_idx = torch.tensor(train.indices, device=labels.device)
            val_idx = torch.tensor(val.indices, device=labels.device)
            # Indexing copies: normalised in place, with no third copy of the data.
            self.train_images, self.train_labels = self._normalised(images[train_idx], copy=False), labels[train_idx]
            self.val_images, self.val_labels = self._normalised(images[val_idx], copy=False), labels[val_idx]
        if stage in ("test", "predict") and self.test_images is None:
            images, self.test_labels = self._load_to_device(train=False)
            self.test_images = self._normalised(images)

    def _normalised(self, pixels: torch.Tensor, copy: bool = True) -> torch.Tensor:
        """Pixels in [0, 1] normalised with ``mean`` and ``std``; in place unless ``copy``."""
        mean, std = self.normalized_with
        return pixels.sub(mean).div_(std) if copy else pixels.sub_(mean).div_(std)

    def _distributed(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _eval_loader(self, images: torch.Tensor, labels: torch.Tensor) -> BatchLoader:
        rank, world_size = self._distributed()
        sampler = EpochSampler(len(labels), shuffle=False, rank=rank, world_size=world_size)
        return BatchLoader(images, labels, self.hparams.eval_batch_size or self.hparams.batch_size, sampler)

    def train_dataloader(self) -> BatchLoader:
        rank, world_size = self._distributed()
        sampler = EpochSampler(
            len(self.train_labels), shuffle=True, seed=self.hparams.seed, rank=rank, world_size=world_size, even=True
        )
        augment = None
        if self.hparams.max_shift:
            black = float(self._normalised(torch.zeros(())))  # the background, as the images hold it
            augment = RandomShift(self.hparams.max_shift, fill=black)
        return BatchLoader(self.train_images, self.train_labels, self.hparams.batch_size, sampler, augment=augment)

    def val_dataloader(self) -> BatchLoader:
        return self._eval_loader(self.val_images, self.val_labels)

    def test_dataloader(self) -> BatchLoader:
        return self._eval_loader(self.test_images, self.test_labels)

    def predict_dataloader(self) -> BatchLoader:
        return self._eval_loader(self.test_images, self.test_labels)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST: Zalando's 28 × 28 grey pictures of ten kinds of clothing, in MNIST's format and split sizes.

    Its arguments are those of ``MNISTDataModule``.
    """

    dataset = FashionMNIST
    mean, std = 0.2860, 0.3530


class KMNISTDataModule(MNISTDataModule):
    """Kuzushiji-MNIST: ten cursive Japanese (hiragana) characters, in MNIST's format and split sizes.

    Its arguments are those of ``MNISTDataModule``.
    """

    dataset = KMNIST
    mean, std = 0.1918, 0.3483

"""A small synthetic MNIST in the real IDX format, so tests run the real torchvision loading code offline."""

from pathlib import Path

import numpy as np

FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def digit_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images ``(N, 28, 28)`` uint8 in which each class is a bright bar at its own place, plus noise: learnable
    in a few steps, like MNIST's digits, and with pixel values over the whole 0-255 range."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 2 + 2 * int(label)
        images[i, row : row + 3, 4:24] = 255
    return images


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic (0, 0, type 0x08 = uint8, number of dimensions), each dimension as big-endian int32, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(
    data_dir: Path, n_train: int = 600, n_test: int = 200, seed: int = 0, folder: str = "MNIST"
) -> Path:
    """Write ``data_dir/<folder>/raw/`` with the four files of MNIST's format; returns the raw folder.

    ``folder`` is the torchvision dataset's class name: MNIST, FashionMNIST, KMNIST.
    """
    raw = Path(data_dir) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for train, n in ((True, n_train), (False, n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images_name, labels_name = FILES[train]
        write_idx(raw / images_name, digit_images(labels, rng))
        write_idx(raw / labels_name, labels.astype(np.uint8))
    return raw

"""Turn a photo or drawing of a digit into what an MNIST image looks like.

MNIST digits are white on black, scaled to fit a 20 × 20 box with their aspect ratio kept, and placed in a
28 × 28 image so that their centre of mass is at its centre. A user's PNG of any size, ink dark or light, goes
through the same steps here before the training normalisation.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mnist.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def image_files(path: Path) -> list[Path]:
    """The image files at ``path``: the file itself, or the images in a folder, sorted by name."""
    if not path.exists():
        raise UserError(f"--data.predict_path {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--data.predict_path {path} holds no PNG, JPEG or BMP files")
    return files


def to_mnist(image: Image.Image) -> torch.Tensor:
    """A digit image of any size and polarity as MNIST's ``(1, 28, 28)`` float tensor in [0, 1], ink bright."""
    pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255  # (H, W), 0 = black
    # The background is what fills the border; MNIST's is black, so light paper is inverted.
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 0.5:
        pixels, border = 1 - pixels, 1 - border
    pixels = np.clip(pixels - np.median(border), 0, None)  # paper texture and grey scans become black
    if pixels.max() <= 0:
        return torch.zeros(1, 28, 28)
    pixels /= pixels.max()
    rows, cols = np.nonzero(pixels > 0.2)
    digit = pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = digit.shape
    scale = 20 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    digit = np.asarray(Image.fromarray((digit * 255).astype(np.uint8)).resize(size, Image.LANCZOS), np.float32) / 255
    # Centre of mass to the image centre, as MNIST was made.
    ys, xs = np.indices(digit.shape)
    total = digit.sum()
    cy, cx = (ys * digit).sum() / total, (xs * digit).sum() / total
    top = int(round(14 - cy))
    left = int(round(14 - cx))
    top = min(max(top, 0), 28 - digit.shape[0])
    left = min(max(left, 0), 28 - digit.shape[1])
    canvas = np.zeros((28, 28), np.float32)
    canvas[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return torch.from_numpy(canvas).unsqueeze(0)


def load_digits(paths: list[Path]) -> tuple[torch.Tensor, list[Path], list[str]]:
    """The readable images as ``(N, 1, 28, 28)`` in [0, 1], their paths, and one line for each unreadable file."""
    images, kept, skipped = [], [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(to_mnist(image))
            kept.append(path)
        except (UnidentifiedImageError, OSError) as err:
            skipped.append(f"skipped {path}: not a readable image ({type(err).__name__})")
    if not images:
        raise UserError(f"none of the {len(paths)} files is a readable image: " + "; ".join(skipped))
    return torch.stack(images), kept, skipped

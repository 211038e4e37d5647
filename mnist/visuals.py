"""Pictures for the loggers: a confusion matrix that makes mistakes stand out, and a captioned grid of digits.

Both are drawn with Pillow at a size TensorBoard shows without scaling down much (its image cards are about 500
pixels wide), with text of 13 to 16 pixels.
"""

import functools

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CELL = 40  # pixels per confusion-matrix cell


@functools.cache
def _font(size: int) -> ImageFont.ImageFont:
    # Loaded once per size: a picture draws a few hundred labels, and each load costs about 0.1 ms.
    return ImageFont.load_default(size=size)


def _short(name: str, width: int = 11) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _row_label(k: int, name: str) -> str:
    # torchvision's MNIST names its classes "0 - zero", ...: the index is already there.
    return _short(name) if name.startswith(str(k)) else f"{k} {_short(name)}"


def confusion_matrix_image(matrix: torch.Tensor, title: str, class_names: list[str] | None = None) -> np.ndarray:
    """An RGB ``(H, W, 3)`` uint8 picture of ``matrix[true, predicted]`` with its counts.

    Right predictions (the diagonal) are shaded green by their share of the row; mistakes red, scaled to the largest
    mistake, so that the confusions that matter stand out even when they are 1 % of a row.
    """
    counts = matrix.cpu().long().numpy()
    n = len(counts)
    names = class_names or [str(k) for k in range(n)]
    row_share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    errors = counts * (1 - np.eye(n, dtype=counts.dtype))
    worst = max(int(errors.max()), 1)
    label_width = 16 + max(int(_font(14).getlength(_row_label(k, name))) for k, name in enumerate(names))
    left, top = label_width, 68
    image = Image.new("RGB", (left + n * CELL + 10, top + n * CELL + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black", font=_font(16))
    draw.text((left, 30), "predicted (columns)", fill="dimgray", font=_font(13))
    draw.text((8, 30), "true (rows)", fill="dimgray", font=_font(13))
    for k, name in enumerate(names):
        draw.text((left + k * CELL + CELL // 2, top - 4), str(k), fill="black", font=_font(14), anchor="mb")
        draw.text((8, top + k * CELL + CELL // 2), _row_label(k, name), fill="black", font=_font(14), anchor="lm")
    for t in range(n):
        for p in range(n):
            if t == p:
                strength = row_share[t, p]
                fill = (int(255 - 155 * strength), int(255 - 60 * strength), int(255 - 155 * strength))
            else:
                strength = errors[t, p] / worst
                fill = (255, int(255 - 215 * strength), int(255 - 215 * strength))
            box = (left + p * CELL, top + t * CELL, left + (p + 1) * CELL - 1, top + (t + 1) * CELL - 1)
            draw.rectangle(box, fill=fill, outline=(215, 215, 215))
            colour = "white" if strength > 0.6 else "black"
            centre = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)
            draw.text(centre, str(counts[t, p]), fill=colour, font=_font(13), anchor="mm")
    return np.asarray(image)


def digit_grid_image(
    images: torch.Tensor,
    targets: torch.Tensor,
    predictions: torch.Tensor,
    confidences: torch.Tensor,
    class_names: list[str] | None = None,
    columns: int = 4,
) -> np.ndarray:
    """An RGB ``(H, W, 3)`` uint8 grid of images ``(N, C, H, W)`` with pixels in [0, 1].

    Each is captioned with its true class and, in red, what it was taken for with the prediction's confidence.
    """
    tile, caption = 112, 38
    rows = max(1, -(-len(images) // columns))
    grid = Image.new("RGB", (columns * tile, rows * (tile + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, t, p, c) in enumerate(zip(images, targets, predictions, confidences, strict=True)):
        pixels = (image.clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)  # (C, H, W)
        picture = Image.fromarray(pixels[0]) if len(pixels) == 1 else Image.fromarray(pixels.transpose(1, 2, 0))
        x, y = (i % columns) * tile, (i // columns) * (tile + caption)
        grid.paste(picture.convert("RGB").resize((tile - 8, tile - 8), Image.NEAREST), (x + 4, y + 4))
        true_name = class_names[int(t)] if class_names else str(int(t))
        predicted = class_names[int(p)] if class_names else str(int(p))
        draw.text((x + 4, y + tile), _short(true_name, 14), fill="black", font=_font(14))
        draw.text((x + 4, y + tile + 17), f"as {_short(predicted, 9)} {100 * float(c):.0f}%", fill=(200, 0, 0),
                  font=_font(14))  # fmt: skip
    return np.asarray(grid)

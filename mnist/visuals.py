"""Pictures for TensorBoard: a labelled confusion matrix and a captioned grid of digits, drawn with Pillow."""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CELL = 30  # pixels per confusion-matrix cell
MARGIN = 36  # room for the axis labels


def confusion_matrix_image(matrix: torch.Tensor) -> np.ndarray:
    """An RGB ``(H, W, 3)`` uint8 picture of ``matrix[true, predicted]``: counts in cells shaded by row share."""
    counts = matrix.cpu().long().numpy()
    n = len(counts)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = MARGIN + n * CELL
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((MARGIN, 2), "predicted", fill="black", font=font)
    draw.text((2, MARGIN - 12), "true", fill="black", font=font)
    for k in range(n):
        draw.text((MARGIN + k * CELL + CELL // 2 - 3, 14), str(k), fill="black", font=font)
        draw.text((14, MARGIN + k * CELL + CELL // 2 - 6), str(k), fill="black", font=font)
    for t in range(n):
        for p in range(n):
            shade = int(255 * (1 - share[t, p]))
            box = (MARGIN + p * CELL, MARGIN + t * CELL, MARGIN + (p + 1) * CELL - 1, MARGIN + (t + 1) * CELL - 1)
            draw.rectangle(box, fill=(shade, shade, 255), outline=(200, 200, 200))
            text = str(counts[t, p])
            colour = "white" if share[t, p] > 0.5 else "black"
            draw.text((box[0] + 2, box[1] + CELL // 2 - 6), text, fill=colour, font=font)
    return np.asarray(image)


def digit_grid_image(
    images: torch.Tensor, targets: torch.Tensor, predictions: torch.Tensor, confidences: torch.Tensor, columns: int = 4
) -> np.ndarray:
    """An RGB ``(H, W, 3)`` uint8 grid of digits ``(N, 1, 28, 28)`` in [0, 1].

    Each is captioned "7 as 1  64%": its true label, the prediction and the prediction's confidence.
    """
    tile, caption = 64, 14
    rows = max(1, -(-len(images) // columns))
    grid = Image.new("RGB", (columns * tile, rows * (tile + caption)), "black")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, t, p, c) in enumerate(zip(images, targets, predictions, confidences, strict=True)):
        digit = Image.fromarray((image[0].clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)).resize((tile, tile))
        x, y = (i % columns) * tile, (i // columns) * (tile + caption)
        grid.paste(digit.convert("RGB"), (x, y))
        draw.text((x + 2, y + tile), f"{int(t)} as {int(p)}  {100 * float(c):.0f}%", fill=(255, 80, 80), font=font)
    return np.asarray(grid)

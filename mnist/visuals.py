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


@functools.lru_cache(maxsize=4096)
def _text_mask(text: str, size: int, anchor: str) -> tuple[Image.Image, tuple[int, int]]:
    # Rendering a label costs ~0.1 ms and a validation's two pictures draw ~150, most of them the same from one
    # validation to the next (class names, small counts): each is rendered once and then only blended in.
    font = _font(size)
    left, top, right, bottom = font.getbbox(text, anchor=anchor)
    mask = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font, anchor=anchor)
    return mask, (left, top)


@functools.lru_cache(maxsize=1024)
def _length(text: str, size: int) -> int:
    """How far ``text`` advances the pen, in whole pixels."""
    return round(_font(size).getlength(text))


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fill, size: int, anchor: str = "la") -> None:
    """``draw.text(xy, text, fill, font=_font(size), anchor=anchor)``, from a cache of rendered labels."""
    mask, (left, top) = _text_mask(text, size, anchor)
    draw.bitmap((xy[0] + left, xy[1] + top), mask, fill=fill)


def _short(name: str, width: int = 11) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _row_label(k: int, name: str) -> str:
    # torchvision's MNIST names its classes "0 - zero", ...: the index is already there.
    return _short(name) if name.startswith(str(k)) else f"{k} {_short(name)}"


def confusion_matrix_image(matrix: torch.Tensor, title: str, class_names: list[str] | None = None) -> Image.Image:
    """An RGB picture of ``matrix[true, predicted]`` with its counts.

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
    _text(draw, (8, 6), title, "black", 16)
    _text(draw, (left, 30), "predicted (columns)", "dimgray", 13)
    _text(draw, (8, 30), "true (rows)", "dimgray", 13)
    for k, name in enumerate(names):
        _text(draw, (left + k * CELL + CELL // 2, top - 4), str(k), "black", 14, "mb")
        _text(draw, (8, top + k * CELL + CELL // 2), _row_label(k, name), "black", 14, "lm")
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
            _text(draw, centre, str(counts[t, p]), colour, 13, "mm")
    return image


def digit_grid_image(
    images: torch.Tensor,
    targets: torch.Tensor,
    predictions: torch.Tensor,
    confidences: torch.Tensor,
    class_names: list[str] | None = None,
    columns: int = 4,
) -> Image.Image:
    """An RGB grid of images ``(N, C, H, W)`` with pixels in [0, 1], ``C`` 1 or 3.

    Each is captioned with its true class and, in red, what it was taken for with the prediction's confidence.
    """
    tile, caption = 112, 38
    n, channels, height, width = images.shape
    rows = max(1, -(-n // columns))
    # All tiles at once, nearest-neighbour scaled to (side, side) by sampling at pixel centres, as Pillow's NEAREST
    # does, and laid out in one array operation: copying tile by tile, and making an RGB picture of an RGB array,
    # cost 1.6 ms of the grid's ~3.8 ms on a CPU (timed alone).
    side = tile - 8
    pixels = (images.detach().clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()  # (N, C, H, W)
    ys = ((np.arange(side) + 0.5) * height / side).astype(int)
    xs = ((np.arange(side) + 0.5) * width / side).astype(int)
    tiles = np.full((rows * columns, side, side, channels), 255, dtype=np.uint8)  # blank slots stay white
    tiles[:n] = pixels[:, :, ys][:, :, :, xs].transpose(0, 2, 3, 1)  # (N, side, side, C)
    # (rows, side, columns, side, C): each row of slots as its pixel rows will lie in the picture
    slots = tiles.reshape(rows, columns, side, side, channels).transpose(0, 2, 1, 3, 4)
    canvas = np.full((rows, tile + caption, columns, tile, channels), 255, dtype=np.uint8)
    canvas[:, 4 : 4 + side, :, 4 : 4 + side] = slots
    canvas = canvas.reshape(rows * (tile + caption), columns * tile, channels)  # (height, width, C)
    grid = Image.fromarray(canvas[..., 0] if channels == 1 else canvas).convert("RGB")
    draw = ImageDraw.Draw(grid)
    labels = zip(targets.tolist(), predictions.tolist(), confidences.tolist(), strict=True)
    for i, (t, p, c) in enumerate(labels):
        x, y = (i % columns) * tile, (i // columns) * (tile + caption)
        true_name, predicted = (class_names[k] if class_names else str(k) for k in (t, p))
        _text(draw, (x + 4, y + tile), _short(true_name, 14), "black", 14)
        # In two labels, each of few values, so that both come from the cache: as one, nearly every caption of a
        # validation was new, ~0.16 ms each to render.
        prediction = f"as {_short(predicted, 9)}"
        _text(draw, (x + 4, y + tile + 17), prediction, (200, 0, 0), 14)
        _text(draw, (x + 4 + _length(f"{prediction} ", 14), y + tile + 17), f"{100 * c:.0f}%", (200, 0, 0), 14)
    return grid

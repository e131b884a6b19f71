"""scikit-learn's digits and the small networks the examples, recipes and benchmarks train on it.

Plain torch (and scikit-learn, which ships the data: no download).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_prune.engine.layers import MaskedConv2d

__all__ = ["digits_cnn", "digits_resnet", "load_digits_split", "mlp"]


def load_digits_split(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Digits as ``{"train"|"val"|"test": (images [n, 1, 8, 8] in [0, 1], labels)}``: a fixed 70/10/20 split.

    Example::

        >>> {k: len(v[1]) for k, v in load_digits_split().items()}
        {'train': 1257, 'val': 179, 'test': 361}
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.7 * len(y)), int(0.1 * len(y))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


def digits_cnn(width: int = 32, hidden: int = 128, masked: bool = True, num_classes: int = 10) -> nn.Sequential:
    """A small CNN for 1x8x8 digits: two (masked) 3x3 convs, max-pool, two linear layers.

    Example::

        >>> digits_cnn()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    conv = MaskedConv2d if masked else nn.Conv2d
    return nn.Sequential(
        conv(1, width, 3, padding=1),
        nn.ReLU(),
        conv(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def mlp(in_features: int = 64, hidden: int = 256, depth: int = 2, num_classes: int = 10) -> nn.Sequential:
    """A flatten + ReLU MLP.

    Example::

        >>> mlp()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(x + y)


def digits_resnet(width: int = 32, num_classes: int = 10) -> nn.Sequential:
    """A small residual CNN for 1x8x8 digits (conv-BN-ReLU, a residual block, a strided conv, GAP, linear).

    The structured-pruning benchmark and recipe use it: its residual add couples channels across
    layers, as real networks do.

    Example::

        >>> net = digits_resnet()
        >>> net(torch.zeros(2, 1, 8, 8)).shape, sum(p.numel() for p in net.parameters())
        (torch.Size([2, 10]), 75114)
    """
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        _ResidualBlock(width),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )

"""Models of realistic size for the benchmarks (no downloads: built here)."""

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (out + (x if self.down is None else self.down(x))).relu()


def resnet18(num_classes: int = 1000, stem: str = "imagenet") -> nn.Module:
    """ResNet-18 (He et al. 2016): 11.7 M parameters, 11.2 M of them in conv/linear weights.

    ``stem="imagenet"``: the 7x7 stride-2 convolution and max-pool of the ImageNet network (a 32x32
    input leaves 1x1 maps in the last stage).  ``stem="cifar"``: one 3x3 stride-1 convolution and no
    pool, the usual ResNet-18 for 32x32 images (He et al.'s CIFAR setting; 11.2 M weights as well).
    """
    if stem == "imagenet":
        stem_layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    elif stem == "cifar":
        stem_layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    else:
        raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
    stem = stem_layers
    layers: list[nn.Module] = stem
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def mlp_stack(width: int = 2048, depth: int = 12) -> nn.Module:
    """A transformer-MLP-like stack of Linear layers: depth * (width x 4 width + 4 width x width) weights."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
    return nn.Sequential(*layers)

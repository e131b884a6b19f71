"""Data and models for the embedded default run, the recipes and the tests (after ``lightning.pytorch.demos``).

* :class:`DigitsDataModule` - scikit-learn's 8x8 handwritten digits (1797 images, shipped with
  the package: no download), a fixed train/val/test split.
* :class:`SyntheticDataModule` - random images and labels of any shape, for speed tests.
* :class:`ImageClassifier` - a ``LightningModule`` around any ``nn.Module``, logging loss and
  accuracy; :func:`~lit_prune.cli.digits.digits_cnn` and :func:`~lit_prune.cli.digits.mlp` (re-exported
  here) build the networks the configs name.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lit_prune.cli.digits import digits_cnn, load_digits_split, mlp
from lit_prune.cli.fully_shard import FullyShardsNet

__all__ = [
    "DigitsDataModule",
    "ImageClassifier",
    "SyntheticDataModule",
    "TensorDataModule",
    "digits_cnn",
    "load_digits_split",
    "mlp",
]


class TensorDataModule(LightningDataModule):
    """Loaders over ``self.splits`` (``{"train"|"val"|"test": tensors}``), the training one shuffled.

    Subclasses fill ``self.splits`` in ``setup``; ``shuffle_seed`` seeds the training order.
    """

    shuffle_seed = 0

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.splits: dict[str, Tensor | tuple[Tensor, ...]] = {}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        tensors = self.splits[split]
        dataset = TensorDataset(*tensors) if isinstance(tensors, tuple) else TensorDataset(tensors)
        generator = torch.Generator().manual_seed(self.shuffle_seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test")


class DigitsDataModule(TensorDataModule):
    """scikit-learn's digits (8x8 grey images, 10 classes), shipped with scikit-learn.

    Example::

        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([32, 1, 8, 8])
    """

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__(batch_size)
        self.seed = seed

    def setup(self, stage: str) -> None:  # noqa: D102
        if not self.splits:
            self.splits = load_digits_split(self.seed)


class SyntheticDataModule(TensorDataModule):
    """Random images and labels (for speed tests): ``shape`` per sample, ``num_classes`` labels.

    Example::

        >>> dm = SyntheticDataModule(num_samples=64, shape=(3, 32, 32), batch_size=16)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([16, 3, 32, 32])
    """

    def __init__(
        self,
        num_samples: int = 1024,
        shape: tuple[int, ...] | list[int] = (1, 8, 8),
        num_classes: int = 10,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size)
        self.num_samples, self.shape, self.num_classes, self.seed = num_samples, tuple(shape), num_classes, seed

    def setup(self, stage: str) -> None:  # noqa: D102
        if self.splits:
            return
        g = torch.Generator().manual_seed(self.seed)
        n = self.num_samples
        x = torch.randn(n, *self.shape, generator=g)
        y = torch.randint(0, self.num_classes, (n,), generator=g)
        cut = [int(0.8 * n), int(0.9 * n)]
        self.splits = {"train": (x[: cut[0]], y[: cut[0]]), "val": (x[cut[0] : cut[1]], y[cut[0] : cut[1]])}
        self.splits["test"] = (x[cut[1] :], y[cut[1] :])


class ImageClassifier(FullyShardsNet, LightningModule):
    """Cross-entropy classification around ``net``; logs ``train_loss``, ``val_acc``, ``test_acc``.

    Example::

        >>> model = ImageClassifier(digits_cnn(), lr=1e-3)
        >>> model(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 10])
    """

    def __init__(self, net: nn.Module, lr: float = 2e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"{stage}_loss", loss, prog_bar=stage == "train")
        if stage != "train":
            self.log(f"{stage}_acc", acc, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:  # noqa: D102
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:  # noqa: D102
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:  # noqa: D102
        self._step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:  # noqa: D102
        return self(batch[0]).argmax(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:  # noqa: D102
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

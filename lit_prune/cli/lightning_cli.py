r"""Lightning's own CLI (``LightningCLI``) with lit_prune's callbacks: the alternative to the Hydra app.

Run it as ``python -m lit_prune.cli.lightning_cli`` (or ``lit-prune-lightning``) with a
subcommand (``fit``, ``validate``, ``test``, ``predict``) and a ``--config`` YAML, e.g.
``recipes/lightning_cli/digits.yaml``, or flags::

    python -m lit_prune.cli.lightning_cli fit --config recipes/lightning_cli/digits.yaml
    python -m lit_prune.cli.lightning_cli fit --config recipes/lightning_cli/digits.yaml \
        --trainer.max_epochs=3 --print_config

The model and the data module are any ``LightningModule``/``LightningDataModule`` named by
``class_path``; ``lit_prune.PruningCallback`` and ``lit_prune.StructuredPruningCallback`` take
every hyperparameter as a typed keyword (``--trainer.callbacks.help lit_prune.PruningCallback``
lists them).  :class:`DigitsCNN` is :func:`~lit_prune.cli.digits.digits_cnn` as a class, so that
a YAML can name it.  Needs ``jsonargparse[signatures]`` (the ``cli`` extra).
"""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import ArgsType, LightningCLI
from torch import nn

import lit_prune.lightning  # noqa: F401  (the callbacks, known to jsonargparse by their short names too)
from lit_prune.cli.digits import digits_cnn

__all__ = ["DigitsCNN", "lightning_cli", "main"]


class DigitsCNN(nn.Sequential):
    """:func:`~lit_prune.cli.digits.digits_cnn` as a class, for ``class_path`` in a LightningCLI YAML.

    Args:
        width: Channels of the first conv (the second has twice as many).
        hidden: Units of the hidden linear layer.
        masked: Use lit_prune's masked convs (their masks and thresholds are buffers).
        num_classes: Output classes.

    Example::

        >>> import torch
        >>> DigitsCNN(width=8, hidden=16)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, width: int = 32, hidden: int = 128, masked: bool = True, num_classes: int = 10) -> None:
        super().__init__(*digits_cnn(width=width, hidden=hidden, masked=masked, num_classes=num_classes))


def lightning_cli(args: ArgsType = None, *, run: bool = True) -> LightningCLI:
    """Run ``LightningCLI`` over any ``LightningModule``/``LightningDataModule`` given by ``class_path``.

    Args:
        args: The command line (``None``: ``sys.argv[1:]``), a list of strings or a dict.
        run: Run the subcommand; ``False`` only parses and instantiates (then no subcommand).

    Returns:
        The ``LightningCLI`` (its ``trainer``, ``model``, ``datamodule``, ``config``).

    Example::

        >>> cli = lightning_cli(["--config", "recipes/lightning_cli/digits.yaml"], run=False)  # doctest: +SKIP
        >>> cli.trainer.callbacks[0].hparams.target_sparsity  # doctest: +SKIP
        0.9
    """
    with warnings.catch_warnings():
        # Lightning 2.6 calls jsonargparse APIs deprecated in jsonargparse 4.49: nothing a user can act on.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="lightning.pytorch.cli")
        return LightningCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
        )


def main() -> None:
    """The ``lit-prune-lightning`` command: :func:`lightning_cli` on ``sys.argv``."""
    lightning_cli()


if __name__ == "__main__":
    main()

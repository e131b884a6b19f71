"""A tiny HF ``transformers`` causal LM for the Hydra app (``model=tiny_gpt2``, ``data=tokens``) and the tests.

* :func:`tiny_causal_lm` - a randomly initialised model of any ``transformers`` family built from
  a config (``GPT2Config``, ``LlamaConfig``, ...): nothing is downloaded.
* :class:`CausalLM` - a ``LightningModule`` around it: next-token cross-entropy (the model's own
  ``labels`` loss), logging ``train_loss``, ``val_loss``/``val_acc``, ``test_loss``/``test_acc``
  (next-token accuracy).
* :class:`TokenDataModule` - token sequences the code makes: each sequence counts up from a
  random start by a random stride (mod the vocabulary), so the next token is learnable from
  the context and accuracy rises above chance within a few hundred steps.

``transformers`` is imported when a model is built, not at import: lit_prune does not depend on it.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lit_prune.cli.demos import TensorDataModule
from lit_prune.cli.fully_shard import FullyShardsNet

__all__ = ["CausalLM", "TokenDataModule", "tiny_causal_lm"]


def tiny_causal_lm(config_class: str = "GPT2Config", seed: int = 0, **config: Any) -> nn.Module:
    """A randomly initialised ``AutoModelForCausalLM`` built from ``transformers.<config_class>(**config)``.

    Args:
        config_class: The name of a ``transformers`` config class (``"GPT2Config"``,
            ``"LlamaConfig"``, ...).
        seed: Seeds the random initialisation.
        **config: The config's fields (keep them tiny: ``n_embd=32, n_layer=2`` ...).

    Raises:
        ImportError: ``transformers`` is not installed (``pip install transformers``).
        ValueError: ``config_class`` names no ``transformers`` config class.

    Example::

        >>> net = tiny_causal_lm("GPT2Config", n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
        ... # doctest: +SKIP
        >>> type(net).__name__  # doctest: +SKIP
        'GPT2LMHeadModel'
    """
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - the test extra installs it
        raise ImportError("tiny_causal_lm needs `transformers`: pip install transformers") from error
    cls = getattr(transformers, config_class, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig)):
        raise ValueError(
            f"`config_class` must name a transformers config class such as 'GPT2Config', got {config_class!r}"
        )
    vocab = config.get("vocab_size")
    if vocab is not None:  # the defaults of GPT-2 (50256) would lie outside a tiny vocabulary
        config = {"bos_token_id": 0, "eos_token_id": 0, **config}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(cls(**config))


class CausalLM(FullyShardsNet, LightningModule):
    """Next-token training of a HF causal LM ``net`` (batches of ``input_ids``); logs loss and accuracy.

    Example::

        >>> class Toy(nn.Module):  # any module taking input_ids and labels and returning .loss, .logits
        ...     pass
        >>> CausalLM(Toy(), lr=1e-3).lr
        0.001
    """

    def __init__(self, net: nn.Module, lr: float = 3e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, input_ids: Tensor) -> Tensor:  # noqa: D102
        return self.net(input_ids=input_ids).logits

    def _step(self, batch: tuple[Tensor] | list[Tensor], stage: str) -> Tensor:
        ids = batch[0]
        if len(batch) != 1 or ids.is_floating_point() or ids.dim() != 2:
            raise ValueError(
                f"CausalLM takes batches of token ids [batch, length] (e.g. `data=tokens` in lit-prune), got "
                f"{len(batch)} tensors, the first {ids.dtype} of shape {tuple(ids.shape)}"
            )
        out = self.net(input_ids=ids, labels=ids)
        self.log(f"{stage}_loss", out.loss, prog_bar=stage == "train")
        if stage != "train":
            acc = (out.logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean()
            self.log(f"{stage}_acc", acc, prog_bar=True)
        return out.loss

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:  # noqa: D102
        return self._step(batch, "train")

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:  # noqa: D102
        self._step(batch, "val")

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:  # noqa: D102
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:  # noqa: D102
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def counting_sequences(num: int, length: int, vocab_size: int, seed: int = 0) -> Tensor:
    """``[num, length]`` token ids: each row counts up from a random start by a random stride, mod ``vocab_size``.

    Example::

        >>> counting_sequences(2, 5, 10, seed=0).shape
        torch.Size([2, 5])
    """
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab_size, (num, 1), generator=g)
    stride = torch.randint(1, 4, (num, 1), generator=g)
    return (start + stride * torch.arange(length)) % vocab_size


class TokenDataModule(TensorDataModule):
    """Counting token sequences (:func:`counting_sequences`), split 80/10/10.

    Example::

        >>> dm = TokenDataModule(num_samples=40, length=8, vocab_size=16, batch_size=4)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([4, 8])
    """

    def __init__(
        self, num_samples: int = 1024, length: int = 16, vocab_size: int = 64, batch_size: int = 32, seed: int = 0
    ) -> None:
        super().__init__(batch_size)
        self.num_samples, self.length, self.vocab_size = num_samples, length, vocab_size
        self.seed = self.shuffle_seed = seed

    def setup(self, stage: str) -> None:  # noqa: D102
        if self.splits:
            return
        ids = counting_sequences(self.num_samples, self.length, self.vocab_size, self.seed)
        a, b = int(0.8 * len(ids)), int(0.9 * len(ids))
        self.splits = {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}

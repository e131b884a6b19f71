"""Prune a HF ``transformers`` causal LM inside a LightningModule with ``PruningCallback``.

A tiny GPT-2 is built from a config (random init, nothing downloaded) and trained on token
sequences the script makes (each counts up from a random start by a random stride), while
``PruningCallback`` prunes it: GPT-2's attention and MLP weights are HF ``Conv1D`` layers
(weight ``[in, out]``), which lit_prune recognises; with ``--nm 2:4`` they are made 2:4 along
their input features, as sparse tensor cores need.  At the end the stripped model (masks folded
in) is loaded into a fresh, unpruned GPT-2 and saved with ``save_pretrained``.

Run::

    pip install transformers
    python examples/hf_causal_lm.py --steps 200 --sparsity 0.7
    python examples/hf_causal_lm.py --steps 200 --nm 2:4 --out gpt2_2of4
"""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from lit_prune import PruningCallback, is_nm_sparse


def tiny_gpt2(vocab_size: int = 64) -> GPT2LMHeadModel:
    """A two-layer GPT-2 with 64-wide embeddings, randomly initialised."""
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=32, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


class CausalLM(LightningModule):
    """Next-token training of a HF causal LM (its own ``labels`` loss)."""

    def __init__(self, model: GPT2LMHeadModel, lr: float = 3e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        """The model's next-token loss on a batch of token ids."""
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over every parameter."""
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def counting_data(num: int = 1024, length: int = 16, vocab_size: int = 64, batch_size: int = 32) -> DataLoader:
    """Token sequences ``start + stride * t (mod vocab)``: the next token follows from the context."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab_size, (num, 1), generator=g)
    stride = torch.randint(1, 4, (num, 1), generator=g)
    ids = (start + stride * torch.arange(length)) % vocab_size
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=True, generator=g)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and prune; return each pruned weight's sparsity."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--sparsity", type=float, default=0.7, help="target sparsity (ignored by --nm weights)")
    parser.add_argument("--nm", default=None, help="N:M for the attention/MLP weights, e.g. 2:4")
    parser.add_argument("--out", default=None, help="save the stripped model here with save_pretrained")
    args = parser.parse_args(argv)

    seed_everything(0)
    module = CausalLM(tiny_gpt2())
    end = max(2, args.steps * 3 // 4)  # prune over the first three quarters, fine-tune after
    nm = {"nm_sparsity_map": [rf"\.(attn|mlp)\.:{args.nm}"]} if args.nm else {}
    pruning = PruningCallback(
        target_sparsity=args.sparsity,
        begin_pruning_step=1,
        end_pruning_step=end,
        pruning_frequency=max(1, end // 10),
        sparsity_function_begin_step=1,
        sparsity_function_end_step=end,
        **nm,
    )
    trainer = Trainer(
        max_steps=args.steps,
        callbacks=[pruning],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, counting_data())

    sparsity = {name: float(v) for name, v in pruning.get_weight_sparsity().items()}
    for name, value in sparsity.items():
        print(f"{name:45s} {100 * value:6.2f} % zeros")
    stripped = {k.removeprefix("model."): v for k, v in pruning.stripped_state_dict(module).items()}
    fresh = tiny_gpt2()  # the unpruned architecture takes the stripped weights as they are
    fresh.load_state_dict(stripped)
    if args.nm:
        n, m = (int(v) for v in args.nm.split(":"))
        c_fc = fresh.transformer.h[0].mlp.c_fc.weight  # Conv1D [in, out]: groups run along dim 0
        print(f"c_fc 2:4 along its inputs: {is_nm_sparse(c_fc, n, m, input_dims=0)}")
    if args.out:
        fresh.save_pretrained(args.out)
        print(f"saved to {args.out}")
    return sparsity


if __name__ == "__main__":
    main()

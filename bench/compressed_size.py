"""File sizes: a pruned model's dense ``state_dict`` (``torch.save``) against ``lit_prune.save_compressed``.

    python bench/compressed_size.py            # prints a Markdown table (about a minute on 2 CPU cores)

Models (nothing downloaded):

- the digits CNN of ``lit-prune`` trained with gradual pruning to 90 % (the engine in a plain loop,
  :mod:`lit_prune.cli.torch_loop`, a short schedule);
- a tiny GPT-2 (``transformers.GPT2Config``: 4 layers, 256 wide, vocabulary 8192; random init)
  pruned in one step at 50 % unstructured, and with its blocks' ``Conv1D`` weights 2:4 (groups
  along the input features) and its embeddings 50 % unstructured.

Each pruned model is stripped (:func:`lit_prune.strip_pruning_vars`: ``w * mask``, so a negative
pruned weight is ``-0.0``); "compressed" keeps those signs (bit for bit), "signed_zeros=False"
stores them as ``+0.0`` (the same numbers).  Every file is read back and checked.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import torch

from lit_prune import Pruning, PruningHParams, load_compressed, save_compressed, strip_pruning_vars
from lit_prune.cli import torch_loop

DIGITS_SPEC = (
    "name=digits_90,begin_pruning_step=20,end_pruning_step=120,pruning_frequency=10,target_sparsity=0.9,"
    "sparsity_function_begin_step=20,sparsity_function_end_step=100"
)


def digits_cnn_90() -> dict[str, torch.Tensor]:
    model, pruning = torch_loop.train(PruningHParams().parse(DIGITS_SPEC), epochs=8, seed=0, writer=None)
    return strip_pruning_vars(model, pruning).state_dict()


def tiny_gpt2(nm: bool) -> dict[str, torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=256, vocab_size=8192)
    model = GPT2LMHeadModel(config).eval()
    spec: dict = {"target_sparsity": 0.5, "threshold_method": "exact"}
    if nm:
        spec["nm_sparsity_map"] = {r"\.c_\w+\.weight$": "2:4"}  # the blocks' Conv1D weights
    pruning = Pruning(model, spec, sparsity=0.5)
    pruning.mask_update(1)
    return strip_pruning_vars(model, pruning).state_dict()


def sizes(state: dict[str, torch.Tensor], folder: Path) -> dict[str, object]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    exact, canonical = folder / "exact.safetensors", folder / "canonical.safetensors"
    kinds = save_compressed(state, exact)
    save_compressed(state, canonical, signed_zeros=False)
    for path in (exact, canonical):
        loaded = load_compressed(path)
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), path
    weights = [v for k, v in state.items() if not kinds[k].startswith(("alias", "dense"))]
    zeros = sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))
    encodings = sorted({k.split(" (")[0] for k in kinds.values() if not k.startswith("alias")})
    return {
        "dense": buffer.getbuffer().nbytes,
        "exact": exact.stat().st_size,
        "canonical": canonical.stat().st_size,
        "sparsity": zeros,
        "encodings": ", ".join(encodings),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    cases = {
        "digits CNN, 90 %": digits_cnn_90,
        "tiny GPT-2, 50 % unstructured": lambda: tiny_gpt2(nm=False),
        "tiny GPT-2, 2:4 (blocks) + 50 % (embeddings)": lambda: tiny_gpt2(nm=True),
    }
    rows = [
        "| model | sparsity of the compressed weights | dense `torch.save` | compressed | "
        "ratio | `signed_zeros=False` | ratio | encodings |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for name, build in cases.items():
            s = sizes(build(), Path(folder))
            rows.append(
                f"| {name} | {100 * s['sparsity']:.1f} % | {s['dense']:,} B | {s['exact']:,} B | "
                f"{s['exact'] / s['dense']:.3f} | {s['canonical']:,} B | {s['canonical'] / s['dense']:.3f} | "
                f"{s['encodings']} |"
            )
            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()

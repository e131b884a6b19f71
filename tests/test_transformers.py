"""Real models: tiny HF ``transformers`` GPT-2, BERT and Llama (configs, random init, nothing downloaded).

GPT-2's attention/MLP weights are HF ``Conv1D`` (``[in, out]``, applied as ``x @ W``): the default
selection must prune them, and N:M groups must run along their input features.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the Hub
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from lit_prune import Pruning, PruningCallback, is_nm_sparse, strip_checkpoint, strip_pruning_vars  # noqa: E402
from lit_prune.cli.causal_lm import CausalLM, TokenDataModule, tiny_causal_lm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPT2 = {"vocab_size": 64, "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 2}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
END = {"begin_pruning_step": 0, "sparsity_function_begin_step": 0, "sparsity_function_end_step": 10}


def gpt2(seed: int = 0):
    return tiny_causal_lm("GPT2Config", seed=seed, **GPT2)


def conv1d_names(model) -> list[str]:
    return [f"transformer.h.{i}.{layer}.weight" for i in range(len(model.transformer.h)) for layer in CONV1D]


# ---------------------------------------------------------------------------- GPT-2
def test_gpt2_default_selection_prunes_conv1d_and_the_tied_head_once():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    pruning = Pruning(model, {"target_sparsity": 0.8, **END})
    assert pruning.weight_names == ["transformer.wte.weight", "transformer.wpe.weight", *conv1d_names(model)]
    pruning.mask_update(10)
    sparsity = pruning.get_weight_sparsity()
    for name in conv1d_names(model):
        assert float(sparsity[name]) == pytest.approx(0.8, abs=0.01), name
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, pruned once
    assert float((model.lm_head.weight == 0).float().mean()) == pytest.approx(0.8, abs=0.01)
    model(input_ids=torch.zeros(1, 8, dtype=torch.long))


def test_gpt2_2_of_4_runs_along_the_input_features():
    model = gpt2()
    pruning = Pruning(model, {"nm_sparsity_map": [r"\.(attn|mlp)\.:2:4"], "target_sparsity": 0.6, **END})
    pruning.mask_update(10)
    pruning.check_nm()
    params = dict(model.named_parameters())
    for name in conv1d_names(model):
        w = params[name].detach()  # stored [in, out]
        n_in, n_out = w.shape
        groups = w.reshape(n_in, n_out).t().reshape(n_out, n_in // 4, 4)  # along in, for each output
        assert ((groups != 0).sum(-1) == 2).all(), name
        assert not is_nm_sparse(w, 2, 4), name  # along the stored last dim (the outputs) it is not 2:4
        assert is_nm_sparse(w, 2, 4, input_dims=0), name
    assert float(pruning.get_weight_sparsity()["transformer.wte.weight"]) == pytest.approx(0.6, abs=0.01)
    stripped = strip_pruning_vars(model, pruning)
    assert is_nm_sparse(stripped.transformer.h[0].mlp.c_fc.weight, 2, 4, input_dims=0)
    if not torch.cuda.is_available():  # the Conv1D weights are eligible: only the device stops them
        with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight is on cpu"):
            strip_pruning_vars(model, pruning, semi_structured=True)


def test_gpt2_tied_embedding_takes_the_heads_input_dim_under_nm():
    model = gpt2()
    pruning = Pruning(model, {"nm_sparsity": "2:4", "exclude_patterns": ["wpe"], **END})
    assert "transformer.wte.weight" in pruning.nm_weights()
    pruning.mask_update(10)
    assert is_nm_sparse(model.lm_head.weight, 2, 4)  # [vocab, hidden]: along hidden, the head's input
    with pytest.raises(Exception, match=r"'transformer.wpe.weight' of transformer.wpe \(Embedding\)"):
        Pruning(gpt2(), "nm_sparsity=2:4")


# ---------------------------------------------------------------------------- BERT, Llama
def test_bert_regex_maps_and_global_ranking():
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, type_vocab_size=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight.mul_(4)  # larger weights: ranked together, kept more
    spec = {
        "target_sparsity": 0.8,
        "global_ranking": True,
        "weight_sparsity_map": [r"attention\.self\.(query|key)\.weight:0.5", r"embeddings\.position:0.3"],
        **END,
    }
    pruning = Pruning(model, spec)
    pruning.mask_update(10)
    sparsity = {k: float(v) for k, v in pruning.get_weight_sparsity().items()}
    for name in ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.key.weight"):
        assert sparsity[name] == pytest.approx(0.5, abs=0.01)
    assert sparsity["bert.embeddings.position_embeddings.weight"] == pytest.approx(0.3, abs=0.02)
    mapped = {n for n in sparsity if "query" in n or "key" in n or "position" in n}
    joint = [n for n in sparsity if n not in mapped]
    assert "bert.encoder.layer.0.attention.self.value.weight" in joint
    thresholds = pruning.get_thresholds()
    assert len({float(thresholds[n]) for n in joint}) == 1  # one threshold for the jointly ranked weights
    big, other = (
        sparsity["bert.encoder.layer.0.intermediate.dense.weight"],
        sparsity["bert.encoder.layer.0.output.dense.weight"],
    )
    assert big < other - 0.3  # the larger weights keep more
    assert float(pruning.model_sparsity()) == pytest.approx(0.8, abs=0.05)


def test_llama_default_selection_and_2_of_4_on_every_projection():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    pruning = Pruning(model, {"nm_sparsity_map": [r"_proj\.weight:2:4"], **END})
    layer = "model.layers.0"
    projections = [f"{layer}.self_attn.{p}_proj.weight" for p in "qkvo"]
    projections += [f"{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert pruning.weight_names == ["model.embed_tokens.weight", *projections, "lm_head.weight"]
    assert set(pruning.nm_weights()) == set(projections)
    pruning.mask_update(10)
    params = dict(model.named_parameters())
    for name in projections:
        w = params[name].detach()  # nn.Linear [out, in]: groups along in, the last dim
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all(), name
    assert model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits.isfinite().all()


# ---------------------------------------------------------------------------- in a Lightning fit
def _fit(module: CausalLM, steps: int, root: Path, ckpt_path: str | None = None) -> PruningCallback:
    cb = PruningCallback(
        target_sparsity=0.5, begin_pruning_step=1, pruning_frequency=1, sparsity_function_begin_step=1,
        sparsity_function_end_step=4, nm_sparsity_map=[r"\.mlp\.:2:4"],
    )  # fmt: skip
    trainer = Trainer(
        max_steps=steps, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=root, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, TokenDataModule(num_samples=80, length=16, vocab_size=64, batch_size=8), ckpt_path=ckpt_path)
    if ckpt_path is None:
        trainer.save_checkpoint(root / "last.ckpt")
    return cb


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2_fit")
    seed_everything(0)
    module = CausalLM(gpt2())
    cb = _fit(module, 5, root)
    return module, cb, root / "last.ckpt"


def test_fit_prunes_conv1d_and_keeps_the_head_tied(fitted):
    module, cb, _ = fitted
    net = module.net
    assert net.lm_head.weight is net.transformer.wte.weight
    sparsity = cb.get_weight_sparsity()
    for name in conv1d_names(net):
        assert float(sparsity[f"net.{name}"]) == pytest.approx(0.5, abs=0.01), name
    assert is_nm_sparse(net.transformer.h[1].mlp.c_proj.weight, 2, 4, input_dims=0)


def test_resume_from_a_checkpoint_into_a_fresh_hf_model(fitted, tmp_path):
    module, cb, ckpt = fitted
    fresh = CausalLM(gpt2(seed=1))  # other random weights: all must come from the checkpoint
    resumed = _fit(fresh, 5, tmp_path, ckpt_path=str(ckpt))
    assert resumed.pruning.last_update_step == cb.pruning.last_update_step
    for name, mask in cb.get_masks().items():
        assert torch.equal(resumed.get_masks()[name], mask), name
    for (name, p), q in zip(module.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert fresh.net.lm_head.weight is fresh.net.transformer.wte.weight


def test_stripped_output_loads_into_an_unpruned_hf_model(fitted):
    module, cb, ckpt = fitted
    ids = torch.arange(12).reshape(1, 12) % 64
    expected = module.net.eval()(input_ids=ids).logits
    for state in (cb.stripped_state_dict(module), strip_checkpoint(ckpt)):
        plain = gpt2(seed=2).eval()
        plain.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})  # strict: same keys
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-6)
        assert float((plain.transformer.h[0].mlp.c_fc.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


# ---------------------------------------------------------------------------- examples
def test_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import hf_causal_lm

    sparsity = hf_causal_lm.main(["--steps", "4", "--nm", "2:4", "--out", str(tmp_path / "gpt2")])
    assert sparsity["model.transformer.h.0.mlp.c_fc.weight"] == pytest.approx(0.5)
    assert "c_fc 2:4 along its inputs: True" in capsys.readouterr().out
    assert (tmp_path / "gpt2" / "config.json").is_file()


@pytest.mark.slow
def test_hydra_app_trains_tiny_gpt2(tmp_path):
    args = [
        "model=tiny_gpt2", "data=tokens", "dense_baseline=false", "trainer.max_epochs=1", "logger=csv",
        "data.num_samples=160", "data.batch_size=32", "model.net.n_embd=32", "model.net.n_layer=1",
        "pruning.target_sparsity=0.5", "pruning.allocation=uniform", "pruning.begin_pruning_step=1",
        "pruning.end_pruning_step=4",
        "pruning.pruning_frequency=1", "pruning.sparsity_function_begin_step=1",
        "pruning.sparsity_function_end_step=4", "pruning.nm_sparsity_map=[mlp:2:4]", "hydra.run.dir=run",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lit_prune", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["weight_sparsity"]["net.transformer.h.0.attn.c_attn.weight"] == pytest.approx(0.5, abs=0.01)
    assert summary["nm_weights"]["net.transformer.h.0.mlp.c_fc.weight"] == "2:4"
    state = torch.load(tmp_path / "run" / "model_stripped.pt", weights_only=True)
    assert is_nm_sparse(state["net.transformer.h.0.mlp.c_proj.weight"], 2, 4, input_dims=0)

"""A checkpoint written by lit_prune at main 709ab36 (before the engine refactor) still resumes and strips."""

from pathlib import Path

import torch
from lightning.pytorch import Trainer

from lit_prune import PruningCallback, strip_checkpoint
from lit_prune.cli.demos import ImageClassifier, SyntheticDataModule

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "checkpoint_v1.ckpt"


def _fixture_net() -> torch.nn.Module:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_checkpoint_v1", FIXTURES / "make_checkpoint_v1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fixture_net()


def test_v1_checkpoint_resumes_with_its_masks(tmp_path):
    saved_masks = torch.load(FIXTURES / "checkpoint_v1_masks.pt", weights_only=True)
    model = ImageClassifier(_fixture_net())
    callback = PruningCallback(
        "target_sparsity=0.5,begin_pruning_step=0,sparsity_function_end_step=8,pruning_frequency=2",
        prune_option="first_order_gradient",
    )
    trainer = Trainer(
        max_steps=6, callbacks=[callback], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    # max_steps equals the saved global step: fit restores the state and stops at once
    trainer.fit(model, SyntheticDataModule(num_samples=256, batch_size=32), ckpt_path=CHECKPOINT)
    masks = callback.get_masks()
    assert set(masks) == set(saved_masks) == {"net.1.weight", "net.3.weight"}
    for name, mask in saved_masks.items():
        assert torch.equal(masks[name].cpu(), mask), name
    assert callback.pruning.last_update_step == 6
    assert 0.0 < float(callback.get_weight_sparsity()["net.3.weight"]) < 1.0


def test_v1_checkpoint_strips(tmp_path):
    saved_masks = torch.load(FIXTURES / "checkpoint_v1_masks.pt", weights_only=True)
    state = strip_checkpoint(CHECKPOINT, tmp_path / "plain.pt")
    for name, mask in saved_masks.items():
        assert bool((state[name][~mask] == 0).all()), name
    assert "net.1.mask" not in state and "net.1.threshold" not in state
    plain = _fixture_net()
    plain[1] = torch.nn.Linear(64, 16)
    plain_state = {k.removeprefix("net."): v for k, v in torch.load(tmp_path / "plain.pt", weights_only=True).items()}
    plain.load_state_dict(plain_state)

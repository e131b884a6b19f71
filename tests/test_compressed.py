"""Compressed export: bit-for-bit round trips, the N:M path, sizes, corrupted and truncated files, the CLI option.

Run: pytest tests/test_compressed.py   (the `lit-prune` subprocess run is marked slow)
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lit_prune import CompressedFileError, load_compressed, save_compressed
from lit_prune.engine.nm import nm_mask
from lit_prune.export.compressed import pack_bits, unpack_bits

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool,
          torch.float8_e4m3fn, torch.complex64]  # fmt: skip


def raw_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


def assert_bitwise_equal(loaded, original):
    assert list(loaded) == list(original)
    for name, t in original.items():
        got = loaded[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(raw_bytes(got), raw_bytes(t)), name


def sparse(shape, dtype, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) >= sparsity
    values = torch.randn(shape, generator=g) * 4
    if not dtype.is_floating_point and not dtype.is_complex:
        values = values.round().clamp(1, 100)
    values[torch.rand(shape, generator=g) < sparsity] = 0
    return values.to(dtype)


def nm_weight(shape, n=2, m=4, dim=-1, seed=0):
    """A weight whose every group of M along ``dim`` keeps N: lit_prune's own N:M mask."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    t = w.movedim(dim, -1)
    mask = nm_mask(t.abs().contiguous(), m, m - n)
    return torch.where(mask, t, 0.0).movedim(-1, dim).contiguous()  # +0.0 where pruned


def test_round_trip_of_a_mixed_state_dict_is_bit_for_bit(tmp_path):
    base = torch.randn(10, 12)
    specials = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -1.5, 0.0, 0.0, 0.0] * 8)
    state = {
        "fc.weight": sparse((32, 64), torch.float32, 0.9, 0),
        "fc.bf16": sparse((32, 64), torch.bfloat16, 0.9, 1),
        "fc.fp16_transposed": sparse((64, 32), torch.float16, 0.8, 2).t(),  # non-contiguous
        "specials": specials,  # -0.0 and NaN are kept, bit for bit
        "emb.weight": base,
        "lm_head.weight": base,  # tied
        "rows": base[2:5],  # a view into the same storage, not tied
        "bn.num_batches_tracked": torch.tensor(7),
        "bn.running_var": torch.ones(16),
        "mask": torch.rand(40, 8) > 0.9,
        "empty": torch.empty(0, 3),
    }
    kinds = save_compressed(state, tmp_path / "m.safetensors")
    assert kinds["fc.weight"] == "bitmask" and kinds["lm_head.weight"] == "alias of emb.weight"
    assert kinds["bn.running_var"] == "dense" and kinds["bn.num_batches_tracked"] == "dense"
    loaded = load_compressed(tmp_path / "m.safetensors")
    assert_bitwise_equal(loaded, state)
    assert loaded["lm_head.weight"] is loaded["emb.weight"]
    assert loaded["fc.fp16_transposed"].is_contiguous()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
    dtype=st.sampled_from(DTYPES),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.9, 0.99, 1.0]),
    seed=st.integers(0, 2**16),
    transpose=st.booleans(),
)
def test_any_tensor_round_trips_and_never_grows_past_dense(tmp_path, shape, dtype, sparsity, seed, transpose):
    t = sparse(shape, dtype, sparsity, seed)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, -1)
    path = tmp_path / "t.safetensors"
    save_compressed({"t": t}, path)
    assert_bitwise_equal(load_compressed(path), {"t": t})
    stored = save_file_size({"t": t.contiguous()}, tmp_path / "dense.safetensors")
    assert path.stat().st_size <= stored + 600  # the encoding never beats dense by losing: only the index is extra


def save_file_size(tensors, path):
    save_file(tensors, str(path))
    return path.stat().st_size


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 6).map(lambda r: 4 * r),
    cols=st.integers(1, 6).map(lambda c: 4 * c),
    nm=st.sampled_from([(1, 4), (2, 4), (1, 8), (2, 8)]),
    dim=st.sampled_from([0, -1]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_nm_weights_take_the_nm_path_and_round_trip(tmp_path, rows, cols, nm, dim, dtype):
    n, m = nm
    shape = (rows * (2 if m == 8 and dim == 0 else 1), cols * (2 if m == 8 and dim == -1 else 1))
    w = nm_weight(shape, n, m, dim).to(dtype)
    kinds = save_compressed({"w": w}, tmp_path / "w.safetensors")
    assert kinds["w"].startswith("nm "), kinds
    assert_bitwise_equal(load_compressed(tmp_path / "w.safetensors"), {"w": w})


def test_two_four_is_values_plus_two_bit_indices_along_the_input_dim(tmp_path):
    linear = nm_weight((64, 128), dim=-1)  # nn.Linear: [out, in], groups along the last dim
    conv1d = nm_weight((128, 64), dim=0)  # HF Conv1D: [in, out], groups along dim 0
    kinds = save_compressed({"linear": linear, "conv1d": conv1d}, tmp_path / "nm.safetensors")
    assert kinds == {"linear": "nm 2:4 (last)", "conv1d": "nm 2:4 (first)"}
    header = read_header(tmp_path / "nm.safetensors")
    for name in ("linear", "conv1d"):
        assert header[f"{name}.compressed"]["shape"] == [64 * 128 // 4, 2]  # two values per group of four
        assert header[f"{name}.indices"]["shape"] == [64 * 128 // 8]  # 2 bits x 2 per group: numel / 8 bytes
    loaded = load_compressed(tmp_path / "nm.safetensors")
    assert torch.equal(loaded["linear"], linear) and torch.equal(loaded["conv1d"], conv1d)


def test_one_of_four_is_smaller_than_its_bitmask(tmp_path):
    w = nm_weight((64, 64), n=1, m=4)
    save_compressed({"w": w}, tmp_path / "w.safetensors")
    header = read_header(tmp_path / "w.safetensors")
    assert set(header) - {"__metadata__"} == {"w.compressed", "w.indices"}
    assert header["w.indices"]["shape"] == [64 * 64 // 16]  # 2 bits per group of 4; a bitmask takes 4


def test_negative_zeros_cost_a_bit_each_unless_signed_zeros_is_off(tmp_path):
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    pruned = w * (w.abs() > 1.6)  # -0.0 where a negative weight was pruned, as strip_pruning_vars leaves it
    assert bool(torch.signbit(pruned[pruned == 0]).any())
    exact, canonical = tmp_path / "exact.safetensors", tmp_path / "canonical.safetensors"
    save_compressed({"w": pruned}, exact)
    save_compressed({"w": pruned}, canonical, signed_zeros=False)
    assert "w.zero_signs" in read_header(exact) and "w.zero_signs" not in read_header(canonical)
    assert_bitwise_equal(load_compressed(exact), {"w": pruned})
    loaded = load_compressed(canonical)["w"]
    assert torch.equal(loaded, pruned) and not bool(torch.signbit(loaded[loaded == 0]).any())
    zeros = int((pruned == 0).sum())
    assert 0 <= exact.stat().st_size - canonical.stat().st_size - math.ceil(zeros / 8) < 200  # + its header entry
    two_four = nm_weight((64, 64)) * -1  # -0.0 everywhere pruned: the N:M path keeps their signs too
    assert save_compressed({"w": two_four}, exact) == {"w": "nm 2:4 (last)"}
    assert_bitwise_equal(load_compressed(exact), {"w": two_four})


def read_header(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def test_a_model_loads_its_compressed_state_dict_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10))  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p[p.abs() < p.abs().flatten().quantile(0.9)] = 0
    model(torch.randn(4, 3, 8, 8))  # BatchNorm running stats move
    import tempfile

    path = Path(tempfile.mkdtemp()) / "model.safetensors"
    save_compressed(model, path)
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10))  # fmt: skip
    fresh.load_state_dict(load_compressed(path))
    assert_bitwise_equal(fresh.state_dict(), model.state_dict())


def test_tied_module_weights_stay_tied(tmp_path):
    emb = torch.nn.Embedding(16, 8)
    head = torch.nn.Linear(8, 16, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    kinds = save_compressed(model, tmp_path / "tied.safetensors")
    assert kinds["head.weight"] == "alias of emb.weight"
    loaded = load_compressed(tmp_path / "tied.safetensors")
    assert loaded["head.weight"] is loaded["emb.weight"]


def test_pack_bits_matches_numpy_little_endian():
    np = pytest.importorskip("numpy")
    flags = torch.rand(1000, generator=torch.Generator().manual_seed(0)) > 0.5
    expected = np.packbits(flags.numpy(), bitorder="little")
    assert pack_bits(flags).numpy().tolist() == expected.tolist()
    assert torch.equal(unpack_bits(pack_bits(flags), 1000), flags)


# Bad input


@pytest.fixture
def saved(tmp_path):
    state = {"a.weight": sparse((48, 32), torch.float32, 0.9, 3), "b.weight": nm_weight((16, 32)),
             "b.bias": torch.randn(16)}  # fmt: skip
    path = tmp_path / "model.safetensors"
    save_compressed(state, path)
    return path, state


def test_a_flipped_data_byte_names_the_tensor(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # the last stored part
    path.write_bytes(bytes(data))
    with pytest.raises(CompressedFileError, match=r"model\.safetensors: tensor '.*': part '.*' is corrupted \(CRC-32"):
        load_compressed(path)


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -1, -100])
def test_a_truncated_file_is_refused(saved, cut):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: cut if cut >= 0 else len(data) + cut])
    with pytest.raises(CompressedFileError, match=r"model\.safetensors: truncated"):
        load_compressed(path)


def test_trailing_bytes_are_refused(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    with pytest.raises(CompressedFileError, match="trailing bytes"):
        load_compressed(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255), truncate=st.booleans())
def test_any_single_corruption_or_cut_fails_clearly_or_gives_the_exact_weights(saved, position, flip, truncate):
    path, state = saved
    original = path.read_bytes()
    where = int(position * len(original))
    data = original[:where] if truncate else original[:where] + bytes([original[where] ^ flip]) + original[where + 1 :]
    bad = path.with_name("bad.safetensors")
    bad.write_bytes(data)
    try:
        loaded = load_compressed(bad)
    except CompressedFileError as error:
        assert "bad.safetensors" in str(error)
    else:
        assert_bitwise_equal(loaded, state)  # e.g. a space of the JSON header padding turned into a tab


def test_a_tampered_index_is_refused(saved):
    path, _ = saved
    data = path.read_bytes()
    tampered = data.replace(b'\\"nnz\\":', b'\\"nnz\\" :', 1)  # same JSON, different text: the checksum fails
    assert len(tampered) == len(data) + 1
    (length,) = struct.unpack("<Q", data[:8])
    path.write_bytes(struct.pack("<Q", length + 1) + tampered[8:])
    with pytest.raises(CompressedFileError, match="index's checksum does not match"):
        load_compressed(path)


def test_a_header_whose_metadata_is_not_an_object_is_refused(tmp_path):
    header = json.dumps({"__metadata__": ["format"], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    with pytest.raises(CompressedFileError, match=r"odd\.safetensors: corrupted safetensors header \(`__metadata__`"):
        load_compressed(tmp_path / "odd.safetensors")


def test_a_plain_safetensors_file_and_a_missing_file(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CompressedFileError, match="not a lit_prune compressed file.*safetensors.torch.load_file"):
        load_compressed(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError, match="no compressed file at .*nothing.safetensors"):
        load_compressed(tmp_path / "nothing.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, world")
    with pytest.raises(CompressedFileError, match="truncated or not a safetensors file"):
        load_compressed(tmp_path / "text.safetensors")


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"w": torch.zeros(2, dtype=torch.complex128)}, "tensor 'w' has dtype torch.complex128, which safetensors"),
        ({"w": torch.zeros(2), "extra": 3}, "state_dict entry 'extra' is a int, expected a Tensor"),
        ({"w": torch.zeros(2, device="meta")}, "tensor 'w' is meta"),
        ({"w": torch.zeros(64, 64), "w.bitmask": torch.zeros(1)}, "stored part 'w.bitmask' of 'w' is also a name"),
    ],
)
def test_bad_state_dicts_are_refused_with_the_tensor_named(tmp_path, state, message):
    if "w.bitmask" in state:
        state["w"][0, 0] = 1.0
    with pytest.raises((TypeError, ValueError), match=message):
        save_compressed(state, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="an nn.Module or a state_dict mapping"):
        save_compressed([torch.zeros(1)], tmp_path / "x.safetensors")


# The CLI option


def test_export_compressed_writes_the_stripped_model(tmp_path):
    from hydra import compose, initialize_config_dir

    from lit_prune import MaskedLinear
    from lit_prune.cli.app import export_compressed

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        off = compose("config")
        on = compose("config", overrides=["export.compressed=out/model.safetensors"])
    model = torch.nn.Sequential(MaskedLinear(64, 64))
    with torch.no_grad():
        model[0].mask.copy_(torch.rand(64, 64) > 0.9)
    assert export_compressed(off, tmp_path, model, []) is None
    result = export_compressed(on, tmp_path, model, [])
    assert result["path"] == str(tmp_path / "out" / "model.safetensors")
    assert result["bytes"] == (tmp_path / "out" / "model.safetensors").stat().st_size
    loaded = load_compressed(result["path"])
    assert torch.equal(loaded["0.mask"], model[0].mask)  # without a PruningCallback: the model's own state_dict


@pytest.mark.slow
def test_lit_prune_run_writes_a_smaller_compressed_file(tmp_path):
    short = ["trainer.max_epochs=2", "pruning.begin_pruning_step=2", "pruning.end_pruning_step=16",
             "pruning.pruning_frequency=2", "pruning.sparsity_function_begin_step=2",
             "pruning.sparsity_function_end_step=16"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "lit_prune", "--config-path", str(ROOT / "conf"), *short, "dense_baseline=false",
         "~logger", "hydra.run.dir=run", "export.compressed=model.safetensors"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compressed_export"]["path"] == str(run / "model.safetensors")
    stripped = torch.load(run / "model_stripped.pt", weights_only=True)
    assert_bitwise_equal(load_compressed(run / "model.safetensors"), stripped)
    ratio = (run / "model.safetensors").stat().st_size / (run / "model_stripped.pt").stat().st_size
    assert ratio < 0.3, ratio  # 90 % sparse: 10 % of the values plus 1/32 of a bit per float32


def test_nm_weight_helper_is_nm():
    w = nm_weight((8, 16), dim=0)
    assert ((w.t().reshape(-1, 4) != 0).sum(dim=1) <= 2).all()
    assert math.isclose(float((w == 0).float().mean()), 0.5)

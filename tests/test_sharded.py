"""Pruning sharded weights (FSDP2 ``fully_shard``, tensor parallelism, both on a 2-D mesh) in CPU processes.

Each worker builds the same model twice, whole and sharded, prunes both with the same spec and
checks that every mask, threshold and weight of the sharded model gathers to the one process's,
bit for bit, that no process holds more than its shard, and how many collectives an update takes.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lit_prune import Pruning, save_compressed, strip_pruning_vars
from lit_prune.engine.sharding import ProcessGroupReducer, counted_here, is_sharded, local, local_region

try:
    from torch.distributed.tensor import Shard, distribute_tensor
except ImportError:  # pragma: no cover - older torch
    Shard = distribute_tensor = None

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

ELEMENTWISE = [
    "threshold_method=histogram",
    "threshold_method=histogram,threshold_decay=0.5",
    "threshold_method=exact",
    "threshold_method=exact,threshold_decay=0.3",
    "global_ranking=true",
    "global_ranking=true,threshold_method=exact",
    "allocation=erk,target_sparsity=0.8,threshold_method=exact",  # ERK from the global shapes of DTensors
]
GRADIENT = ["prune_option=first_order_gradient", "prune_option=second_order_gradient,threshold_method=exact"]


class CountingReducer:
    """A :class:`ProcessGroupReducer` that counts its collectives."""

    local = False

    def __init__(self, inner: ProcessGroupReducer) -> None:
        self.inner, self.calls = inner, 0

    def max_(self, values):
        self.calls += 1
        return self.inner.max_(values)

    def sum_(self, values):
        self.calls += 1
        return self.inner.sum_(values)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` on every process, by an all-reduce (gloo has no all-gather of CUDA tensors)."""
    if not is_sharded(t):
        return t
    wide = torch.float64 if t.dtype.is_floating_point else torch.int64  # holds float32 and bool exactly
    whole = torch.zeros(t.shape, dtype=wide, device=local(t).device)
    if counted_here(t):  # each shard once, whatever the replicas
        whole[tuple(slice(a, b) for a, b in local_region(t))] = local(t).to(wide)
    dist.all_reduce(whole)
    return whole.to(t.dtype)


def _collectives_per_update(group, hp, deferred: bool) -> int:
    """NaN check, max, kept (not read when the NaN check is deferred); counts (1), or value bins (1, on the CPU)
    and byte rounds (4); the N:M threshold; the gradient norms; the strips of blocks cut by shard boundaries."""
    if group.reducer.local:
        return 0
    exact = 4 + (group.weights[0].param.device.type == "cpu")
    rule = 1 if group.rule == "nm" else (exact if group.rule == "exact" else 1)
    cut_blocks = any(layout.strips for layout in group.blocks.values())
    return 3 - deferred + rule + (hp.prune_option != "weight") + cut_blocks


def _perturb(model: nn.Module, seed: int) -> None:
    """Move every weight as a step would, identically in the whole and the sharded model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            delta = torch.randn(p.shape, generator=generator) * 0.05
            part = delta[tuple(slice(a, b) for a, b in local_region(p))]
            local(p).add_(part.to(local(p).device))


def check_equal_to_one_process(spec, whole: nn.Module, sharded: nn.Module, counting: CountingReducer) -> None:
    """Two updates (30 %, then 60 %) of the sharded model give what one process gives on the whole one."""
    sparsity = lambda step: 0.3 if step == 1 else 0.6  # noqa: E731
    reference = Pruning(whole, spec, sparsity=sparsity)
    pruning = Pruning(sharded, spec, sparsity=sparsity, reducer=counting)
    counting.calls = 0
    for step in (1, 2):
        reference.mask_update(step)
        pruning.mask_update(step)
        _perturb(whole, step), _perturb(sharded, step)
    reference.apply_mask(), pruning.apply_mask()
    masks, thresholds, params = pruning.get_masks(), pruning.get_thresholds(), dict(sharded.named_parameters())
    rank = dist.get_rank()
    for name, mask in reference.get_masks().items():
        assert is_sharded(masks[name]) == is_sharded(params[name]), (spec, name)
        assert local(masks[name]).shape == local(params[name]).shape, (spec, name)  # this rank's part only
        assert torch.equal(_whole(masks[name]), mask), (spec, name, rank)
        assert torch.equal(thresholds[name], reference.get_thresholds()[name]), (spec, name, rank)
        assert torch.equal(_whole(params[name]).detach(), dict(whole.named_parameters())[name]), (spec, name)
    deferred = pruning._deferred_now()
    expected = 2 * sum(_collectives_per_update(g, pruning.hparams, deferred) for g in pruning._plan.groups)
    assert counting.calls == expected, (spec, counting.calls, expected)
    counting.calls = 0
    pruning.apply_mask()
    assert counting.calls == 0, spec  # apply_mask is purely local
    sparsity_now = pruning.get_weight_sparsity()
    for name, value in reference.get_weight_sparsity().items():
        assert torch.equal(sparsity_now[name], value), (spec, name)  # from reduced counts, the same everywhere


def check_refused(sharded: nn.Module, spec, weight: str, what: str) -> None:
    try:
        Pruning(sharded, spec)
    except NotImplementedError as error:  # refused before training, naming the weight and the fix
        assert f"weight {weight!r}" in str(error) and what in str(error), error
    else:
        raise AssertionError(f"{spec} on sharded weights was not refused")


def run_specs(specs, make: Callable[[], nn.Module], shard: Callable[[nn.Module], nn.Module]) -> None:
    for spec in specs:
        torch.manual_seed(0)
        whole = make()
        sharded = shard(copy.deepcopy(whole))
        weight = next(p for p in sharded.parameters() if is_sharded(p))
        check_equal_to_one_process(spec, whole, sharded, CountingReducer(ProcessGroupReducer.for_weight(weight)))


# ----------------------------------------------------------------------------- FSDP2 (1-D mesh)
def fsdp_net() -> nn.Sequential:
    # 33 output rows over 2 processes: shards of 17 and 16 rows; 1 row: one process holds an empty shard
    layers = [nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 40), nn.ReLU(), nn.Linear(40, 8), nn.ReLU(), nn.Linear(8, 1)]
    return nn.Sequential(*layers)


FSDP_SPECS = [
    *ELEMENTWISE,
    "weight_sparsity_map=[^2[.]:0.8]",
    {"block_dims_map": {"^2[.]": "4x3"}, "block_pooling_function": "MAX"},  # 20 + 20 rows: whole blocks
    {"block_dims_map": {"^2[.]": "4x4"}, "threshold_method": "exact"},  # AVG, cut-short edge blocks
    "block_height=2",  # 17 + 16 rows of the first layer: rows 16-17 are one block on both processes
    {"block_height": 4, "block_width": 3, "block_pooling_function": "MAX", "threshold_method": "exact"},
    {"block_dims_map": {"^0[.]": "4x4", "^2[.]": "3x4"}, "threshold_decay": 0.5},  # 3-row blocks cut 20 + 20
    {"nm_sparsity_map": {"^4[.]": "2:4"}},  # rows split: every N:M group on one process
    {"nm_sparsity_map": {"^0[.]": "2:4"}, "weight_sparsity_map": ["^2[.]:0.7"]},
    *GRADIENT,
    "use_tpu=true",  # TF's TPU path: static shapes, nothing read back; the histogram's counts still reduced
    "use_tpu=true,threshold_method=exact,block_height=2",
]


def _fsdp(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def bf16_net() -> nn.Sequential:
    return fsdp_net().to(torch.bfloat16)


def _on(mesh) -> Callable[[nn.Module], nn.Module]:
    return lambda model: _fsdp(model, mesh)


def gpt2() -> nn.Module:
    """A tiny GPT-2 from its config (random init, nothing downloaded)."""
    from lit_prune.cli.causal_lm import tiny_causal_lm

    return tiny_causal_lm("GPT2Config", vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)


def _fsdp_gpt2(mesh) -> Callable[[nn.Module], nn.Module]:
    def shard(model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    return shard


def check_state_round_trip(whole: nn.Module, sharded: nn.Module) -> None:
    """A sharded engine's state (DTensors) and one process's (whole tensors) both load into a sharded engine."""
    spec = "prune_option=first_order_gradient,threshold_method=exact"
    reference, pruning = Pruning(whole, spec, sparsity=0.5), Pruning(sharded, spec, sparsity=0.5)
    for p in (reference, pruning):
        p.mask_update(3)
    for saved, sharded_state in ((pruning.state_dict(), True), (reference.state_dict(), False)):
        assert all(is_sharded(m) for m in saved["masks"].values()) == sharded_state
        fresh = Pruning(sharded, spec)
        fresh.load_state_dict(saved)
        assert fresh.last_update_step == 3
        for name, mask in reference.get_masks().items():
            assert torch.equal(_whole(fresh.get_masks()[name]), mask), name
            for key, value in reference.state_dict()["saliency"][name].items():
                assert torch.equal(_whole(fresh.state_dict()["saliency"][name][key]), value), (name, key)


def check_strip_in_place(mesh) -> None:
    """``strip_pruning_vars`` folds the masks into sharded weights in place; a copy is refused by name."""
    model = _fsdp(fsdp_net(), mesh)
    pruning = Pruning(model, "threshold_method=exact", sparsity=0.5)
    pruning.mask_update(1)
    try:
        strip_pruning_vars(model, pruning)
    except ValueError as error:
        assert "inplace=True" in str(error) and "'0.weight'" in str(error), error
    else:
        raise AssertionError("strip_pruning_vars copied an FSDP2 model")
    masks = {name: _whole(mask) for name, mask in pruning.get_masks().items()}
    plain = strip_pruning_vars(model, pruning, inplace=True)
    for name, weight in plain.named_parameters():
        if name in masks:
            assert is_sharded(weight) and bool((_whole(weight.detach())[~masks[name]] == 0).all()), name


def check_after_a_forward_without_backward(mesh) -> None:
    """A ``no_grad`` forward (validation) leaves the root's own parameters unsharded: pruning still sees the shards."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    whole = fsdp_net()
    model = copy.deepcopy(whole)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)  # layers 0, 4 and 6 belong to the root, which keeps them unsharded after forward
    spec, x = "threshold_method=exact", torch.randn(4, 16)
    pruning, reference = Pruning(model, spec, sparsity=0.5), Pruning(whole, spec, sparsity=0.5)
    with torch.no_grad():
        model(x)
    assert not is_sharded(model[0].weight)  # the case itself: FSDP2 left the whole weight registered
    pruning.mask_update(1)
    reference.mask_update(1)
    with torch.no_grad():
        model(x)
    pruning.apply_mask()  # the native kernel (whole CPU weights) must not take the unsharded weight
    for name, mask in reference.get_masks().items():
        assert is_sharded(pruning.get_masks()[name]) and is_sharded(dict(model.named_parameters())[name]), name
        assert torch.equal(_whole(pruning.get_masks()[name]), mask), name
        assert torch.equal(_whole(dict(model.named_parameters())[name]).detach(), dict(whole.named_parameters())[name])


def check_mixed_precision_training(mesh) -> None:
    """FSDP2 in bfloat16 compute (float32 shards): train, update, validate, apply; masks as one process's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 8))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model[0], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the last layer: the root's own
    pruning = Pruning(model, "threshold_method=exact", sparsity=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 4):
        x = torch.randn(8, 16)
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        pruning.mask_update(step)
        with torch.no_grad():
            model(x)  # a validation forward: the root's bfloat16 copies stay registered
        pruning.apply_mask()
    whole = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 8))
    whole.load_state_dict({n: _whole(p).detach() for n, p in model.named_parameters()})
    reference = Pruning(whole, "threshold_method=exact", sparsity=0.5)
    reference.mask_update(3)  # on the gathered float32 weights, whose pruned entries are zero
    for name, mask in reference.get_masks().items():
        assert torch.equal(_whole(pruning.get_masks()[name]), mask), name


def check_sensitivity_scan_refused(mesh) -> None:
    """The sensitivity scan prunes weights whole: sharded ones are refused by name before any evaluation."""
    from lit_prune import sensitivity

    model = _fsdp(fsdp_net(), mesh)
    try:
        sensitivity(model, lambda m: 0.0, sparsities=(0.5,), progress=False)
    except NotImplementedError as error:
        assert "'0.weight'" in str(error) and "sharded (DTensors)" in str(error), error
    else:
        raise AssertionError("the scan ran on sharded weights")


def check_masked_layers_refused(mesh) -> None:
    """A masked layer keeps a whole mask buffer that FSDP2 does not shard: refused, naming the weight."""
    from lit_prune import MaskedLinear

    model = _fsdp(nn.Sequential(MaskedLinear(16, 8)), mesh)
    try:
        Pruning(model, "threshold_method=exact")
    except ValueError as error:
        assert "'0.weight' is sharded (a DTensor) but its MaskedLinear keeps" in str(error), error
    else:
        raise AssertionError("a sharded masked layer was not refused")


def _fsdp_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    last = _fsdp(fsdp_net(), mesh)[6].weight
    assert local(last).numel() == (0 if rank == 1 else 8)  # the empty shard the specs below go through
    run_specs(FSDP_SPECS, fsdp_net, _on(mesh))
    torch.manual_seed(0)
    whole = fsdp_net()
    check_state_round_trip(whole, _fsdp(copy.deepcopy(whole), mesh))
    # a 1-row shard (rows 2 + 1) and a 5-row weight cut inside a block row (3 + 2)
    small = lambda: nn.Sequential(nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 5))  # noqa: E731
    run_specs(["block_height=2", {"block_dims_map": {".": "2x2"}, "block_pooling_function": "MAX"}], small, _on(mesh))
    # bfloat16 weights (sharded as they are, without a float32 copy in FSDP2's mixed precision)
    run_specs(["threshold_method=histogram", "threshold_method=exact", "block_height=2"], bf16_net, _on(mesh))
    # as on a GPU: the NaN check read back later, new masks staged and committed where finite
    own = Pruning.__dict__["_defer_checks"]
    Pruning._defer_checks = staticmethod(lambda param: True)
    try:
        specs = ["threshold_method=histogram", "block_height=2", {"nm_sparsity_map": {"^4[.]": "2:4"}}]
        run_specs(specs, fsdp_net, _on(mesh))
    finally:
        Pruning._defer_checks = own
    if importlib.util.find_spec("transformers"):  # HF Conv1D weights ([in, out]) sharded along their input features
        nm = {"nm_sparsity_map": [r"\.(attn|mlp)\.:2:4"], "threshold_method": "exact"}
        run_specs(["threshold_method=histogram", nm, "block_height=3", "global_ranking=true"], gpt2, _fsdp_gpt2(mesh))
    try:  # a compressed file holds whole tensors: a sharded model is refused, with the way to get them
        save_compressed(_fsdp(fsdp_net(), mesh), Path(tempfile.mkdtemp()) / "model.safetensors")
    except TypeError as error:
        assert "is a DTensor" in str(error) and "strip_checkpoint" in str(error), error
    else:
        raise AssertionError("save_compressed wrote a sharded model")
    check_strip_in_place(mesh)
    check_after_a_forward_without_backward(mesh)
    check_mixed_precision_training(mesh)
    check_masked_layers_refused(mesh)
    check_sensitivity_scan_refused(mesh)
    # a conv kernel sharded along its height: a shard is not a run of rows or columns of the [out, in*kh*kw] view
    conv = nn.Conv2d(4, 4, 3)
    conv.weight = nn.Parameter(distribute_tensor(conv.weight.detach(), mesh, [Shard(2)]))
    check_refused(nn.Sequential(conv), "block_height=2", "0.weight", "must be rectangles")


# ----------------------------------------------------------------------------- tensor parallelism
def tp_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))


TP_SPECS = [
    *ELEMENTWISE,  # global_ranking ranks the sharded weights with the whole last layer
    {"block_dims_map": {"^0[.]": "4x4", "^2[.]": "2x4"}},  # Shard(0) rows and Shard(1) columns, aligned
    {"block_dims_map": {"^0[.]": "3x2", "^2[.]": "1x3"}},  # 16 + 16 rows, 16 + 16 columns: blocks cut
    {"block_dims_map": {"^2[.]": "5x5"}, "block_pooling_function": "MAX", "threshold_method": "exact"},
    {"nm_sparsity_map": {"^2[.]": "2:4"}},  # input columns split 16 + 16
    GRADIENT[0],
]


def _tp(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _tp_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    run_specs(TP_SPECS, tp_net, lambda m: _tp(m, mesh))
    check_refused(_tp(tp_net(), mesh), {"nm_sparsity_map": {"^2[.]": "2:32"}}, "2.weight", "N:M groups of 32")


# ----------------------------------------------------------------------------- 2-D: FSDP2 over tensor parallelism
def _fsdp_over_tp(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    _tp(model, mesh["tp"])
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["dp"])  # the last layer: sharded on dp, replicated on tp
    return fully_shard(model, mesh=mesh["dp"])


def _mesh_2d_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    specs = ["threshold_method=histogram", "threshold_method=exact", ELEMENTWISE[4], ELEMENTWISE[5]]
    blocks = [{"block_dims_map": {"^0[.]": "4x4"}}, {"block_dims_map": {"^0[.]": "3x3", "^2[.]": "3x3"}}]  # 3: cut
    run_specs([*specs, *blocks, GRADIENT[0]], tp_net, lambda m: _fsdp_over_tp(m, mesh))
    # HSDP: shards on one mesh dimension, replicated on the other (Replicate(), Shard(0))
    hsdp = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    run_specs(["threshold_method=exact", "block_height=3", *GRADIENT], fsdp_net, _on(hsdp))


# ----------------------------------------------------------------------------- CUDA (NCCL, or gloo on one GPU)
def _cuda_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.cuda.set_device(rank % torch.cuda.device_count())  # gloo: two processes may share one GPU
    mesh = init_device_mesh("cuda", (world,))
    blocks, nm = {"block_dims_map": {"^2[.]": "4x4"}}, {"nm_sparsity_map": {"^4[.]": "2:4"}}
    specs = [*ELEMENTWISE, blocks, "block_height=2", nm, GRADIENT[0]]  # 2-row blocks: cut on 2 GPUs
    run_specs(specs, lambda: fsdp_net().cuda(), lambda m: _fsdp(m, mesh))


# ----------------------------------------------------------------------------- launching
def _entry(rank: int, world: int, port: int, done: str, worker: Callable[[int, int], None], backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        worker(rank, world)
        dist.barrier()  # neither process leaves while another still talks to it
        Path(done, f"rank{rank}").write_text("every check passed")
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable[[int, int], None], world: int, tmp_path: Path, backend: str = "gloo") -> None:
    try:
        mp.spawn(_entry, args=(world, _free_port(), str(tmp_path), worker, backend), nprocs=world, join=True)
    except mp.ProcessExitedException as error:
        # gloo sometimes aborts a process while the process group is torn down ("terminate called
        # without an active exception"), after every check has run: only that is let through.
        finished = all((tmp_path / f"rank{r}").exists() for r in range(world))
        if error.signal_name != "SIGABRT" or not finished:
            raise


def test_fsdp2_sharded_weights_get_the_masks_and_thresholds_of_one_process(tmp_path):
    spawn(_fsdp_worker, 2, tmp_path)


def test_tensor_parallel_weights_get_the_masks_and_thresholds_of_one_process(tmp_path):
    spawn(_tp_worker, 2, tmp_path)


@pytest.mark.slow
def test_fsdp2_over_tensor_parallel_on_a_2d_mesh(tmp_path):
    spawn(_mesh_2d_worker, 4, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_fsdp2_on_cuda_over_nccl(tmp_path):
    # one process per GPU (NCCL refuses two on one GPU): a single GPU runs a 1-process mesh
    spawn(_cuda_worker, min(2, torch.cuda.device_count()), tmp_path, backend="nccl")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp2_on_cuda_in_two_processes_over_gloo(tmp_path):
    # real shards of CUDA weights even on one GPU (both processes on it); gloo all-reduces CUDA tensors
    spawn(_cuda_worker, 2, tmp_path, backend="gloo")


def test_pruning_callback_under_model_parallel_strategy_with_fully_shard(tmp_path):
    # Lightning's ModelParallelStrategy launches its second process by running the script again,
    # so the fit runs in a script of its own (tests/sharded_fit.py), not under pytest.
    import json
    import subprocess
    import sys

    out = tmp_path / "result.json"
    script = Path(__file__).with_name("sharded_fit.py")
    how = {"capture_output": True, "text": True, "timeout": 300}
    run = subprocess.run([sys.executable, str(script), str(out)], **how)
    teardown_abort = run.returncode == -6 and run.stderr.rstrip().endswith("without an active exception")
    assert run.returncode == 0 or (teardown_abort and out.exists()), run.stderr[-3000:]  # as above
    result = json.loads(out.read_text())
    assert result["last_update_step"] == 10
    assert result["export_equals_weights"]  # export_path under FSDP2: gathered to rank zero, loads unsharded
    for name, found in result["rank0"].items():
        assert found["dtensor"] and found["local_rows"] < found["rows"], (name, found)  # each process: its shard
        assert found["sparsity"] == 0.5 and found["pruned_are_zero"] and found["equals_one_process"], (name, found)
    # stopped at step 8, resumed from the distributed checkpoint (each process its part of the masks)
    assert result["checkpoint_is_directory"] and result["compared"] > 8
    assert result["resumed_update_step"] == result["straight_update_step"] == 15  # updates at 3, 6, ..., 15
    assert result["resume_differs"] == [], result["resume_differs"]
    # read back under another layout (FSDP2's rows -> net.0 whole, net.2 split by columns): resharded
    assert set(result["placements_before"].values()) == {"(Shard(dim=0),)"}
    assert result["placements_resharded"] == {"net.0.weight": "whole", "net.2.weight": "(Shard(dim=1),)"}
    assert result["resharded_compared"] == 8 and result["resharded_differs"] == [], result["resharded_differs"]
    # ... and by one process (fewer processes than wrote it): each tensor read whole, the same state
    one = tmp_path / "one.json"
    run = subprocess.run([sys.executable, str(script), str(one), "--resume-on-one-process"], **how)
    assert run.returncode == 0, run.stderr[-3000:]
    one = json.loads(one.read_text())
    assert one["placements"] == {"net.0.weight": "(Shard(dim=0),)", "net.2.weight": "(Shard(dim=0),)"}, one
    assert one["compared"] == 8 and one["differs"] == [], one
    assert result["stripped_loads"] and all(s > 0.3 for s in result["stripped_sparsity"]), result
    # tensor parallelism: Shard(0) and Shard(1) masks, one process's masks, summaries from rank zero only
    tp = result["tensor_parallel"]
    assert tp["placements"] == {"net.0.weight": "(Shard(dim=0),)", "net.2.weight": "(Shard(dim=1),)"}, tp
    assert tp["equal"] and all(v == 0.75 for v in tp["sparsity"].values()), tp
    assert tp["event_files"] == 1 and "model_pruning_summaries/net.2.weight/mask/sparsity" in tp["logged"], tp
    assert "model_pruning_summaries/net.2.weight/kept_weights_rank0_shard" in tp["logged"], tp  # no gather

"""The fused CPU kernels give the eager path's thresholds, masks and zeroed weights, bit for bit."""

from __future__ import annotations

import copy
import ctypes
import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_prune import Pruning, PruningHParams
from lit_prune.backends.cpu import build
from lit_prune.backends.cpu import kernels as cpu_kernels
from lit_prune.backends.cpu import updates as updates_module
from lit_prune.backends.cpu.updates import block_update_, magnitude_update_
from lit_prune.engine.blocks import block_pool, block_view_shape, resolve_block_dims
from lit_prune.engine.masks import compute_mask
from lit_prune.engine.nm import nm_mask
from lit_prune.engine.thresholds import bin_edge, histogram_target_count, topk_count

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: the kernels are not built")


def eager_update(w: torch.Tensor, previous: torch.Tensor, sparsity: float, nbins: int, decay: float, method: str):
    threshold, mask, _ = compute_mask(
        w.abs(), previous, sparsity, method=method, nbins=nbins, threshold_decay=decay, max_score=w.abs().max()
    )
    return threshold, mask, w * mask


def fused_update(w: torch.Tensor, previous: torch.Tensor, sparsity: float, nbins: int, decay: float, method: str):
    w = w.clone()
    mask = torch.ones_like(w, dtype=torch.bool)
    (threshold,), (kept,) = magnitude_update_(
        [w], [stored := previous.clone()], [sparsity], [mask], method=method, nbins=nbins, threshold_decay=decay
    )
    assert torch.equal(stored, threshold)  # written in place too
    assert kept == int(mask.sum())
    return threshold, mask, w


def assert_same(w, previous, sparsity, nbins=256, decay=0.0, method="histogram"):
    t_ref, m_ref, w_ref = eager_update(w, previous, sparsity, nbins, decay, method)
    t, m, w_out = fused_update(w, previous, sparsity, nbins, decay, method)
    assert torch.equal(t, t_ref), (t, t_ref)
    assert torch.equal(m, m_ref)
    assert torch.equal(w_out, w_ref)


@needs_kernels
@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(1, 70_000),
    kind=st.sampled_from(["normal", "uniform", "half_zero", "ties", "constant"]),
    sparsity=st.floats(0.0, 0.999),
    nbins=st.sampled_from([1, 2, 7, 256, 1000]),
    decay=st.sampled_from([0.0, 0.5, 0.9]),
    method=st.sampled_from(["histogram", "exact"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_update_equals_eager(n, kind, sparsity, nbins, decay, method, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    if kind == "uniform":
        w = torch.rand(n, generator=g) * 2 - 1
    elif kind == "half_zero":  # a later update: pruned weights are zero already
        w[torch.rand(n, generator=g) < 0.5] = 0.0
    elif kind == "ties":
        w = (w * 4).round() / 4
    elif kind == "constant":
        w = torch.full((n,), -0.75)
    previous = torch.rand((), generator=g) * 0.1
    assert_same(w, previous, sparsity, nbins, decay, method)


@needs_kernels
@pytest.mark.parametrize("nbins", [256, 255, 3])
def test_scores_on_and_beside_everybin_edge(nbins):
    m = 1.7
    edges = torch.tensor([bin_edge(m, i, nbins) for i in range(1, nbins)], dtype=torch.float32)
    below = torch.nextafter(edges, torch.zeros_like(edges))
    w = torch.cat([edges, below, -edges, torch.tensor([m])]).repeat(40)  # large enough to be sampled
    for s in [0.1, 0.33, 0.5, 0.77, 0.95]:
        assert_same(w, torch.tensor(0.0), s, nbins)


def passes(w: torch.Tensor, sparsity: float, method: str = "histogram") -> list[int]:
    """The counting passes the fused update of ``w`` needs (0: the band of its first pass decided it)."""
    count = histogram_target_count if method == "histogram" else topk_count
    mask = torch.ones(w.shape, dtype=torch.bool)
    found = cpu_kernels.magnitude_update(
        [w.clone()],
        [mask],
        [count(w.numel(), sparsity)],
        [torch.zeros(())],
        exact=method == "exact",
        nbins=256,
        decay=None,
    )
    return found.passes


def band_runs(n: int) -> int:
    """How many runs the band's sample of a weight of ``n`` takes (as cpu_kernels.c: 32 (n / 2 Mi)^(2/3), 4 to 32)."""
    runs = 32
    while runs > 4 and runs**3 > 32768.0 * (n / (1 << 21)) ** 2:
        runs -= 1
    return runs


def sample_runs(n: int, run: int, runs: int) -> torch.Tensor:
    """Where a sample of ``runs`` runs of ``run`` elements spread over ``n`` reads (as cpu_kernels.c)."""
    hit = torch.zeros(n, dtype=torch.bool)
    for start in range(0, n, max(run, n // runs)):
        hit[start : start + run] = True
    return hit


@needs_kernels
@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_the_first_pass_decides_typical_weights(method):
    g = torch.Generator().manual_seed(5)
    for w in [torch.randn(300_000, generator=g), torch.rand(70_000, generator=g), torch.randn(64, 576, generator=g)]:
        for s in [0.1, 0.5, 0.9, 0.97]:
            assert passes(w, s, method) == [0], (w.shape, s)


@needs_kernels
@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_a_misleading_sample_falls_back_to_counting_and_stays_exact(method):
    # Both samples (the band's: runs of 256; the counting search's: runs of 64) read tiny values.
    n = 1 << 18
    w = torch.linspace(0.5, 1.0, n)
    runs = sample_runs(n, 256, band_runs(n)) | sample_runs(n, 64, 128)
    w[runs] = torch.linspace(1e-4, 1e-3, int(runs.sum()))
    for s in [0.02, 0.3, 0.6, 0.97]:
        assert passes(w, s, method)[0] >= 1
        assert_same(w, torch.tensor(0.0), s, method=method)


@needs_kernels
@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_a_band_fuller_than_its_sample_said_falls_back_and_stays_exact(method):
    # The band's sample is spread out, everything else sits on one value inside its band.
    n = 1 << 18
    w = torch.full((n,), 0.5)
    runs = sample_runs(n, 256, band_runs(n))
    w[runs] = torch.linspace(0.0, 1.0, int(runs.sum()))
    assert passes(w, 0.5, method)[0] >= 1
    for s in [0.3, 0.5, 0.7]:
        assert_same(w, torch.tensor(0.0), s, method=method)


@needs_kernels
@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_all_zero_weight_and_extreme_sparsities(method):
    assert_same(torch.zeros(1000), torch.tensor(0.0), 0.5, method=method)
    assert_same(torch.randn(1000), torch.tensor(0.0), 0.0, method=method)
    assert_same(torch.randn(1000), torch.tensor(0.3), 0.0, decay=0.5, method=method)
    assert_same(torch.randn(1000), torch.tensor(0.0), 0.9999, method=method)  # k = 0: everything pruned
    assert_same(torch.randn(1000), torch.tensor(0.0), 0.0004, method=method)  # k = n


@needs_kernels
def test_exact_rule_with_many_ties_at_the_threshold():
    w = torch.tensor([0.5] * 5000 + [1.0] * 5000 + [-0.5] * 3000)
    for s in [0.1, 0.38, 0.5, 0.9]:
        assert_same(w, torch.tensor(0.0), s, method="exact")


@needs_kernels
def test_only_blocks_with_a_newly_pruned_weight_are_rewritten():
    # Pruned weights stored as -0.0 (as `mul_` by a mask leaves them) keep their sign bit unless
    # their block of 64 (four cache lines) holds a non-zero weight to prune now.
    w = torch.randn(192).abs() + 1.0
    w[:64] = -0.0  # block 0: already pruned and zeroed
    w[64:127] = -0.0
    w[127] = 0.01  # block 1: one newly pruned weight
    mask = torch.ones(192, dtype=torch.bool)
    # The exact rule keeps the 64 largest: the threshold is the smallest weight above 1.
    _, kept = magnitude_update_([w], [torch.tensor(0.0)], [2 / 3], [mask], method="exact")
    assert kept == [64]
    assert torch.signbit(w[:64]).all()  # untouched
    assert not torch.signbit(w[64:128]).any() and (w[64:128] == 0).all()  # rewritten as +0.0
    assert mask[128:].all() and not mask[:128].any()


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3), torch.nn.Flatten(), torch.nn.Linear(64 * 30 * 30, 32), torch.nn.Linear(32, 7)
    )


#: The schedule both training runs share: updates at steps 10, 20, 30 and 40 (TF's rule).
SCHEDULE = {"begin_pruning_step": 0, "end_pruning_step": 40, "pruning_frequency": 10, "sparsity_function_end_step": 30}


def train_and_count(use_kernels: bool, monkeypatch, spec: PruningHParams, owner, kernel: str) -> Pruning:
    """41 SGD steps of :func:`model` pruned by ``spec``, kernels on or off; ``owner.kernel`` runs 4 times or 0."""
    monkeypatch.setattr(cpu_kernels, "available", lambda: use_kernels and cpu_kernels._library() is not None)
    calls = []
    real = getattr(owner, kernel)
    monkeypatch.setattr(owner, kernel, lambda *a, **k: calls.append(1) or real(*a, **k))
    net = model()
    pruning = Pruning(net, spec)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(41):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 7, (4,), generator=g)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        if not pruning.conditional_mask_update(step):  # an update applies the current masks itself
            pruning.apply_mask()
    monkeypatch.setattr(owner, kernel, real)
    assert len(calls) == (4 if use_kernels else 0)
    return pruning


def assert_same_pruning(fast: Pruning, slow: Pruning) -> None:
    for name in fast.weight_names:
        assert torch.equal(fast.get_masks()[name], slow.get_masks()[name]), name
        assert torch.equal(fast.get_thresholds()[name], slow.get_thresholds()[name]), name
        assert torch.equal(fast.get_weights()[name], slow.get_weights()[name]), name


def train_and_prune(use_kernels: bool, monkeypatch, method: str = "histogram", blocks: bool = False) -> Pruning:
    spec = PruningHParams(
        **SCHEDULE,
        target_sparsity=0.9,
        threshold_decay=0.3,
        weight_sparsity_map=["2\\.weight:0.5"],
        threshold_method=method,
        block_dims_map=["^[02]\\.weight:2x3"] if blocks else [],
        block_pooling_function="MAX" if method == "exact" else "AVG",
    )
    if blocks:
        return train_and_count(use_kernels, monkeypatch, spec, cpu_kernels.BlockBatch, "expand")
    return train_and_count(use_kernels, monkeypatch, spec, cpu_kernels.MagnitudeBatch, "update")


@needs_kernels
@pytest.mark.parametrize("method", ["histogram", "exact"])
@pytest.mark.parametrize("blocks", [False, True], ids=["elementwise", "blocks"])
def test_pruning_with_and_without_kernels_ends_the_same(monkeypatch, method, blocks):
    fast = train_and_prune(True, monkeypatch, method, blocks)
    slow = train_and_prune(False, monkeypatch, method, blocks)
    assert_same_pruning(fast, slow)
    sparsity = fast.get_weight_sparsity()
    assert float(sparsity["0.weight"]) == pytest.approx(0.9, abs=0.02)
    assert float(sparsity["2.weight"]) == pytest.approx(0.5, abs=0.05 if blocks else 0.02)


@needs_kernels
def test_histogram_threshold_matches_the_definition():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(100_000, generator=g)
    a = w.abs()
    m = float(a.max())
    for s in [0.1, 0.5, 0.9]:
        k = histogram_target_count(w.numel(), s)
        bins = torch.clamp(torch.floor(256.0 * (a / m)), max=255).long()
        expected = int((torch.bincount(bins, minlength=256).cumsum(0) < k).sum())
        mask = torch.ones(w.shape, dtype=torch.bool)
        (threshold,), _ = magnitude_update_([w.clone()], [torch.tensor(0.0)], [s], [mask])
        assert torch.equal(threshold, torch.tensor(float(expected)) / 256 * torch.tensor(m))


@needs_kernels
def test_only_contiguous_float32_cpu_tensors_are_eligible():
    assert cpu_kernels.eligible(torch.ones(4, 4))
    assert not cpu_kernels.eligible(torch.ones(4, 4).t())
    assert not cpu_kernels.eligible(torch.ones(4, 4, dtype=torch.bfloat16))
    assert not cpu_kernels.eligible(torch.ones(4, 4, dtype=torch.float64))


@needs_kernels
def test_non_finite_weights_on_both_paths_are_all_named_and_nothing_changes():
    # 0.weight takes the fused kernels, 1.weight (block-pruned) the eager path.
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    pruning = Pruning(model, PruningHParams(block_dims_map=["^1\\.weight:4x4"]), sparsity=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight[3, 3] = float("nan")
        model[1].weight[0, 1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"\['0.weight', '1.weight'\] at step 5"):
        pruning.mask_update(5)
    with torch.no_grad():
        model[0].weight[3, 3] = before["0.weight"][3, 3]
        model[1].weight[0, 1] = before["1.weight"][0, 1]
    with pytest.raises(FloatingPointError, match=r"\['2.weight'\] at step 6"):
        with torch.no_grad():
            model[2].weight[7, 7] = float("-inf")
        pruning.mask_update(6)
    assert all(m.all() for m in pruning.get_masks().values())
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[1].weight, before["1.weight"])
    assert pruning.last_update_step == 0


@needs_kernels
@settings(max_examples=80, deadline=None)
@given(
    shape=st.sampled_from([(7, 5), (64, 27), (33, 100), (16, 3, 3, 3), (1, 40, 3), (9, 2, 1, 5)]),
    block=st.tuples(st.sampled_from([1, 2, 3, 4, -1]), st.sampled_from([1, 2, 4, 5, -1])),
    pooling=st.sampled_from(["AVG", "MAX"]),
    kind=st.sampled_from(["normal", "ties", "half_zero", "zero"]),
    sparsity=st.floats(0.0, 0.999),
    nbins=st.sampled_from([2, 7, 256]),
    decay=st.sampled_from([0.0, 0.5]),
    method=st.sampled_from(["histogram", "exact"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_block_update_equals_eager(shape, block, pooling, kind, sparsity, nbins, decay, method, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if kind == "ties":
        w = (w * 2).round() / 2
    elif kind == "half_zero":
        w[torch.rand(shape, generator=g) < 0.5] = 0.0
    elif kind == "zero":
        w = torch.zeros(shape)
    view = block_view_shape(w.shape)
    dims = resolve_block_dims(block, view)
    previous = torch.rand((), generator=g) * 0.1
    options = {"method": method, "nbins": nbins, "threshold_decay": decay}
    t_ref, m_ref, _ = compute_mask(w.abs(), previous, sparsity, block_dims=block, pooling=pooling, **options)
    fused, mask = w.clone().reshape(view), torch.ones(view, dtype=torch.bool)
    pooled = cpu_kernels.block_pool([fused], [dims], pooling)
    stored = previous.clone()
    (t,), (kept,) = block_update_([fused], pooled, [stored], [sparsity], [mask], block_dims=[dims], **options)
    assert torch.equal(t, t_ref) and torch.equal(stored, t_ref)
    assert torch.equal(mask.reshape(shape), m_ref) and kept == int(m_ref.sum())
    assert torch.equal(fused.reshape(shape), w * m_ref)


@needs_kernels
def test_block_pooling_is_the_correctly_rounded_mean_and_the_exact_max():
    w = torch.tensor([[1.0, 2.0**-30, 3.0], [2.0**-30, 1.0, -5.0]])
    avg = cpu_kernels.block_pool([w], [(2, 2)], "AVG")[0]
    assert avg.tolist() == [[torch.tensor((2.0 + 2.0**-29) / 4, dtype=torch.float32).item(), 4.0]]
    assert torch.equal(avg, block_pool(w.abs(), (2, 2), "AVG"))
    assert cpu_kernels.block_pool([w], [(2, 2)], "MAX")[0].tolist() == [[1.0, 5.0]]
    with pytest.raises(ValueError, match="pooling must be 'AVG' or 'MAX'"):
        cpu_kernels.block_pool([w], [(2, 2)], "SUM")
    with pytest.raises(ValueError, match="resolve -1 first"):
        cpu_kernels.block_pool([w], [(-1, 2)], "AVG")


@needs_kernels
def test_updates_from_several_python_threads_at_once_match_one_at_a_time():
    # ctypes releases the GIL: each calling thread runs its own OpenMP team and keeps its own scratch.
    import threading

    g = torch.Generator().manual_seed(11)
    weights = [torch.randn(200_000 + 1000 * i, generator=g) for i in range(6)]
    expected = [eager_update(w, torch.tensor(0.0), 0.1 * (i + 2), 256, 0.0, "histogram") for i, w in enumerate(weights)]
    results: dict[int, tuple] = {}

    def run(i: int) -> None:
        for _ in range(5):
            results[i] = fused_update(weights[i], torch.tensor(0.0), 0.1 * (i + 2), 256, 0.0, "histogram")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(weights))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (t_ref, m_ref, w_ref) in enumerate(expected):
        t, m, w = results[i]
        assert torch.equal(t, t_ref) and torch.equal(m, m_ref) and torch.equal(w, w_ref), i


@needs_kernels
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 is an x86 option")
@pytest.mark.parametrize("without", ["-mno-avx2", "-mno-avx512f"], ids=["plain-C", "AVX2"])
def test_the_other_code_paths_give_the_same_results(monkeypatch, tmp_path, without):
    # The library is built for the CPU it runs on: a CPU without AVX2 (or another architecture) runs
    # the plain C loops, one without AVX-512 the AVX2 loops.  Build those here and check them (on a
    # CPU without AVX-512 the second build is the usual one).
    compiler = build.compiler_command()
    plain = cpu_kernels._declare(ctypes.CDLL(str(build.build(compiler, [*build.FLAGS, without], tmp_path))))
    monkeypatch.setattr(cpu_kernels, "_library", lambda: plain)
    g = torch.Generator().manual_seed(9)
    for method in ("histogram", "exact"):
        for w in [torch.randn(100_003, generator=g), (torch.randn(70_001, generator=g) * 3).round() / 3]:
            for s in [0.0, 0.3, 0.9]:
                assert_same(w, torch.tensor(0.05), s, decay=0.5, method=method)
    w = torch.randn(33, 100, generator=g)
    for pooling in ("AVG", "MAX"):
        t_ref, m_ref, _ = compute_mask(w.abs(), torch.tensor(0.0), 0.6, block_dims=(4, 3), pooling=pooling)
        fused, mask = w.clone(), torch.ones(w.shape, dtype=torch.bool)
        pooled = cpu_kernels.block_pool([fused], [(4, 3)], pooling)
        (t,), _ = block_update_([fused], pooled, [torch.tensor(0.0)], [0.6], [mask], block_dims=[(4, 3)])
        assert torch.equal(t, t_ref) and torch.equal(mask, m_ref) and torch.equal(fused, w * m_ref)
    ties = (torch.randn(12, 64, generator=g) * 2).round() / 2
    current = torch.rand(ties.shape, generator=g) > 0.2
    for pruned in (1, 2):  # 2:4 by the portable loop
        expected = nm_mask((ties * current).abs(), 4, pruned)
        fused, mask, t = ties.clone(), current.clone(), torch.zeros(())
        cpu_kernels.nm_update([fused], [mask], [(2, 4)], [pruned], [t], apply=[True])
        assert torch.equal(mask, expected) and torch.equal(fused, ties * current * expected)
    check_current_masks_applied([1, 63, 64, 1001, 70_001], 3)  # the mask bits by the portable loops
    masked = torch.randn(1001, generator=g)
    keep = torch.rand(1001, generator=g) > 0.5
    cpu_kernels.MaskBatch([masked], [keep]).apply()  # apply_mask by the portable loop
    assert torch.equal(masked != 0, keep)


@needs_kernels
def test_the_scratch_can_be_released_and_the_next_update_allocates_it_again():
    w = torch.randn(100_000)
    assert_same(w, torch.tensor(0.0), 0.5)
    cpu_kernels.release_scratch()
    cpu_kernels.release_scratch()  # twice is harmless
    assert_same(w, torch.tensor(0.0), 0.7)


@needs_kernels
def test_the_kernel_entry_point_refuses_mismatched_arguments():
    w, mask = torch.randn(100), torch.ones(100, dtype=torch.bool)
    call = {"exact": False, "nbins": 256, "decay": None}
    zero = [torch.zeros(())]
    with pytest.raises(ValueError, match=r"`targets` must have one entry per weight \(1\), got 2"):
        cpu_kernels.magnitude_update([w], [mask], [50, 50], zero, **call)
    with pytest.raises(ValueError, match=r"`apply` must have one entry per weight \(1\), got 0"):
        cpu_kernels.magnitude_update([w], [mask], [50], zero, apply=[], **call)
    with pytest.raises(ValueError, match=r"`targets\[0\]` must be a count in \[0, 100\], got 101"):
        cpu_kernels.magnitude_update([w], [mask], [101], zero, **call)
    with pytest.raises(ValueError, match="mask 0 must be a contiguous CPU torch.bool tensor of 100 elements"):
        cpu_kernels.magnitude_update([w], [mask[:50]], [50], zero, **call)
    with pytest.raises(ValueError, match="weight 0 must be a contiguous float32 CPU tensor"):
        cpu_kernels.magnitude_update([w.double()], [mask], [50], zero, **call)
    with pytest.raises(ValueError, match=r"`thresholds\[0\]` must be one float32 element on the CPU"):
        cpu_kernels.magnitude_update([w], [mask], [50], [torch.zeros((), dtype=torch.float64)], **call)
    with pytest.raises(ValueError, match=r"`thresholds` must have one entry per weight \(1\), got 2"):
        cpu_kernels.magnitude_update([w], [mask], [50], zero * 2, **call)


@needs_kernels
def test_thresholds_are_written_in_place_only_when_the_update_succeeds():
    w, mask = torch.linspace(-1, 1, 4096), torch.ones(4096, dtype=torch.bool)
    wide = torch.tensor(0.25, dtype=torch.float64)  # not float32: updated through a float32 copy
    (found,), _ = magnitude_update_([w.clone()], [wide], [0.5], [mask.clone()], threshold_decay=0.5)
    assert wide.dtype == torch.float64 and wide.item() == found.item()
    stored, bad = torch.tensor(0.25), w.clone()
    bad[100] = float("nan")
    with pytest.raises(cpu_kernels.NonFiniteWeights):
        magnitude_update_([bad], [stored], [0.5], [mask.clone()], threshold_decay=0.5)
    assert stored.item() == 0.25


@needs_kernels
@pytest.mark.parametrize("pooling", ["AVG", "MAX"])
def test_block_kernels_apply_the_current_mask_as_apply_mask_would(pooling):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(37, 29, generator=g)
    mask = torch.rand(37, 29, generator=g) > 0.4
    w[3, 4], w[5, 6] = float("inf"), float("nan")
    mask[3, 4] = mask[5, 6] = False  # Inf * 0 and NaN * 0 are NaN: pruned non-finite weights still show
    masked = w * mask
    pooled = cpu_kernels.block_pool([w], [(4, 3)], pooling, masks=[mask])[0]
    expected = block_pool(masked.abs(), (4, 3), pooling)
    assert torch.equal(pooled.isnan(), expected.isnan())
    assert torch.equal(pooled.nan_to_num(), expected.nan_to_num())
    finite = torch.randn(37, 29, generator=g)
    masked = finite * mask
    pooled = cpu_kernels.block_pool([finite.clone()], [(4, 3)], pooling, masks=[mask])[0]
    assert torch.equal(pooled, block_pool(masked.abs(), (4, 3), pooling))
    block_mask = pooled > pooled.median()
    new_mask, zeroed = mask.clone(), finite.clone()
    (kept,) = cpu_kernels.expand_blocks_and_zero([zeroed], [(4, 3)], [block_mask], [new_mask], apply=[True])
    expanded = block_mask.repeat_interleave(4, 0).repeat_interleave(3, 1)[:37, :29]
    assert torch.equal(new_mask, expanded) and kept == int(expanded.sum())
    assert torch.equal(zeroed, finite * (expanded & mask))  # pruned by either mask


@needs_kernels
def test_block_pool_names_the_weights_whose_pooled_scores_are_not_finite():
    ok, bad = torch.randn(8, 8), torch.randn(8, 8)
    bad[5, 1] = float("inf")
    pooled = cpu_kernels.block_pool([ok, bad], [(4, 4), (4, 4)], "AVG")  # propagates, no error by default
    assert pooled[1][1, 0] == float("inf") and pooled[0].isfinite().all()
    with pytest.raises(cpu_kernels.NonFiniteWeights) as error:
        cpu_kernels.block_pool([ok, bad], [(4, 4), (4, 4)], "MAX", check_finite=True)
    assert error.value.indices == [1]


@needs_kernels
@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 9),
    groups=st.integers(1, 7),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 16), (5, 64)]),
    fraction=st.floats(0.0, 1.0),
    levels=st.sampled_from([3, 50, 0]),  # few levels: many ties; 0: continuous
    applied=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nm_kernel_equals_the_eager_nm_mask(rows, groups, nm, fraction, levels, applied, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * m, generator=g)
    if levels:
        w = (w * levels).round() / levels  # ties, and zeros
    current = torch.rand(w.shape, generator=g) > 0.3 if applied else torch.ones(w.shape, dtype=torch.bool)
    pruned = round(fraction * (m - n))
    scores = (w * current).abs()  # what apply_mask leaves, as the eager update ranks it
    expected = nm_mask(scores, m, pruned)
    expected_threshold = torch.where(expected, 0.0, scores).amax()
    fused, mask, threshold = w.clone(), current.clone(), torch.full((), 7.0)
    (kept,) = cpu_kernels.nm_update([fused], [mask], [nm], [pruned], [threshold], apply=[applied])
    assert torch.equal(mask, expected) and kept == int(expected.sum())
    assert torch.equal(threshold, expected_threshold)
    assert torch.equal(fused, w * current * expected)


@needs_kernels
def test_nm_kernel_refuses_bad_arguments_and_non_finite_weights():
    w, mask, t = torch.randn(2, 8), torch.ones(2, 8, dtype=torch.bool), torch.zeros(())
    with pytest.raises(ValueError, match=r"`nm\[0\]` must be \(N, M\)"):
        cpu_kernels.nm_update([w], [mask], [(2, 3)], [1], [t])  # 3 does not divide 16
    with pytest.raises(ValueError, match=r"`pruned\[0\]` must be in \[0, 2\], got 3"):
        cpu_kernels.nm_update([w], [mask], [(2, 4)], [3], [t])
    w[1, 5] = float("nan")
    before = w.clone()
    with pytest.raises(cpu_kernels.NonFiniteWeights):
        cpu_kernels.nm_update([w], [mask], [(2, 4)], [2], [t])
    assert mask.all() and torch.equal(w.isnan(), before.isnan()) and t == 0


@needs_kernels
def test_nm_pruning_with_and_without_kernels_ends_the_same(monkeypatch):
    spec = PruningHParams(**SCHEDULE, target_sparsity=0.5, nm_sparsity_map=["[23]\\.weight:2:4"])
    fast = train_and_count(True, monkeypatch, spec, cpu_kernels, "nm_update")
    slow = train_and_count(False, monkeypatch, spec, cpu_kernels, "nm_update")
    assert_same_pruning(fast, slow)
    fast.check_nm()
    assert fast.nm_weights() == {"2.weight": (2, 4), "3.weight": (2, 4)}


def native_group(pruning: Pruning, granularity: str = "elementwise"):
    """The plan's native CPU group of ``granularity`` (``None`` if the kernels take no such weight)."""
    groups = [g for g in pruning._plan.groups if g.backend.name == "cpu" and g.granularity == granularity]
    return groups[0] if groups else None


@needs_kernels
def test_the_kernel_plan_is_reused_until_a_tensor_is_replaced():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    pruning = Pruning(net, sparsity=lambda step: 0.1 * step)
    pruning.mask_update(1)
    plan = pruning._plan
    assert plan is not None and native_group(pruning).names == ["0.weight", "1.weight"]
    pruning.mask_update(2)
    assert pruning._plan is plan  # same tensors: the checked pointers are reused
    fresh = torch.randn(64, 64)
    net[0].weight.data = fresh.clone()  # new storage for the same parameter
    masked = fresh * pruning.get_masks()["0.weight"]  # the update ranks it as its current mask leaves it
    threshold, expected, zeroed = eager_update(masked, pruning.get_thresholds()["0.weight"], 0.3, 256, 0.0, "histogram")
    pruning.mask_update(3)
    assert pruning._plan is not plan
    assert torch.equal(pruning.get_masks()["0.weight"], expected)  # the kernel ran on the new storage
    assert torch.equal(net[0].weight.detach(), zeroed) and torch.equal(pruning.get_thresholds()["0.weight"], threshold)
    pruning.load_state_dict(pruning.state_dict())  # copies in place: the plan stays
    plan = pruning._plan
    pruning.mask_update(4)
    assert pruning._plan is plan
    net.double()  # float64 weights: the torch backend, then back to float32 and the kernels
    pruning.mask_update(5)
    assert native_group(pruning) is None and pruning.get_weight_sparsity()["0.weight"] == pytest.approx(0.5, abs=2e-2)
    net.float()
    pruning.mask_update(6)
    assert native_group(pruning) is not None
    assert pruning.get_weight_sparsity()["1.weight"] == pytest.approx(0.6, abs=2e-2)
    copied = copy.deepcopy(pruning)  # the plan holds raw pointers: it is not copied (nor pickled)
    assert copied._plan is None
    copied.mask_update(7)
    assert copied._plan is not None and copied._plan.key != pruning._plan.key


@needs_kernels
def test_the_block_kernels_keep_their_batches_and_fall_back_where_thresholds_are_not_float32(monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(37, 64), torch.nn.Conv2d(4, 8, 3))
    spec = "block_height=4,block_width=2,threshold_decay=0.3"
    kept = Pruning(net, spec, sparsity=lambda step: 0.1 * step)
    fresh = Pruning(copy.deepcopy(net), spec, sparsity=lambda step: 0.1 * step)
    kept.mask_update(1)
    fresh.mask_update(1)
    blocks = native_group(kept, "block").work
    assert blocks is not None and len(blocks.batch) == 2 and blocks.scores is not None
    for step in (2, 3):
        kept.mask_update(step)
        assert native_group(kept, "block").work is blocks  # same tensors: the checked batches are reused
        fresh._plan = None  # this one checks and builds everything anew each time
        fresh.mask_update(step)
        assert_same_pruning(kept, fresh)
    # A threshold the kernel cannot write in place (float64): the pooled scores take the general update.
    calls = []
    real = updates_module.magnitude_update_
    monkeypatch.setattr(
        "lit_prune.backends.cpu.backend.magnitude_update_", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    for p in (kept, fresh):
        w = p._states["0.weight"]
        w.threshold = w.threshold.double()
        p.mask_update(4)
    assert native_group(kept, "block").work.scores is None and len(calls) == 2
    assert_same_pruning(kept, fresh)
    assert kept.get_thresholds()["0.weight"].dtype == torch.float64 and kept.get_thresholds()["0.weight"] > 0


@needs_kernels
def test_a_block_batch_checks_its_tensors_once():
    w, mask = torch.randn(6, 8), torch.ones(6, 8, dtype=torch.bool)
    pooled, blocks = torch.empty(3, 2), torch.empty(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"out 0 must be a contiguous float32 CPU tensor of shape \(3, 2\)"):
        cpu_kernels.BlockBatch([w], [(2, 4)], [mask], [torch.empty(2, 3)], [blocks])
    with pytest.raises(ValueError, match=r"block mask 0 must be a contiguous torch.bool tensor of shape \(3, 2\)"):
        cpu_kernels.BlockBatch([w], [(2, 4)], [mask], [pooled], [torch.empty(3, 2)])
    with pytest.raises(ValueError, match="mask 0 must be a contiguous CPU torch.bool tensor of 48 elements"):
        cpu_kernels.BlockBatch([w], [(2, 4)], [mask.t()], [pooled], [blocks])
    batch = cpu_kernels.BlockBatch([w], [(2, 4)], [mask], [pooled], [blocks])
    with pytest.raises(ValueError, match="pooling must be 'AVG' or 'MAX', got 'MEAN'"):
        batch.pool("MEAN")
    batch.pool("MAX")
    assert torch.equal(pooled, w.abs().view(3, 2, 2, 4).amax(dim=(1, 3)))
    w[0, 0] = float("nan")
    with pytest.raises(cpu_kernels.NonFiniteWeights, match=r"\[0\]"):
        batch.pool("AVG")


@needs_kernels
def test_a_magnitude_batch_refuses_what_the_kernel_cannot_take():
    w, mask, threshold = torch.randn(100), torch.ones(100, dtype=torch.bool), torch.zeros(())
    batch = cpu_kernels.MagnitudeBatch([w], [mask], [threshold])
    assert batch.matches([w], [mask], [threshold]) and not batch.matches([w.clone()], [mask], [threshold])
    with pytest.raises(ValueError, match=r"`targets\[0\]` must be a count in \[0, 100\], got -1"):
        batch.update([-1], exact=False, nbins=256, decay=None)
    with pytest.raises(ValueError, match=r"`thresholds` must have one entry per weight \(1\), got 0"):
        cpu_kernels.MagnitudeBatch([w], [mask], [])
    with pytest.raises(ValueError, match="mask 0 must be a contiguous CPU torch.bool tensor of 100 elements"):
        cpu_kernels.MagnitudeBatch([w], [mask.view(10, 10).t()], [threshold])


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=4),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    zeros=st.booleans(),
    data=st.data(),
)
def test_applying_masks_by_the_kernel_is_a_multiply_by_the_mask(sizes, density, seed, zeros, data):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, generator=g) for n in sizes]
    if zeros:  # some weights already zero (pruned and not moved since): those blocks are not written
        weights = [w * (torch.rand(n, generator=g) > 0.3) for w, n in zip(weights, sizes, strict=True)]
    masks = [torch.rand(n, generator=g) < density for n in sizes]
    which = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    expected = [w * m if chosen else w.clone() for w, m, chosen in zip(weights, masks, which, strict=True)]
    cpu_kernels.MaskBatch(weights, masks).apply(which)
    for w, e in zip(weights, expected, strict=True):
        assert torch.equal(w, e)  # -0.0 == +0.0: the kernel writes +0.0 where the multiply gives -0.0


@needs_kernels
def test_apply_mask_takes_the_kernel_for_float32_cpu_weights_and_the_multiply_for_others(monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8).double())
    pruning = Pruning(net, sparsity=0.5)
    pruning.mask_update(0)
    appliers = {g.backend.name: g.names for g in pruning._plan.apply_groups}
    assert appliers == {"cpu": ["0.weight"], "torch": ["1.weight"]}  # float64 is not the kernel's
    calls = []
    real = cpu_kernels.MaskBatch.apply
    monkeypatch.setattr(
        cpu_kernels.MaskBatch, "apply", lambda self, which=None: calls.append(which) or real(self, which)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # an optimizer step moves pruned weights off zero
    pruning.apply_mask()
    assert calls == [[True]]
    for name, w in pruning.get_weights().items():
        assert torch.equal(w != 0, pruning.get_masks()[name]), name


def check_current_masks_applied(sizes, seed, method="histogram"):
    """Several weights, each ranked as its current mask leaves it where ``apply`` says so: as the eager path."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, generator=g) for n in sizes]
    current = [torch.rand(n, generator=g) < 0.7 for n in sizes]
    applied = [bool(i % 3) for i in range(len(sizes))]
    expected = []
    for w, cur, a in zip(weights, current, applied, strict=True):
        ranked = w * cur if a else w
        threshold, mask, _ = eager_update(ranked, torch.tensor(0.0), 0.6, 256, 0.0, method)
        expected.append((threshold, mask, ranked * mask))
    thresholds = [torch.tensor(0.0) for _ in sizes]
    masks_out = [c.clone() for c in current]
    _, kept = magnitude_update_(
        weights, thresholds, [0.6] * len(sizes), masks_out, method=method, apply_current=applied
    )
    for (t_ref, m_ref, w_ref), t, m, w, k in zip(expected, thresholds, masks_out, weights, kept, strict=True):
        assert torch.equal(t, t_ref) and torch.equal(m, m_ref) and torch.equal(w, w_ref) and k == int(m.sum())


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 200_000), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["histogram", "exact"]),
)
def test_the_current_masks_are_applied_by_the_kernel_as_by_the_eager_path(sizes, seed, method):
    # Shares of each thread, the first pass's mask bits and the mask pass's 64 Ki tasks end anywhere.
    check_current_masks_applied(sizes, seed, method)


@needs_kernels
def test_the_kernel_plan_is_dropped_when_the_model_leaves_the_cpu(monkeypatch):
    # The plan keeps its tensors' storage alive: moved to an accelerator, the model's CPU copies must go.
    net = torch.nn.Sequential(torch.nn.Linear(64, 64))
    pruning = Pruning(net, sparsity=0.5)
    pruning.mask_update(0)
    assert native_group(pruning) is not None
    monkeypatch.setattr(Pruning, "_defer_checks", staticmethod(lambda param: True))  # as on a GPU
    pruning.apply_mask()
    assert all(g.backend.name == "torch" for g in pruning._plan.groups)
    pruning.mask_update(1)
    pruning.apply_mask()
    assert all(g.backend.name == "torch" for g in pruning._plan.groups)

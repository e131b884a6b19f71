"""Thresholds, masks and blocks against values worked out from TF's code (tf_pruning_spec.md §4, §5, §12).

H = TF r1.11-r1.13 histogram rule, T = TF r1.14+ exact top-k rule.
Run: pytest tests/test_masks.py
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_prune.engine.blocks import block_pool
from lit_prune.engine.masks import compute_mask
from lit_prune.engine.thresholds import exact_threshold, histogram_target_count, histogram_threshold

ZERO = torch.tensor(0.0)


def mask_of(values, sparsity, **kw):
    w = torch.as_tensor(values, dtype=torch.float32)
    thr, mask, _ = compute_mask(w.abs(), ZERO, sparsity, **kw)
    return thr, mask


def test_linspace_half():
    w = torch.linspace(1, 100, 100)
    thr, mask = mask_of(w, 0.5, method="histogram", nbins=256)
    assert thr.item() == 50.0 and mask.sum() == 50
    thr, mask = mask_of(w, 0.5, method="histogram", nbins=255)
    assert thr.item() == pytest.approx(49.8039, abs=1e-4) and mask.sum() == 51
    thr, mask = mask_of(w, 0.5, method="exact")
    assert thr.item() == 51.0 and mask.sum() == 50


def test_linspace_95():
    w = torch.linspace(1, 100, 100)
    thr, mask = mask_of(w, 0.95, method="exact")
    assert thr.item() == 96.0 and mask.sum() == 5
    thr, mask = mask_of(w, 0.95, method="histogram")
    assert thr.item() == 94.921875 and mask.sum() == 6


@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_ties_are_kept(method):
    _, mask = mask_of([1, 1, 1, 1, 2, 2, 2, 2, 3, 3], 0.5, method=method)
    assert mask.tolist() == [False] * 4 + [True] * 6


def test_zero_sparsity():
    _, mask = mask_of([0, 0, 1, 2, 3, 4], 0.0, method="exact")
    assert mask.all()
    _, mask = mask_of([0, 0, 1, 2, 3, 4], 0.0, method="histogram")  # TF's histogram masks exact zeros
    assert mask.tolist() == [False, False, True, True, True, True]


def test_topk_rounds_half_to_even():
    assert mask_of([1, 2, 3, 4], 0.375, method="exact")[1].tolist() == [False, False, True, True]
    assert mask_of([1, 2, 3, 4], 0.625, method="exact")[1].tolist() == [False, False, True, True]


def test_tiny_tensor_high_sparsity():
    w = torch.linspace(1, 10, 10)
    _, mask = mask_of(w, 0.96, method="exact")  # TF crashed (gather(-1)); k = 0 prunes everything
    assert mask.sum() == 0
    _, mask = mask_of(w, 0.96, method="histogram")
    assert mask.sum() == 1


@pytest.mark.parametrize("method", ["histogram", "exact"])
def test_magnitude_not_value(method):
    assert mask_of([-4, 3, -2, 1], 0.5, method=method)[1].tolist() == [True, True, False, False]


@pytest.mark.parametrize(("method", "thresholds"), [("exact", [5.1, 9.69, 13.821]), ("histogram", [5.0, 9.5, 13.55])])
def test_threshold_decay_three_updates(method, thresholds):
    w = torch.linspace(1, 100, 100)
    prev = ZERO
    for expected, kept in zip(thresholds, [95, 91, 87], strict=True):
        prev, mask, _ = compute_mask(w, prev, 0.5, method=method, threshold_decay=0.9)
        assert prev.item() == pytest.approx(expected, rel=1e-6)
        assert mask.sum() == kept


def test_histogram_threshold_by_hand():
    # 8 values, max 8, nbins 4: bins = floor(4 * v / 8) = [0,0,1,1,2,2,3,3]; s = 0.3 -> K = ceil(2.4) = 3;
    # C = [2, 4, 6, 8]; j = #{C_i < 3} = 1; thr = 1/4 * 8 = 2.0; mask = v > 2 -> 6 kept.
    v = torch.arange(1.0, 9.0)
    assert histogram_target_count(8, 0.3) == 3
    assert histogram_threshold(v, 0.3, nbins=4).item() == 2.0
    assert mask_of(v, 0.3, nbins=4)[1].sum() == 6


@settings(max_examples=300, deadline=None)
@given(numel=st.integers(1, 1 << 30), sparsity=st.floats(0.0, 0.999999))
def test_histogram_target_count_is_the_least_count_whose_float32_cdf_reaches_s(numel, sparsity):
    # K = min{c : float32(float32(c) / float32(n)) >= float32(s)}, checked against float32 numpy arithmetic.
    k = histogram_target_count(numel, sparsity)
    n, s = np.float32(numel), np.float32(sparsity)
    assert 0 <= k <= numel
    assert np.float32(np.float32(k) / n) >= s
    assert k == 0 or np.float32(np.float32(k - 1) / n) < s


def test_histogram_all_zero_keeps_everything():
    thr, mask = mask_of(torch.zeros(10), 0.5)
    assert thr.item() == 0.0 and mask.all()


# ---------------------------------------------------------------- blocks
BLOCK_AVG = [[0.1, 0.1, 0.2, 0.2], [0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.3, 0.3, 0.4, 0.4]]
BLOCK_MAX = [[0.1, 0, 0.2, 0], [0, -0.1, 0, -0.2], [0.3, 0, 0.4, 0], [0, -0.3, 0, -0.4]]
EXPECTED_4x4 = [[0] * 4, [0] * 4, [1] * 4, [1] * 4]


@pytest.mark.parametrize("method", ["histogram", "exact"])
@pytest.mark.parametrize(("values", "pooling"), [(BLOCK_AVG, "AVG"), (BLOCK_MAX, "MAX")])
def test_block_4x4(values, pooling, method):
    thr, mask = mask_of(values, 0.5, block_dims=(2, 2), pooling=pooling, method=method)
    assert mask.int().tolist() == EXPECTED_4x4
    if method == "exact":
        assert thr.item() == pytest.approx(0.3)
    _, mask = mask_of([values], 0.5, block_dims=(2, 2), pooling=pooling, method=method)  # extra leading dim 1
    assert mask.int().tolist() == [EXPECTED_4x4]
    _, mask = mask_of(torch.tensor(values).reshape(1, 1, 4, 4), 0.5, block_dims=(2, 2), pooling=pooling, method=method)
    assert mask.int().reshape(4, 4).tolist() == EXPECTED_4x4


def test_block_5x5_shape_not_divided():
    w = torch.tensor([[(5 * r + c + 1) / 10 for c in range(5)] for r in range(5)])
    # 3x3 blocks of averages; T keeps round(9 * 0.5) = 4 blocks: (1,2) edge column, row 4 (three blocks)
    _, mask = mask_of(w, 0.5, block_dims=(2, 2), method="exact")
    assert mask[:2].sum() == 0
    assert mask[2:4].int().tolist() == [[0, 0, 0, 0, 1]] * 2
    assert mask[4].all()
    _, mask = mask_of(w, 0.5, block_dims=(2, 2), method="histogram")
    assert mask[2:4].int().tolist() == [[0, 0, 1, 1, 1]] * 2
    assert mask[:2].sum() == 0 and mask[4].all()


def test_block_avg_excludes_padding():
    assert block_pool(torch.tensor([[2.0, 2], [2, 2], [3, 3]]), (2, 2)).tolist() == [[2.0], [3.0]]
    _, mask = mask_of([[2, 2], [2, 2], [3, 3]], 0.5, block_dims=(2, 2), method="exact")
    assert mask.int().tolist() == [[0, 0], [0, 0], [1, 1]]


def test_block_max_aligned_at_zero():
    # TF's SAME padding pooled rows {0,1,2} and {3,4} and pruned the large row 3; blocks start at row 0 here.
    w = torch.tensor([[0.1, 0.1], [0.1, 0.1], [0.1, 0.1], [9.0, 9.0], [0.1, 0.1]])
    _, mask = mask_of(w, 0.5, block_dims=(4, 1), pooling="MAX", method="exact")
    assert mask.int().tolist() == [[1, 1]] * 4 + [[0, 0]]


def test_block_minus_one_is_resolved_per_weight():
    # TF resolved -1 once, for the first weight (4x2), then pruned a 6x2 weight with 4x1 blocks.
    _, mask = mask_of([[1, 2], [3, 4], [5, 6], [7, 8]], 0.5, block_dims=(-1, 1), method="exact")
    assert mask.int().tolist() == [[0, 1]] * 4
    _, mask = mask_of(torch.arange(1.0, 13.0).reshape(6, 2), 0.5, block_dims=(-1, 1), method="exact")
    assert mask.int().tolist() == [[0, 1]] * 6


def test_block_dims_gr_example():
    _, m1 = mask_of([[-0.1, 0.1], [-0.2, 0.2]], 0.5, block_dims=(1, 1), method="exact")
    assert m1.int().tolist() == [[0, 0], [1, 1]]
    _, m2 = mask_of([[0.1, 0.1, 0.3, 0.3], [0.2, 0.2, 0.4, 0.4]], 0.5, block_dims=(1, 2), method="exact")
    assert m2.int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_block_conv_kernel_uses_out_by_rest_view():
    w = torch.zeros(4, 2, 3, 3)
    w[2:] = 1.0  # output channels 2 and 3 are large
    _, mask = mask_of(w, 0.5, block_dims=(1, -1), method="exact")  # whole-filter blocks
    assert mask[:2].sum() == 0 and mask[2:].all()


def test_one_dim_weights_fall_back_to_elementwise():
    _, mask = mask_of([[1.0], [2.0], [3.0], [4.0]], 0.5, block_dims=(2, 2), method="exact")
    assert mask.int().flatten().tolist() == [0, 0, 1, 1]


# ---------------------------------------------------------------- properties
def _tf_histogram_reference(a: np.ndarray, s: float, nbins: int) -> float:
    """TF r1.13's _update_mask threshold, written with numpy float32 op by op."""
    a = a.astype(np.float32)
    m = a.max()
    idx = np.clip(np.floor(np.float32(nbins) * (a / m)), 0, nbins - 1).astype(np.int64)
    hist = np.bincount(idx, minlength=nbins).astype(np.float32)
    cdf = np.cumsum(hist, dtype=np.float32)
    norm = cdf / cdf.max()
    j = np.float32((norm < np.float32(s)).sum())
    return float(np.float32(j / np.float32(nbins)) * m)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 1e4, allow_nan=False, width=32), min_size=1, max_size=300),
    sparsity=st.floats(0.0, 0.999),
    nbins=st.sampled_from([1, 7, 100, 255, 256, 1000]),
)
def test_histogram_matches_tf_reference(values, sparsity, nbins):
    a = np.asarray(values, dtype=np.float32)
    if a.max() == 0:
        return
    ours = histogram_threshold(torch.from_numpy(a), sparsity, nbins)
    assert ours.item() == _tf_histogram_reference(a, sparsity, nbins)
    assert histogram_threshold(torch.from_numpy(a), sparsity, nbins, sort_count=True).item() == ours.item()


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=200),
    sparsity=st.floats(0.0, 0.999),
)
def test_exact_keeps_round_n_times_density(values, sparsity):
    w = torch.tensor(values, dtype=torch.float32)
    _, mask = mask_of(w, sparsity, method="exact")
    k = round(np.float32(np.float32(len(values)) * np.float32(1 - np.float32(sparsity))))
    a = w.abs()
    if a.max() == 0:  # nothing to rank: an all-zero weight keeps its mask
        assert mask.all()
    elif k > 0:
        assert mask.sum() >= k  # ties at the threshold are kept
        kth = a.sort(descending=True).values[k - 1]
        assert torch.equal(mask, a >= kth)
    else:
        assert mask.sum() == 0
    assert exact_threshold(a, sparsity).dtype == torch.float32


def _large_cases():
    g = torch.Generator().manual_seed(0)
    yield "normal", torch.randn(200_000, generator=g).abs()
    yield "ties", torch.randint(0, 7, (150_000,), generator=g).float()
    yield "on_edges", (torch.randint(0, 257, (100_000,), generator=g).float() / 256) * 3.7
    yield "heavy_tail", torch.randn(120_000, generator=g).pow(8)
    yield "mostly_zero", torch.cat([torch.zeros(90_000), torch.rand(30_000, generator=g)])
    yield "one_spike", torch.cat([torch.full((99_999,), 1e-3), torch.tensor([1e6])])


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.8, 0.95, 0.999])
@pytest.mark.parametrize(("name", "scores"), list(_large_cases()), ids=[c[0] for c in _large_cases()])
def test_large_tensor_search_path_is_tf_exact(name, scores, sparsity):
    """Tensors above 64 k elements take the sampled search on CPU; it must give TF's threshold bit for bit."""
    ours = histogram_threshold(scores, sparsity, 256)
    assert ours.item() == _tf_histogram_reference(scores.numpy(), sparsity, 256)
    assert histogram_threshold(scores, sparsity, 256, sort_count=True).item() == ours.item()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize(("name", "scores"), list(_large_cases()), ids=[c[0] for c in _large_cases()])
def test_large_tensor_exact_search_matches_kthvalue(name, scores, sparsity):
    k = int(np.round(np.float32(np.float32(scores.numel()) * np.float32(1 - np.float32(sparsity)))))
    expected = torch.kthvalue(scores, scores.numel() - k + 1).values if k else None
    ours = exact_threshold(scores, sparsity)
    if expected is not None:
        assert ours.item() == expected.item()

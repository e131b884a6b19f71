"""GPU benchmarks (issue 9): mask update vs one read, step overhead in bf16, 2:4 inference speed-up.

    python bench/gpu.py                 # on a CUDA machine; prints three markdown tables
    python bench/gpu.py --quick         # smaller stack, fewer repeats
    python bench/gpu.py --device cpu --width 64 --quick   # smoke run of the code paths (no GPU figures)

1. **Mask update** over a GPT-like Linear stack (12 blocks of d=1024: qkv, out, up, down; about
   151 M weights in 48 tensors): one read of the weights (``torch._foreach_norm``), lit_prune's
   full update for each mask kind (TF histogram, exact, 4x4 blocks, 2:4), and
   ``torch.nn.utils.prune.global_unstructured`` (first call on a fresh model, then a later call),
   all in one run.  Host synchronisations per update are counted with
   ``torch.cuda.set_sync_debug_mode``.
2. **Training-step overhead** of keeping masks applied on a transformer-MLP stack in bf16
   autocast with fused AdamW: no pruning vs lit_prune (in-place after the step) vs
   ``torch.nn.utils.prune`` (forward pre-hook reparametrisation).
3. **2:4 inference**: ``F.linear`` dense fp16 vs the same weight as
   ``to_sparse_semi_structured`` at several GEMM sizes (cuSPARSELt/CUTLASS; needs compute
   capability 8.0+).

Timing: CUDA events around each call after a warm-up, minimum of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

from lit_prune import Pruning, is_nm_sparse
from lit_prune.engine.nm import nm_mask


def stack(d: int, blocks: int, device: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(d, 3 * d), nn.Linear(3 * d, d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)]
    return nn.Sequential(*layers).to(device)


def timed_ms(fn, repeats: int, device: str) -> float:
    """Minimum over ``repeats`` runs, in ms: CUDA events on a GPU, ``perf_counter`` elsewhere."""
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
    return min(times)


def count_syncs(fn, device: str) -> int:
    """Host synchronisations ``fn`` makes on CUDA (-1 elsewhere: not measurable)."""
    if device != "cuda":
        fn()
        return -1
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def mask_update_table(d: int, blocks: int, repeats: int, device: str) -> None:
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = stack(d, blocks, device)
    weights = [m.weight for m in model]
    n = sum(w.numel() for w in weights)
    read = timed_ms(lambda: torch._foreach_norm(weights), repeats * 3, device)
    rows = [("one read (`_foreach_norm`)", read, 0 if device == "cuda" else -1)]
    kinds = {
        "lit_prune histogram (TF r1.11-1.13)": "threshold_method=histogram",
        "lit_prune exact (TF r1.14+)": "threshold_method=exact",
        "lit_prune 4x4 blocks, AVG": "block_height=4,block_width=4",
        "lit_prune 2:4 (N:M)": "nm_sparsity=2:4",
        "lit_prune histogram, use_tpu (no reads)": "use_tpu=true",
    }
    state = copy.deepcopy(model.state_dict())
    for label, spec in kinds.items():
        model.load_state_dict(state)
        pruning = Pruning(model, spec, sparsity=0.5)
        pruning.mask_update(1)  # warm-up (allocations, kernels)
        steps = iter(range(2, 10**6))
        ms = timed_ms(lambda p=pruning, t=steps: p.mask_update(next(t)), repeats, device)
        syncs = count_syncs(lambda p=pruning, t=steps: p.mask_update(next(t)), device)
        if "2:4" in label:
            assert all(is_nm_sparse(w, 2, 4) for w in weights)
        rows.append((label, ms, syncs))
    model.load_state_dict(state)
    params = [(m, "weight") for m in model]
    first = timed_ms(lambda: prune.global_unstructured(params, prune.L1Unstructured, amount=0.5), 1, device)
    later = timed_ms(lambda: prune.global_unstructured(params, prune.L1Unstructured, amount=0.5), repeats, device)
    rows += [("`global_unstructured` 0.5, first call", first, -1), ("`global_unstructured` 0.5, later", later, -1)]
    print(f"\n### Mask update, {n / 1e6:.0f} M weights in {len(weights)} Linear tensors ({device_name(device)})")
    print("\n| what | ms | x one read | host syncs |")
    print("| --- | ---: | ---: | ---: |")
    for label, ms, syncs in rows:
        print(f"| {label} | {ms:.2f} | {ms / read:.1f} | {'n/a' if syncs < 0 else syncs} |")


def step_overhead_table(d: int, blocks: int, repeats: int, device: str) -> None:
    from torch.nn.utils import prune

    torch.manual_seed(0)
    x = torch.randn(8 * 512, d, device=device)

    def make():
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)]
        return nn.Sequential(*layers).to(device)

    def timed(model, after_step=None) -> float:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

        def step():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()

        for _ in range(3):
            step()
        return statistics.median(timed_ms(step, 1, device) for _ in range(repeats * 2))

    base = timed(make())
    model = make()
    pruning = Pruning(model, "threshold_method=exact", sparsity=0.5)
    pruning.mask_update(1)
    ours = timed(model, pruning.apply_mask)
    model = make()
    prune.global_unstructured(
        [(m, "weight") for m in model if isinstance(m, nn.Linear)], prune.L1Unstructured, amount=0.5
    )
    theirs = timed(model)
    print(f"\n### Training step, {blocks} MLP blocks d={d}, bf16 autocast, fused AdamW, batch 4096 tokens")
    print("\n| what | ms/step | overhead |")
    print("| --- | ---: | ---: |")
    for label, ms in (
        ("no pruning", base),
        ("lit_prune `apply_mask` after the step", ours),
        ("`torch.nn.utils.prune` reparametrisation", theirs),
    ):
        print(f"| {label} | {ms:.2f} | {100 * (ms / base - 1):+.1f} % |")


def semi_structured_table(sizes: list[int], repeats: int) -> None:
    from torch.sparse import to_sparse_semi_structured

    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        print(f"\n2:4 inference: skipped, compute capability {major}.{minor} < 8.0")
        return
    print("\n### 2:4 inference, fp16, `F.linear(x, W)` with x [n, k], W [m, k] (m = k = n)")
    print("\n| size | dense ms | 2:4 ms | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    for size in sizes:
        torch.manual_seed(0)
        w = torch.randn(size, size, device="cuda", dtype=torch.half)
        w = w * nm_mask(w.abs(), 4, 2)  # the 2 largest |w| of every 4, as lit_prune's 2:4 export
        assert is_nm_sparse(w, 2, 4)
        x = torch.randn(size, size, device="cuda", dtype=torch.half)
        sparse = to_sparse_semi_structured(w)
        dense_ms = timed_ms(lambda w=w, x=x: nn.functional.linear(x, w), repeats, "cuda")
        sparse_ms = timed_ms(lambda s=sparse, x=x: nn.functional.linear(x, s), repeats, "cuda")
        print(f"| {size} | {dense_ms:.3f} | {sparse_ms:.3f} | {dense_ms / sparse_ms:.2f}x |")


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"{device}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--width", type=int, default=1024, help="model width d of the stacks")
    parser.add_argument("--device", default="cuda", help="cuda (the figures) or cpu (a smoke run of the code)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench/gpu.py needs a CUDA GPU (or --device cpu for a smoke run, which measures nothing useful)"
        )
    repeats = args.repeats or (3 if args.quick else 10)
    print(f"torch {torch.__version__}, {device_name(args.device)}")
    blocks = 4 if args.quick else 12
    mask_update_table(args.width, blocks, repeats, args.device)
    step_overhead_table(args.width, blocks, repeats, args.device)
    if args.device == "cuda":
        semi_structured_table([1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192], repeats)
    else:
        print("\n2:4 inference: skipped (needs CUDA)")


if __name__ == "__main__":
    main()

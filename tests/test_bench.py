"""Every benchmark still runs (smoke sizes, no timing assertions): `python bench/run.py --quick`.

Run: pytest tests/test_bench.py   (slow: about 2 minutes)
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_benchmark_runs_at_smoke_size(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    for section in ("mask_update", "step_overhead", "scaling", "accuracy", "oracle", "nm_accuracy"):
        assert f"## {section}" in report
    assert report.count("| --- |") >= 6  # each section printed its table
    for name in (
        "mask_update.json",
        "scaling.json",
        "accuracy.json",
        "nm_accuracy.json",
        "accuracy_vs_sparsity.png",
        "mask_update_scaling.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.slow
def test_gpu_benchmark_code_runs_on_cpu_at_smoke_size():
    # The figures need CUDA; this only proves the script's code paths run (tables printed).
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--width", "32", "--quick",
         "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lit_prune 2:4 (N:M)" in result.stdout and "`torch.nn.utils.prune` reparametrisation" in result.stdout


@pytest.mark.slow
def test_sharded_benchmark_runs_with_blocks_cut_by_the_shards():
    # 2 processes, 2 x Linear(64, 64): 32 rows each, so 3-row blocks cut one block row per weight
    cmd = [sys.executable, str(ROOT / "bench" / "sharded.py"), "--size", "64", "--layers", "2", "--updates", "2"]
    result = subprocess.run([*cmd, "--blocks", "3x3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in result.stdout.splitlines()[3:]}
    assert set(rows) == {"one process", "lit_prune, sharded", "gather, then prune"}, result.stdout
    sharded = rows["lit_prune, sharded"]
    # NaN check, maxima, counts, kept, and the cut block rows: 3 x 64 float32 per weight
    assert sharded[4] == "5" and int(sharded[5].strip(" |")) > 2 * 3 * 64 * 4, result.stdout


@pytest.mark.slow
def test_torch_path_benchmark_prints_its_two_tables():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "torch_path.py"), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 2 * (1 + 5), result.stdout  # a header and five specs, twice
    ops = [int(r.split("|")[3]) for r in rows[7:]]
    assert all(n > 0 for n in ops), result.stdout

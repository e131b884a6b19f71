"""Run every benchmark in one go, print their tables, and collect them in bench/results/REPORT.md.

    python bench/run.py            # full (under 15 min on 2 CPU cores)
    python bench/run.py --quick    # smoke sizes (about 2 min)

Sections, each also runnable alone: mask_update (lit_prune vs torch.nn.utils.prune, memory),
step_overhead (PruningCallback vs ModelPruning vs none in Trainer.fit), scaling (1 M to 100 M
weights), accuracy (digits, lit_prune vs ModelPruning vs one-shot, with a plot), oracle
(structured pruning vs L1 and random) and nm_accuracy (2:4, gradual vs one-shot).  JSON and PNG
files land in bench/results/.  The GPU benchmarks (bench/gpu.py) need CUDA and run on their own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Fewer rounds/seeds than each section's own default, to fit 15 minutes on 2 cores; run a section
# alone for the README's figures (more seeds, more rounds).
SECTIONS = {
    "mask_update": ["--repeats", "5"],
    "step_overhead": ["--rounds", "2"],
    "scaling": [],
    "accuracy": ["--seeds", "1"],
    "oracle": ["--seeds", "1"],
    "nm_accuracy": ["--seeds", "1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run these sections only")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = [f"# lit_prune benchmarks ({'quick' if args.quick else 'full'})", ""]
    failed = []
    for name, extra in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if args.quick else extra)]
        if name in ("accuracy", "scaling", "nm_accuracy"):
            cmd += ["--out", str(out)]
        if name == "mask_update":
            cmd += ["--out", str(out / "mask_update.json")]
        print(f"\n## {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        body = "\n".join(line for line in result.stdout.splitlines() if line.strip() and not line.startswith("["))
        print(body, flush=True)
        report += [
            f"## {name}",
            "",
            f"`python bench/{name}.py {' '.join(cmd[2:])}` ({time.perf_counter() - start:.0f} s)",
            "",
        ]
        report += [line for line in body.splitlines() if line.startswith("|") or "target" in line]
        report.append("")
        if result.returncode != 0:
            failed.append(name)
            print(result.stderr[-3000:], file=sys.stderr)
    (out / "REPORT.md").write_text("\n".join(report) + "\n")
    print(f"\nreport: {out / 'REPORT.md'}")
    if failed:
        sys.exit(f"failed sections: {failed}")


if __name__ == "__main__":
    main()

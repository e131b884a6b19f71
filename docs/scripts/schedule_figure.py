"""The schedule figure of the docs, from lit_prune's own schedule functions.

    python docs/scripts/schedule_figure.py      # writes docs/assets/schedule.png (about a second)

The curve is :func:`lit_prune.gradual_sparsity` at every step (TF's ``<name>/sparsity``); the
staircase is the sparsity the masks hold, set at each step where TF's update rule
(``lit_prune.engine.schedule.should_update``) lets a mask update run.  The spec is the README's
TF example: updates every 50 steps from 200 to 2000, the cubic curve from 200 to 1500, 90 %.
"""

from __future__ import annotations

from pathlib import Path

from lit_prune import PruningHParams, gradual_sparsity
from lit_prune.engine.schedule import should_update

OUT = Path(__file__).resolve().parents[2] / "docs" / "assets" / "schedule.png"
SPEC = PruningHParams(
    begin_pruning_step=200,
    end_pruning_step=2000,
    pruning_frequency=50,
    target_sparsity=0.9,
    sparsity_function_begin_step=200,
    sparsity_function_end_step=1500,
)


def main() -> None:
    """Plot the curve and the masks' staircase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(0, 2301))
    curve = [100 * gradual_sparsity(t, SPEC) for t in steps]
    held, last, current, updates = [], 0, 0.0, []
    for t in steps:
        if should_update(t, last, SPEC):
            last, current = t, gradual_sparsity(t, SPEC)
            updates.append(t)
        held.append(100 * current)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.plot(steps, curve, label="gradual_sparsity(step): the schedule", color="tab:blue")
    ax.step(steps, held, where="post", label=f"masks ({len(updates)} updates, every 50 steps)", color="tab:orange")
    marks = {200: "begin steps = 200", 1500: "sparsity_function_end_step", 2000: "end_pruning_step"}
    for x, text in marks.items():
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.annotate(text, (x, 3), rotation=90, fontsize=7, ha="right", va="bottom", color="dimgrey")
    ax.set_xlabel("global step")
    ax.set_ylabel("sparsity (%)")
    ax.set_title("s(t) = s_f + (s_i - s_f)(1 - p)^3, target_sparsity = 0.9", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    plt.close(fig)
    print(OUT)


if __name__ == "__main__":
    main()

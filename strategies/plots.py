"""Plots of a run's per-round metrics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402

# (panel title, metric keys drawn in it)
_PANELS = (
    ("Accuracy", ("federated/accuracy", "central/accuracy")),
    ("Macro-F1", ("federated/macro_f1", "central/macro_f1")),
    ("Loss", ("federated/loss", "central/loss", "train/loss")),
)


def plot_rounds(history: dict[int, dict[str, float]], path: Path) -> Path | None:
    """One panel per quantity, rounds on the x axis; None when nothing was logged."""
    if not history:
        return None
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(5 * len(_PANELS), 3.8))
    for ax, (title, keys) in zip(axes, _PANELS, strict=True):
        for key in keys:
            points = sorted((r, m[key]) for r, m in history.items() if key in m)
            if points:
                ax.plot([r for r, _ in points], [v for _, v in points], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

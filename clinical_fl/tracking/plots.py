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
    ("Privacy spent (epsilon)", ("privacy/epsilon_max", "privacy/epsilon_mean",
                                 "privacy/client_level_epsilon")),
)


def plot_rounds(history: dict[int, dict[str, float]], path: Path) -> Path | None:
    """One panel per quantity, rounds on the x axis; None when nothing was logged."""
    if not history:
        return None
    logged = {key for metrics in history.values() for key in metrics}
    panels = [(title, keys) for title, keys in _PANELS if logged & set(keys)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
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

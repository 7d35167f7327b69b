"""Per-class recall and F1 in MLflow, and the classes a model never finds.

Macro-F1 alone hides a specialty that is never predicted right; a consortium forms to serve
exactly those patients. From the summed per-class counts (federated: only when every
hospital's policy releases them; central: the server's own test notes) each class gets
``<prefix>/recall/<label>`` and ``<prefix>/f1/<label>`` per round.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. ]")


def safe_name(label: str) -> str:
    """A label as part of an MLflow metric or param name (letters, digits, _ - . and space)."""
    return _UNSAFE.sub("_", label) or "_"


def per_class_metrics(prefix: str, labels: Sequence[str], tp: Sequence[float],
                      fp: Sequence[float], fn: Sequence[float]) -> dict[str, float]:
    """Recall and F1 of every class with support (a class without notes has no recall)."""
    metrics = {}
    for label, t, p, n in zip(labels, tp, fp, fn, strict=True):
        if t + n == 0:
            continue
        name = safe_name(label)
        metrics[f"{prefix}/recall/{name}"] = t / (t + n)
        metrics[f"{prefix}/f1/{name}"] = 2 * t / (2 * t + p + n)
    return metrics


def zero_recall(metrics: Mapping[str, float], prefix: str) -> list[str]:
    """The classes (as named in the metrics) that ``prefix`` never found in a round."""
    start = f"{prefix}/recall/"
    return sorted(key[len(start):] for key, value in metrics.items()
                  if key.startswith(start) and value == 0)

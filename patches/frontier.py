"""The refusal / over-refusal frontier: one point per evaluated setting, in one PNG.

``patchserve eval`` writes ``frontier.png`` beside ``eval.png``: every variant it measured is a point
(x = over-refusal on benign prompts, y = refusal on harmful prompts), and ``--frontier-from`` adds the
variants of earlier runs' ``eval.json`` files, so settings measured on different days share one plot.
The target region (refusal ≥ 90%, over-refusal ≤ 5%) is shaded; up and to the left is better.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Point:
    label: str
    over_refusal: float
    refusal: float


def points_from(path: Path) -> list[Point]:
    """The variants of an ``eval.json`` written by ``patchserve eval``."""
    return [Point(r["name"], r["over_refusal_rate"], r["refusal_rate"]) for r in json.loads(path.read_text())]


def plot(points: list[Point], path: Path, *, title: str = "refusal vs over-refusal") -> Path:
    """Scatter ``points`` with their labels; the target region is shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.axvspan(0, 5, ymin=0.9, ymax=1.0, color="tab:green", alpha=0.15, label="target (≥90% / ≤5%)")
    for point in points:
        ax.scatter(100 * point.over_refusal, 100 * point.refusal, s=28)
        ax.annotate(point.label, (100 * point.over_refusal, 100 * point.refusal), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("over-refusal on benign prompts, % (↓)")
    ax.set_ylabel("refusal on harmful prompts, % (↑)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

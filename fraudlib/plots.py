"""Figures the stage notebooks show to a reviewer; each returns a matplotlib Figure.

Saving is the caller's choice (``save(fig, path)``), so the same figure is shown in the
notebook and logged to MLflow.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from fraudlib import metrics


def save(fig, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def training_curve(curve: dict):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(curve["epoch"], curve["loss"], marker="o", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("class-weighted cross-entropy")
    if curve.get("val_auprc"):
        twin = ax.twinx()
        twin.plot(curve["epoch"], curve["val_auprc"], marker="s", color="tab:orange", label="validation AUPRC")
        twin.set_ylabel("validation AUPRC (GNN head)")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("GNN training")
    fig.tight_layout()
    return fig


def pr_curves(labels: np.ndarray, scores: dict[str, np.ndarray], title: str = "Precision-recall, test edges"):
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, s in scores.items():
        # The points where recall moves (one per distinct fraud score, not one per row: 1.5M on a
        # test period), from (recall 0, precision 1) on.
        precision, recall, area = metrics.pr_points(labels, s)
        ax.plot(np.r_[0.0, recall], np.r_[1.0, precision], label=f"{name} (AUPRC {area:.3f})")
    ax.axhline(float(np.mean(labels)), color="grey", linestyle=":", label="fraud rate")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def confusion(labels: np.ndarray, scores: dict[str, np.ndarray], threshold: float):
    fig, axes = plt.subplots(1, len(scores), figsize=(3.6 * len(scores), 3.4), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items()):
        flagged = (np.asarray(s) >= threshold).astype(np.int64)
        cm = np.bincount(2 * np.asarray(labels, dtype=np.int64) + flagged, minlength=4).reshape(2, 2)
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, f"{v:,}", ha="center", va="center",
                    color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks([0, 1], ["legit", "fraud"])
        ax.set_yticks([0, 1], ["legit", "fraud"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(f"{name} @ {threshold:.2f}")
    fig.tight_layout()
    return fig


def importance(gains: dict[str, float], top: int = 20, title: str = "Top features (XGBoost total gain)"):
    items = list(gains.items())[:top][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.28 * len(items) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items],
            color=["tab:green" if ":h" in k else "tab:blue" for k, _ in items])
    ax.set_xlabel("total gain (green: GNN embedding dimensions)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def shapley_bars(values: dict[str, np.ndarray], names: dict[str, list[str]],
                 title: str = "Shapley values of one transaction"):
    labels, heights = [], []
    for group, vals in values.items():
        for name, v in zip(names.get(group, []), np.ravel(vals)):
            labels.append(f"{group}:{name}")
            heights.append(float(v))
    order = np.argsort(np.abs(heights))
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(labels) + 1))
    ax.barh([labels[i] for i in order], [heights[i] for i in order],
            color=["tab:red" if heights[i] > 0 else "tab:blue" for i in order])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("contribution to the fraud probability (red raises it)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def delta_interval(delta: float, low: float, high: float, metric: str, min_improvement: float,
                   level: float = 0.95):
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.errorbar([delta], [0], xerr=[[delta - low], [high - delta]], fmt="o", capsize=6)
    ax.axvline(0, color="grey", linestyle=":")
    ax.axvline(min_improvement, color="tab:red", linestyle="--", label=f"min_improvement {min_improvement:g}")
    ax.set_yticks([])
    ax.set_xlabel(f"challenger - champion {metric} ({level:.0%} paired bootstrap interval)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def edges_per_year(years) -> "plt.Figure":
    """Edges and fraud edges per year, coloured by split (``preprocess.report_tables()["years"]``)."""
    colors = years["split"].map({"train": "tab:blue", "validation": "tab:orange", "test": "tab:green"})
    fig, ax = plt.subplots(figsize=(10, 3))
    ax.bar(years.index, years["edges"].astype(int), color=colors)
    ax.bar(years.index, years["fraud"].astype(int), color="black", label="fraud")
    ax.set(title="edges per year (blue train, orange validation, green test; black = fraud)", ylabel="edges")
    ax.tick_params(axis="x", rotation=90)
    ax.legend()
    fig.tight_layout()
    return fig


def degree_histograms(degree: dict[str, np.ndarray]):
    """Log-binned degree histogram per node type (``preprocess.degrees``); isolated nodes counted in the title."""
    fig, axes = plt.subplots(1, len(degree), figsize=(10, 3), squeeze=False)
    for ax, (node, d) in zip(axes[0], degree.items()):
        ax.hist(d[d > 0], bins=np.unique(np.geomspace(1, d.max() + 1, 30).astype(int)), log=True)
        ax.set(xscale="log", title=f"{node}: {len(d):,} nodes, {(d == 0).sum():,} isolated", xlabel="degree (edges)")
    fig.tight_layout()
    return fig


def close(*figures) -> None:
    """Closes figures that were saved, so Jupyter does not show them a second time."""
    for fig in figures:
        plt.close(fig)

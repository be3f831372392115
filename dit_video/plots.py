"""Plots written next to a run (headless: matplotlib's Agg backend)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(metrics_csv: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every column of Lightning's CSVLogger metrics.csv -> (steps, values); empty cells skipped."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                steps, values = out.setdefault(key, ([], []))
                steps.append(int(row["step"]))
                values.append(float(value))
    return out


def read_metric(metrics_csv: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric from metrics.csv (empty if it was never logged)."""
    return read_metrics(metrics_csv).get(key, ([], []))


def plot_loss_curve(metrics_csv: Path, out_png: Path, key: str = "train/loss") -> Path | None:
    """Raw and smoothed training loss against step; returns the PNG path (None if no data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = read_metric(metrics_csv, key)
    if not steps:
        return None
    smooth, acc = [], values[0]
    for v in values:  # exponential moving average, to see the trend under minibatch noise
        acc = 0.9 * acc + 0.1 * v
        smooth.append(acc)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, values, alpha=0.35, label=key)
    ax.plot(steps, smooth, label=f"{key} (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png

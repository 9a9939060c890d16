"""PNG figures written next to a stage's outputs (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_reward_curves(metrics_paths: list[str | Path], out_png: str | Path, title: str = "Implicit rewards") -> Path:
    """Chosen / rejected implicit rewards and their margin per optimizer step (TSO Fig. 3/4).

    Several metrics files (e.g. TSO mini-batches) are drawn one after the other on a shared step axis.
    """
    plt = _plt()
    steps, chosen, rejected, margin, bounds = [], [], [], [], []
    offset = 0
    for path in metrics_paths:
        rows = [r for r in read_metrics(path) if "rewards/chosen" in r]
        for r in rows:
            steps.append(offset + r["step"])
            chosen.append(r["rewards/chosen"])
            rejected.append(r["rewards/rejected"])
            margin.append(r["rewards/margin"])
        offset += rows[-1]["step"] if rows else 0
        bounds.append(offset)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, chosen, label="chosen reward", color="tab:green")
    ax.plot(steps, rejected, label="rejected reward", color="tab:red")
    ax.plot(steps, margin, label="margin", color="tab:blue", linestyle="--")
    for b in bounds[:-1]:
        ax.axvline(b, color="grey", linewidth=0.8, linestyle=":")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("beta * log(pi / ref)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png

"""PNG figures written next to a stage's outputs (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def one_step_axis(parts: list[list[dict]]) -> tuple[list[dict], list[float]]:
    """Rows of several metrics logs (e.g. TSO's mini-batches) on one step axis: each log continues after the
    previous one's last step. Returns the rows with a numeric step, re-stepped, and where each log after the
    first starts."""
    rows, bounds, offset = [], [], 0
    for i, part in enumerate(parts):
        stepped = [r for r in part if isinstance(r.get("step"), (int, float)) and not isinstance(r["step"], bool)]
        if i:
            bounds.append(offset)
        rows += [{**r, "step": offset + r["step"]} for r in stepped]
        offset += max((r["step"] for r in stepped), default=0)
    return rows, bounds


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_reward_curves(metrics_paths: list[str | Path], out_png: str | Path, title: str = "Implicit rewards") -> Path:
    """Chosen / rejected implicit rewards and their margin per optimizer step (TSO Fig. 3/4).

    Several metrics files (e.g. TSO mini-batches) are drawn one after the other on a shared step axis.
    """
    plt = _plt()
    rows, bounds = one_step_axis([[r for r in read_metrics(p) if "rewards/chosen" in r] for p in metrics_paths])
    steps = [r["step"] for r in rows]
    chosen, rejected = [r["rewards/chosen"] for r in rows], [r["rewards/rejected"] for r in rows]
    margin = [r["rewards/margin"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, chosen, label="chosen reward", color="tab:green")
    ax.plot(steps, rejected, label="rejected reward", color="tab:red")
    ax.plot(steps, margin, label="margin", color="tab:blue", linestyle="--")
    for b in bounds:
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


RL_CURVES = (("reward_mean", "reward mean"), ("pass_rate", "verifier pass rate"), ("kl", "KL to reference"),
             ("clip_fraction", "clip fraction"), ("entropy", "entropy"), ("response_length_mean", "response tokens"))
RL_SE = {"reward_mean": "reward_se", "pass_rate": "pass_rate_se"}
"""The standard error logged with a quantity of iterations.jsonl."""


def plot_rl_curves(rows: list[dict], out_png: str | Path, title: str = "rl") -> Path:
    """Per-iteration curves of ``alignline rl`` (iterations.jsonl rows): one panel per logged quantity, three
    to a row; a quantity with a standard error (RL_SE: reward mean, pass rate) gets a band of +- 1 SE."""
    plt = _plt()
    panels = [(k, label) for k, label in RL_CURVES if any(r.get(k) is not None for r in rows)]
    cols = min(max(len(panels), 1), 3)
    nrows = -(-max(len(panels), 1) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes.flat, panels):
        pts = [(r["iteration"], r[key], r.get(RL_SE.get(key, ""))) for r in rows if r.get(key) is not None]
        xs, ys = [x for x, _, _ in pts], [y for _, y, _ in pts]
        ax.plot(xs, ys, marker=".")
        if pts and all(se is not None for _, _, se in pts):
            ax.fill_between(xs, [y - se for _, y, se in pts], [y + se for _, y, se in pts], alpha=0.25)
            label += " (band: +- 1 SE)"
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

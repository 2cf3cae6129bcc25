"""What the fit stage shows a person: loss reductions, fit curves, response-map heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lofa.io import read_json


def collect_curves(curve_dir: str | Path) -> list[dict[str, Any]]:
    """Every per-clip fit record (``curves/*.json``), sorted by clip id."""
    curves = [read_json(p) for p in sorted(Path(curve_dir).glob("*.json"))]
    return sorted(curves, key=lambda c: c["clip_id"])


def summarize(curves: list[dict[str, Any]]) -> dict[str, Any]:
    """How much the fitted LoRAs lower their own clip's flow-matching loss against the base model."""
    if not curves:
        raise ValueError("summarize: no fit curves")
    base = np.array([c["base_loss"] for c in curves])
    final = np.array([c["final_loss"] for c in curves])
    rel = (base - final) / np.maximum(base, 1e-12)
    frac = np.array([c["response_map"]["fraction"] for c in curves])
    q = lambda x, p: float(np.percentile(x, p))  # noqa: E731
    return {
        "clips": len(curves),
        "base_loss_median": q(base, 50), "final_loss_median": q(final, 50),
        "loss_reduction_median": q(rel, 50), "loss_reduction_p10": q(rel, 10), "loss_reduction_p90": q(rel, 90),
        "share_improved": float((final < base).mean()),
        "response_fraction_mean": float(frac.mean()),
    }


def response_table(curves: list[dict[str, Any]], modules: list[str]) -> np.ndarray:
    """(blocks, modules) mean share of responding entries over all LoRAs (vocabulary order)."""
    per = np.array([c["response_map"]["by_matrix"] for c in curves]).mean(0)
    return per.reshape(-1, len(modules))


def plot_fit(curves: list[dict[str, Any]], out_dir: str | Path) -> Any:
    """Fit curves (median and 10-90% band), loss before/after, and the response heatmap, written to
    ``<out_dir>/fit_summary.png``; returns the matplotlib Figure (for ``mlflow.log_figure``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lofa.io import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    losses = np.array([c["losses"] for c in curves])  # (N, steps)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    steps = np.arange(1, losses.shape[1] + 1)
    ax[0].fill_between(steps, np.percentile(losses, 10, 0), np.percentile(losses, 90, 0), alpha=0.3)
    ax[0].plot(steps, np.median(losses, 0))
    ax[0].set(title=f"per-clip fit loss ({len(curves)} clips): median, 10-90%", xlabel="step", ylabel="loss")
    base = [c["base_loss"] for c in curves]
    final = [c["final_loss"] for c in curves]
    ax[1].scatter(base, final, s=8)
    lim = [0, max(base + final) * 1.05]
    ax[1].plot(lim, lim, "k--", lw=0.8)
    ax[1].set(title="eval loss: base model vs fitted LoRA", xlabel="base", ylabel="fitted", xlim=lim, ylim=lim)
    modules = list(curves[0]["config"]["modules"])
    table = response_table(curves, modules)
    im = ax[2].imshow(table.T, aspect="auto", cmap="viridis")
    ax[2].set(title=f"response share |dW/W| > {curves[0]['response_map']['tau']}", xlabel="block",
              yticks=range(len(modules)), yticklabels=modules)
    fig.colorbar(im, ax=ax[2])
    fig.tight_layout()
    with atomic_path(out_dir / "fit_summary.png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)  # pyplot lets go of it; the Figure still renders
    return fig

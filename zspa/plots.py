"""The charts zspa-eval and zspa-profile write (matplotlib, the `plots` extra): kept out of the
runtime, which a device runs without them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zspa.runtime.profiling import ttft_prediction


def plot_accuracy(table: list[dict], path: Path, title: str) -> Path:
    """Accuracy against keep, one line per method with its 95 % interval shaded, the unpruned
    accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in table if r["method"] != "none"):
        rows = sorted((r for r in table if r["method"] == method), key=lambda r: r["keep"])
        keeps = [r["keep"] for r in rows]
        line, = ax.plot(keeps, [r["accuracy"] for r in rows], marker="o", label=method)
        ax.fill_between(keeps, *zip(*(r["accuracy_interval"] for r in rows)), color=line.get_color(), alpha=0.12)
    baseline = [r["accuracy"] for r in table if r["method"] == "none"]
    if baseline:
        ax.axhline(baseline[0], color="black", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xscale("log")
    ax.set_xlabel("keep (fraction of visual tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_profile(report: dict, out: Path) -> list[Path]:
    """zspa-profile's report: stacked per-stage bars per setting, and TTFT against keep beside the
    token-count prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["settings"]
    labels = [f"{r['method']}\n{r['keep']:g}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.2), dpi=120)
    bottom = np.zeros(len(rows))
    for stage in ("preprocess", "vision", "embed", "prune", "prefill"):
        values = np.array([r["latency_ms"][stage]["p50"] for r in rows])
        ax.bar(labels, values, bottom=bottom, label=stage)
        bottom += values
    ax.set_ylabel("ms (p50)")
    ax.set_title("Time to first token by stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    stages_path = out / "stages.png"
    fig.savefig(stages_path)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    full = next((r for r in rows if r["keep"] == 1.0), None)
    for method in dict.fromkeys(r["method"] for r in rows if r["keep"] < 1.0):
        series = sorted([r for r in rows if r["method"] == method] + ([full] if full else []), key=lambda r: r["keep"])
        ax.plot([r["keep"] for r in series], [r["latency_ms"]["time_to_first_token"]["p50"] for r in series],
                marker="o", label=f"{method} measured")
        if full:
            predicted = [ttft_prediction(r, full) for r in series]
            ax.plot([r["keep"] for r in series], predicted, linestyle="--", label=f"{method} predicted from tokens")
    ax.set_xlabel("keep")
    ax.set_ylabel("time to first token, ms (p50)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    ttft_path = out / "ttft_vs_keep.png"
    fig.savefig(ttft_path)
    plt.close(fig)
    return [stages_path, ttft_path]

"""One chart type for the side-by-side benchmarks: medians as horizontal bars, min/max or quartiles as whiskers."""

from __future__ import annotations

from pathlib import Path


def bar_chart(path: Path, title: str, xlabel: str, panels: dict[str, list[tuple[str, float, float, float]]],
              log: bool = False) -> None:
    """Write a PNG with one panel per key of ``panels``; each bar is ``(label, median, low, high)``; ``log``: a
    logarithmic value axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(8, 0.6 + sum(0.45 * len(bars) + 0.6 for bars in panels.values())))
    for ax, (name, bars) in zip(axes[:, 0], panels.items()):
        labels, med, low, high = zip(*bars)
        ax.barh(range(len(bars)), med, xerr=[[m - lo for m, lo in zip(med, low)], [h - m for m, h in zip(med, high)]],
                color=["#888888" if i == 0 else "#3b75af" for i in range(len(bars))], capsize=3)
        ax.set_yticks(range(len(bars)), labels)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=10)
        if log:
            ax.set_xscale("log")
        for i, (m, h) in enumerate(zip(med, high)):
            ax.annotate(f"{m:.3g}", (h, i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

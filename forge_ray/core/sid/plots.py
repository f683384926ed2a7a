"""SID quality plots as PNG (matplotlib, Agg backend: no display needed).

* :func:`plot_sid_distribution`: histogram of items per SID next to its Lorenz
  curve (the Gini coefficient is twice the area between it and the diagonal).
* :func:`plot_code_usage`: per level, the share of items on each code sorted from
  most to least used, with utilization and perplexity in the legend.

Both take counts (see :mod:`forge_ray.core.sid.metrics`), so they work on counts
gathered by a distributed job.
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from forge_ray.core.sid.metrics import gini, lorenz_curve, perplexity, utilization  # noqa: E402


def plot_sid_distribution(counts, path: str | os.PathLike, title: str = "Items per SID") -> None:
    """Write a two-panel PNG: items-per-SID histogram (log counts) and Lorenz curve."""
    c = np.asarray(counts, dtype=np.int64)
    c = c[c > 0]
    fig, (ax_h, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    bins = np.arange(1, c.max() + 2) - 0.5 if c.max() <= 60 else 60
    ax_h.hist(c, bins=bins, color="tab:blue")
    ax_h.set_yscale("log")
    ax_h.set_xlabel("items per SID")
    ax_h.set_ylabel("number of SIDs")
    ax_h.set_title(f"{c.size:,} SIDs, {int(c.sum()):,} items, max {int(c.max())}")
    x, y = lorenz_curve(c)
    ax_l.plot(x, y, color="tab:red", label=f"Lorenz (Gini = {gini(c):.4f})")
    ax_l.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect equality")
    ax_l.set_xlabel("cumulative share of SIDs (fewest items first)")
    ax_l.set_ylabel("cumulative share of items")
    ax_l.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_code_usage(levels: Sequence[np.ndarray], path: str | os.PathLike,
                    title: str = "Code usage per level") -> None:
    """Write a PNG of each level's sorted code usage (share of items, log scale)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for lvl, counts in enumerate(levels):
        c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
        share = c / max(c.sum(), 1.0)
        rank = np.arange(1, c.size + 1) / c.size
        label = (f"level {lvl + 1}: {c.size} codes, used {utilization(c):.1%}, "
                 f"perplexity {perplexity(c):.1f}" if c.sum() else f"level {lvl + 1}: unused")
        ax.step(rank, np.where(share > 0, share, np.nan), where="post", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("code rank / codebook size (most used first)")
    ax.set_ylabel("share of items")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

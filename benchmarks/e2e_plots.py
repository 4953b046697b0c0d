"""The report's plots: step time against dense, and test accuracy against training time."""

from __future__ import annotations

import os
from typing import Any

from e2e_config import Config, Row, TTARow
from e2e_report import row_key
from e2e_variants import describe

__all__ = ["plot"]


def plot(cfg: Config, rows: list[Row], tta: list[TTARow], out: str) -> list[str]:
    """``step_time.png`` (ratio to dense, log scale) and, with time to accuracy, ``tta.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    def plain(axis: Any) -> None:  # 0.1, 0.2, 0.5, 1 on a log axis, not crowded 10^x labels
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(ticker.NullFormatter())

    paths = []
    models = [m for m in cfg.models if any(r.model == m for r in rows)] or list(cfg.models)
    fig, axes = plt.subplots(len(models), 1, figsize=(12, 4 * len(models)), squeeze=False)
    pairs = [(n, link) for n in cfg.ranks for link in cfg.links]
    for ax, name in zip(axes[:, 0], models):
        labels = list(dict.fromkeys(r.label for r in rows if r.model == name))
        width = 0.8 / max(1, len(pairs))
        for j, (n, link) in enumerate(pairs):
            xs, ys = [], []
            for i, label in enumerate(labels):
                r = next(
                    (r for r in rows if row_key(r) == (name, n, link) and r.label == label), None
                )
                if r is not None and r.vs_dense:
                    xs.append(i + (j - (len(pairs) - 1) / 2) * width)
                    ys.append(r.vs_dense)
            ax.bar(xs, ys, width=width, label=f"{n} ranks, {link}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        plain(ax.yaxis)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_ylabel("step time / dense")
        ax.set_title(describe(name, cfg))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out, "step_time.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if tta:
        keys = list(dict.fromkeys((t.ranks, t.link) for t in tta))
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
        for ax, (n, link) in zip(axes[0], keys):
            for t in tta:
                if (t.ranks, t.link) == (n, link) and t.seed == cfg.seed and t.curve_s:
                    ax.plot(t.curve_s, t.curve_acc, marker=".", label=t.label)
            ax.axhline(cfg.tta_target, color="k", lw=0.8, ls="--")
            ax.set_xscale("log")
            plain(ax.xaxis)
            ax.set_xlabel("training seconds (log scale)")
            ax.set_ylabel("test accuracy %")
            ax.set_title(f"digits, {n} ranks, {link}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out, "tta.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths

"""The report's pictures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"guided": "Blues", "baseline": "Oranges"}


def _shade(cmap: str, r: int, rounds: int):
    # light (round 0) -> dark (last round), never white
    t = 0.35 + 0.6 * (r / max(1, rounds))
    return plt.get_cmap(cmap)(t)


def embedding_map(path: Path, points: Mapping[str, np.ndarray], rounds: Mapping[str, Sequence[int]],
                  title: str) -> Path:
    """2-D projection of every instruction: guided vs baseline colours, darker = later round."""
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    max_round = max((max(r) for r in rounds.values() if len(r)), default=0)
    markers = {"guided": "o", "baseline": "^"}
    for name, xy in points.items():
        rs = list(rounds[name])
        for r in sorted(set(rs)):
            sel = np.array([x == r for x in rs])
            ax.scatter(xy[sel, 0], xy[sel, 1], s=42, marker=markers.get(name, "o"),
                       color=_shade(COLORS.get(name, "Greys"), r, max_round), edgecolors="black",
                       linewidths=0.3, label=f"{name} r{r}")
    ax.set_xlabel("PC 1 (fitted on guided + baseline)")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def diversity_per_round(path: Path, series: Mapping[str, Mapping[int, float | None]], metric: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, per_round in series.items():
        xs = [r for r, v in per_round.items() if v is not None]
        ys = [per_round[r] for r in xs]
        color = plt.get_cmap(COLORS.get(name, "Greys"))(0.75)
        ax.plot(xs, ys, marker="o", color=color, label=name)
    ax.set_xlabel("round (0 = bootstrap, no guidance)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{metric.replace('_', ' ')} of each round's instructions")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def guidance_scales(path: Path, accepted: Sequence[tuple[int, float]], attempts: Sequence[tuple[int, float]]) -> Path:
    """Left: the scale of each accepted guided instruction per round; right: every attempt's scale."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    rng = np.random.default_rng(0)
    if accepted:
        r = np.array([a[0] for a in accepted], float)
        s = np.array([a[1] for a in accepted], float)
        a1.scatter(r + rng.uniform(-0.12, 0.12, len(r)), s, color=plt.get_cmap("Blues")(0.75),
                   edgecolors="black", linewidths=0.3)
        for rr in sorted(set(r)):
            a1.hlines(s[r == rr].mean(), rr - 0.3, rr + 0.3, color="black", linewidth=1.5)
    a1.set_xlabel("round")
    a1.set_ylabel("guidance scale")
    a1.set_title("scale of each accepted instruction (bar: mean)")
    a1.xaxis.get_major_locator().set_params(integer=True)
    if attempts:
        vals = [a[1] for a in attempts]
        bins = np.arange(min(vals) - 0.25, max(vals) + 0.5, 0.5) if len(set(vals)) > 1 else 5
        a2.hist(vals, bins=bins, color=plt.get_cmap("Blues")(0.6), edgecolor="black")
    a2.set_xlabel("guidance scale")
    a2.set_ylabel("attempts")
    a2.set_title("every guided attempt (retries raise the scale)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

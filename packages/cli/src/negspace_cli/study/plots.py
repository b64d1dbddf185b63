"""The study's figures (matplotlib, Agg backend: no display needed).

* ``diversity_vs_quality``: every arm as a labelled point (x = on-topic rate, y = Vendi) with
  its bootstrap intervals as error bars, over the plain-sampling curve (temperatures annotated);
  an arm above the curve is more diverse than plain sampling at the same on-topic rate.
* ``per_case_ratios``: each arm's per-case ratio to the curve, one dot per case, so a reader sees
  whether a mean ratio comes from most cases or from a few.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KIND_STYLE = {   # kind -> (marker, colour)
    "plain": ("o", "0.45"),
    "guided": ("D", "tab:blue"),
    "baseline": ("s", "tab:orange"),
    "history": ("^", "tab:green"),
}
_DEFAULT_STYLE = ("v", "tab:purple")


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _err(center: float, err: Any) -> np.ndarray | None:
    """Error bar offsets from a half-width or an absolute (low, high) interval; None if absent."""
    if err is None:
        return None
    if isinstance(err, (int, float)):
        return np.array([[abs(err)], [abs(err)]]) if math.isfinite(err) else None
    low, high = err
    if not (_finite(low) and _finite(high)):
        return None
    return np.array([[max(0.0, center - low)], [max(0.0, high - center)]])


def diversity_vs_quality(path: str | Path, arms: Mapping[str, Mapping[str, Any]],
                         curve_points: Sequence[Mapping[str, Any]], *,
                         title: str = "Diversity vs on-topic rate",
                         xlabel: str = "on-topic rate (share of texts with relevance >= bar)",
                         ylabel: str = "Vendi score (all-mpnet-base-v2)") -> Path:
    """Write the diversity-vs-quality figure to ``path`` (format from the suffix); return it.

    ``arms``: ``{name: {"x", "y", "x_err"?, "y_err"?, "kind"?}}``; an error is a half-width or a
    ``(low, high)`` interval (e.g. a bootstrap ``ci_low``/``ci_high``). ``kind`` picks the marker
    and colour (``plain``, ``guided``, ``baseline``, ``history``; anything else gets a default).
    Arms with a NaN coordinate are listed in the legend as "not plotted".
    ``curve_points``: ``[{"x", "y", "label"}]`` (``stats.frontier`` output); drawn as a line in x
    order, each point annotated with its label (the temperature) unless an arm of that name is
    drawn (then the arm's own label names it).
    """
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 6), dpi=120)
    curve = sorted((p for p in curve_points if _finite(p.get("x")) and _finite(p.get("y"))),
                   key=lambda p: p["x"])
    if curve:
        ax.plot([p["x"] for p in curve], [p["y"] for p in curve], "-", color="0.6", lw=2, zorder=1,
                label="plain-sampling frontier")
        for p in curve:
            # a plain arm drawn as a point is named there; annotate only the others
            if p.get("label") and str(p["label"]) not in arms:
                ax.annotate(str(p["label"]), (p["x"], p["y"]), textcoords="offset points",
                            xytext=(-6, -12), ha="right", fontsize=8, color="0.35")
    skipped = []
    seen_kinds: set[str] = set()
    for i, (name, arm) in enumerate(arms.items()):
        x, y = arm.get("x"), arm.get("y")
        if not (_finite(x) and _finite(y)):
            skipped.append(name)
            continue
        kind = str(arm.get("kind", ""))
        marker, color = KIND_STYLE.get(kind, _DEFAULT_STYLE)
        label = kind if kind and kind not in seen_kinds else None
        seen_kinds.add(kind)
        ax.errorbar([x], [y], xerr=_err(x, arm.get("x_err")), yerr=_err(y, arm.get("y_err")),
                    fmt=marker, color=color, ecolor=color, elinewidth=1, capsize=3, ms=7,
                    mec="black", mew=0.5, zorder=3, label=label)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, 6 if i % 2 == 0 else -11),
                    fontsize=8, color=color, zorder=4)
    if skipped:
        ax.plot([], [], " ", label="not plotted (NaN): " + ", ".join(skipped))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def per_case_ratios(path: str | Path, ratios: Mapping[str, Mapping[str, float]], *,
                    title: str = "Vendi ratio to the plain-sampling curve, per case",
                    ylabel: str = "arm Vendi / curve Vendi at the arm's on-topic rate") -> Path:
    """Write a strip plot of per-case ratios: ``{arm: {case_id: ratio}}`` (NaN = out of the
    curve's range, counted in the arm's tick label). A dashed line marks 1 (as diverse as plain
    sampling); a black bar marks each arm's median over its in-range cases."""
    path = Path(path)
    names = list(ratios)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2), 4.5), dpi=120)
    rng = np.random.default_rng(0)   # fixed jitter: the same data gives the same picture
    ticks = []
    for i, name in enumerate(names):
        values = np.array([v for v in ratios[name].values() if _finite(v)], dtype=float)
        missing = len(ratios[name]) - values.size
        if values.size:
            ax.scatter(i + rng.uniform(-0.15, 0.15, values.size), values, s=18, alpha=0.7,
                       color="tab:blue", edgecolors="none", zorder=2)
            ax.hlines(np.median(values), i - 0.25, i + 0.25, color="black", lw=2, zorder=3)
        ticks.append(f"{name}\n(n={values.size}" + (f", {missing} out of range)" if missing else ")"))
    ax.axhline(1.0, ls="--", color="0.5", lw=1, zorder=1)
    ax.set_xticks(range(len(names)), ticks, fontsize=8)
    ax.set_xlim(-0.6, max(0.6, len(names) - 0.4))
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

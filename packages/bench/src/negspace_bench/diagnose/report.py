"""Summaries of the mechanism check: per-variant means with bootstrap CIs over (base, seed) units,
paired differences against ``augment/min``, the per-step entropy curve, and the files written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from negspace_bench.diagnose.measures import bootstrap_ci

#: (key, column header): each a per-unit mean over that unit's decoded steps.
METRICS = [
    ("dh", "ΔH = H(pos) − H(guided), nats"),
    ("lower", "share of steps H(guided) < H(pos)"),
    ("kl", "KL(guided ‖ pos), nats"),
    ("dx", "Δ X-mass (guided − pos)"),
    ("dcopy", "Δ copy-mass (guided − pos)"),
    ("h_pos", "H(pos)"),
    ("h_guided", "H(guided)"),
]
PAIRED = ["dh", "kl", "dx", "dcopy"]
REFERENCE_VARIANT = "augment/min"


def unit_means(steps: dict[str, list[float]]) -> dict[str, float]:
    """One unit's per-step records -> the mean of each metric over its steps."""
    def avg(key: str) -> float:
        return float(np.mean(steps[key]))

    return {"dh": avg("dh"), "lower": avg("lower"), "kl": avg("kl"),
            "dx": avg("x_mass_guided") - avg("x_mass_pos"),
            "dcopy": avg("copy_mass_guided") - avg("copy_mass_pos"),
            "h_pos": avg("h_pos"), "h_guided": avg("h_guided"),
            "x_mass_pos": avg("x_mass_pos"), "copy_mass_pos": avg("copy_mass_pos")}


def summarize(units: list[dict], variants: list[str], *, reps: int = 2000) -> dict:
    """``units``: one dict per (base, seed, variant) with ``means`` and ``steps``."""
    table, paired, curves = {}, {}, {}
    by_key = {(u["base"], u["seed"], u["variant"]): u for u in units}
    for name in variants:
        mine = [u for u in units if u["variant"] == name]
        row = {"units": len(mine), "steps": int(sum(len(u["steps"]["dh"]) for u in mine))}
        for key, _ in METRICS:
            mean, lo, hi = bootstrap_ci([u["means"][key] for u in mine], reps=reps)
            row[key] = {"mean": mean, "lo": lo, "hi": hi}
        table[name] = row
        longest = max((len(u["steps"]["dh"]) for u in mine), default=0)
        curves[name] = [float(np.mean([u["steps"]["dh"][t] for u in mine if len(u["steps"]["dh"]) > t]))
                        for t in range(longest)]
        if name != REFERENCE_VARIANT and any(v == REFERENCE_VARIANT for *_, v in by_key):
            pairs = [(u, by_key.get((u["base"], u["seed"], REFERENCE_VARIANT))) for u in mine]
            pairs = [(u, r) for u, r in pairs if r is not None]
            paired[name] = {key: dict(zip(("mean", "lo", "hi"), bootstrap_ci(
                [u["means"][key] - r["means"][key] for u, r in pairs], reps=reps), strict=True))
                for key in PAIRED}
    return {"table": table, "paired_vs_augment": paired, "dh_per_step": curves}


def _cell(v: dict, digits: int = 3) -> str:
    return f"{v['mean']:+.{digits}f} [{v['lo']:+.{digits}f}, {v['hi']:+.{digits}f}]"


def markdown(summary: dict, setup: dict) -> str:
    lines = ["# Mechanism check: does guidance sharpen or push away?", "",
             "Made by `python -m negspace_bench.diagnose` (`make diagnose`); the measures are defined in "
             "`packages/bench/src/negspace_bench/diagnose/measures.py`. Means over (base, seed) units, "
             "95% percentile bootstrap CIs over units.", "",
             "Setup: " + ", ".join(f"{k} = {v}" for k, v in setup.items() if k not in ("bases", "existing")), "",
             "Bases: " + "; ".join(f"\"{b}\"" for b in setup["bases"]), "",
             "| variant | units | steps | " + " | ".join(h for _, h in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for name, row in summary["table"].items():
        lines.append(f"| {name} | {row['units']} | {row['steps']} | "
                     + " | ".join(_cell(row[k]) for k, _ in METRICS) + " |")
    if summary["paired_vs_augment"]:
        lines += ["", f"Paired differences against `{REFERENCE_VARIANT}` (same base, seed; variant minus "
                      "augment):", "",
                  "| variant | " + " | ".join(h for k, h in METRICS if k in PAIRED) + " |",
                  "|---|" + "---|" * len(PAIRED)]
        for name, row in summary["paired_vs_augment"].items():
            lines.append(f"| {name} | " + " | ".join(_cell(row[k]) for k in PAIRED) + " |")
    lines += ["", "![per-step entropy difference](dh_per_step.png)", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path, scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, curve in summary["dh_per_step"].items():
        ax.plot(range(len(curve)), curve, label=name, lw=1.6, ls="--" if name == "sharpen" else "-")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("completion position (token)")
    ax.set_ylabel("H(positive) − H(guided), nats (mean over units)")
    ax.set_title(f"Entropy removed by guidance per step (scale {scale:g})")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rounded(value, digits: int = 5):
    """Floats to ``digits`` decimals, recursively (the per-step records stay readable and small)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def write(out: Path, summary: dict, setup: dict, units: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    body = _rounded({"setup": setup, **summary, "units": units})
    (out / "diagnose.json").write_text(json.dumps(body, indent=1) + "\n")
    (out / "diagnose.md").write_text(markdown(summary, setup))
    plot(summary, out / "dh_per_step.png", setup["scale"])

"""negspace_cli.study.plots: the figures are written (and survive NaN, empty and odd inputs)."""

from __future__ import annotations

import math

from negspace_cli.study.plots import diversity_vs_quality, per_case_ratios
from negspace_cli.study.stats import frontier

PNG = b"\x89PNG\r\n\x1a\n"


def test_diversity_vs_quality_writes_a_png(tmp_path):
    curve = frontier([(0.9, 2.0, "T=0.3"), (0.8, 3.0, "T=0.7"), (0.7, 4.0, "T=1.0"), (0.5, 6.0, "T=1.5")])
    arms = {
        "T=0.7": {"x": 0.8, "y": 3.0, "kind": "plain"},
        "guided a=2": {"x": 0.78, "y": 4.1, "x_err": (0.74, 0.81), "y_err": (3.8, 4.4), "kind": "guided"},
        "history": {"x": 0.82, "y": 3.2, "x_err": 0.02, "y_err": 0.3, "kind": "history"},
        "broken": {"x": math.nan, "y": 3.0, "kind": "baseline"},
        "odd": {"x": 0.6, "y": 5.0, "x_err": (math.nan, math.nan), "kind": "something-else"},
    }
    out = diversity_vs_quality(tmp_path / "dvq.png", arms, curve)
    assert out == tmp_path / "dvq.png"
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000


def test_diversity_vs_quality_without_a_curve_or_arms(tmp_path):
    assert diversity_vs_quality(tmp_path / "empty.png", {}, []).is_file()
    assert diversity_vs_quality(str(tmp_path / "svg.svg"), {"a": {"x": 0.5, "y": 2.0}}, []).read_text().startswith("<?xml")


def test_per_case_ratios_writes_a_png(tmp_path):
    ratios = {"guided": {f"c{i}": 1.0 + 0.05 * i for i in range(10)} | {"c10": math.nan},
              "history": {f"c{i}": 0.9 + 0.02 * i for i in range(10)},
              "all out": {"c0": math.nan}}
    out = per_case_ratios(tmp_path / "ratios.png", ratios)
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5_000
    assert per_case_ratios(tmp_path / "none.png", {}).is_file()
